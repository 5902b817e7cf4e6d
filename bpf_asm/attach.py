"""Attach programs: tracepoints (perf event + BPF link, ioctl fallback), raw tracepoints,
cgroup v2 hooks, kprobes where the kernel has them. A `Link` detaches when closed, unless it
is pinned on bpffs (then it lives until unpinned, or until `detach()`)."""

from __future__ import annotations

import ctypes
import errno
import os

from . import bpffs
from ._closing import Closing
from .cgroup import open_cgroup
from .programs import Program
from .syscall import (
    PERF_EVENT_IOC_ENABLE,
    PERF_EVENT_IOC_SET_BPF,
    AttachType,
    BPFError,
    Cmd,
    LinkCreateAttr,
    LinkDetachAttr,
    LinkInfo,
    LinkType,
    LinkUpdateAttr,
    NotSupportedError,
    PerfEventAttr,
    ProgType,
    RawTracepointAttr,
    bpf,
    close_fd,
    ioctl,
    obj_get,
    obj_get_info,
    obj_pin,
    perf_event_open,
)
from .tracefs import event_id, tracefs_root

PERF_TYPE_TRACEPOINT = 2
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
# Errors meaning "this kernel has no BPF_PERF_EVENT links" (524 is the kernel's ENOTSUPP).
_NO_PERF_LINK = {errno.EINVAL, errno.EOPNOTSUPP, 524}


BPF_F_REPLACE = 1 << 2  # LINK_UPDATE: only if the link still runs `old_prog_fd`


class Link(Closing):
    """An attachment. `fd` is the BPF link fd (or -1 for the ioctl fallback), `perf_fd`
    the perf event if any. Closing detaches unless the link is pinned; a context manager."""

    def __init__(self, target: str, fd: int, perf_fd: int = -1, prog: Program | None = None):
        self.target = target
        self.fd = fd
        self.perf_fd = perf_fd
        self.prog = prog

    @classmethod
    def open_pinned(cls, path: str) -> Link:
        """Open a link pinned on bpffs (mounting bpffs at /sys/fs/bpf if needed). `target`
        is read from the kernel: "cgroup id N (attach type)" for cgroup links."""
        if os.path.abspath(path).startswith(bpffs.DEFAULT_ROOT + "/"):
            bpffs.bpffs_root()
        fd = obj_get(path)
        try:
            kind = os.readlink(f"/proc/self/fd/{fd}")
            if kind != "anon_inode:bpf-link":
                raise ValueError(f"{path} is pinned but is not a BPF link (it is {kind})")
            info = obj_get_info(fd, LinkInfo, f"on link {path}")
        except BaseException:
            close_fd(fd)
            raise
        return cls(_describe(info), fd)

    @property
    def closed(self) -> bool:
        return self.fd < 0 and self.perf_fd < 0

    def info(self) -> LinkInfo:
        """BPF_OBJ_GET_INFO_BY_FD of the link (type, id, prog_id; `.cgroup` for cgroup links)."""
        if self.fd < 0:
            raise ValueError(f"link {self.target} has no BPF link fd (ioctl attach or closed)")
        return obj_get_info(self.fd, LinkInfo, f"on link {self.target}")

    @property
    def id(self) -> int:
        """The kernel's link id (as `bpftool link show` prints)."""
        return int(self.info().id)

    def _link_fd(self, what: str) -> int:
        if self.fd < 0:
            raise ValueError(f"cannot {what} link {self.target}: it has no BPF link fd "
                             "(ioctl attach or closed)")
        return self.fd

    def pin(self, path: str) -> None:
        """Pin the link at `path` on bpffs: it stays attached after every fd is closed,
        until the pin is removed (or `detach()`)."""
        fd = self._link_fd("pin")
        label = f"link {self.target}"
        obj_pin(fd, bpffs.prepare_pin_path(path, label), label)

    def update(self, prog: Program, old: Program | None = None) -> None:
        """BPF_LINK_UPDATE: run `prog` instead, atomically. With `old`, only if the link
        still runs `old` (BPF_F_REPLACE; EPERM otherwise)."""
        attr = LinkUpdateAttr(link_fd=self._link_fd("update"), new_prog_fd=prog.fd,
                              flags=BPF_F_REPLACE if old is not None else 0,
                              old_prog_fd=old.fd if old is not None else 0)
        bpf(Cmd.LINK_UPDATE, attr, f"link {self.target} (program {prog.name!r})")
        self.prog = prog

    def detach(self) -> None:
        """BPF_LINK_DETACH: detach now, even if it is pinned or other fds hold it (they
        then hold a defunct link). The fd stays open until `close()`."""
        bpf(Cmd.LINK_DETACH, LinkDetachAttr(link_fd=self._link_fd("detach")),
            f"link {self.target}")

    def close(self) -> None:
        """Close the link and the perf event: detaches unless pinned."""
        fd, self.fd = self.fd, -1
        perf_fd, self.perf_fd = self.perf_fd, -1
        close_fd(fd)
        close_fd(perf_fd)

    def __repr__(self) -> str:
        return f"<Link {self.target} fd={self.fd} perf_fd={self.perf_fd}>"


def _attach_name(value: int) -> str:
    try:
        return AttachType(value).name.lower()
    except ValueError:
        return f"attach type {value}"


def _describe(info: LinkInfo) -> str:
    if info.type == LinkType.CGROUP:
        return f"cgroup id {info.cgroup.cgroup_id} ({_attach_name(info.cgroup.attach_type)})"
    try:
        kind = LinkType(info.type).name.lower()
    except ValueError:
        kind = f"type {info.type}"
    return f"{kind} link {info.id}"


def attach_perf_event(prog: Program, perf_fd: int, target: str) -> Link:
    """Attach `prog` to an open perf event (taking ownership of `perf_fd`): BPF_LINK_CREATE
    with BPF_PERF_EVENT where the kernel has it (5.15+), else PERF_EVENT_IOC_SET_BPF."""
    try:
        try:
            attr = LinkCreateAttr(prog_fd=prog.fd, target_fd=perf_fd,
                                  attach_type=AttachType.PERF_EVENT)
            link_fd = bpf(Cmd.LINK_CREATE, attr, f"{target} (program {prog.name!r})")
        except BPFError as e:
            if e.errno not in _NO_PERF_LINK:
                raise
            link_fd = -1
            ioctl(perf_fd, PERF_EVENT_IOC_SET_BPF, prog.fd,
                  f"PERF_EVENT_IOC_SET_BPF {target} (program {prog.name!r})")
        ioctl(perf_fd, PERF_EVENT_IOC_ENABLE, 0, f"PERF_EVENT_IOC_ENABLE {target}")
    except BaseException:
        close_fd(perf_fd)
        raise
    return Link(target, link_fd, perf_fd, prog)


def _check_type(prog: Program, want: ProgType, target: str) -> None:
    if prog.prog_type != want:
        raise ValueError(f"cannot attach {prog.prog_type.name.lower()} program {prog.name!r} "
                         f"to {target}: it needs a {want.name.lower()} program")


def attach_tracepoint(prog: Program, category: str, name: str) -> Link:
    """Attach a tracepoint program to `category:name` (e.g. "syscalls", "sys_enter_close").
    The program runs on every CPU; close the Link to detach."""
    target = f"tracepoint {category}:{name}"
    _check_type(prog, ProgType.TRACEPOINT, target)
    attr = PerfEventAttr(type=PERF_TYPE_TRACEPOINT, config=event_id(category, name),
                         sample_period=1, wakeup_events=1)
    # One perf event is enough: a tracepoint's BPF programs run on all CPUs.
    perf_fd = perf_event_open(attr, pid=-1, cpu=0, what=target)
    return attach_perf_event(prog, perf_fd, target)


def attach_raw_tracepoint(prog: Program, name: str) -> Link:
    """Attach a raw_tracepoint program to tracepoint `name` (e.g. "sys_enter")."""
    _check_type(prog, ProgType.RAW_TRACEPOINT, f"raw_tracepoint {name}")
    raw = ctypes.create_string_buffer(name.encode())
    attr = RawTracepointAttr(name=ctypes.addressof(raw), prog_fd=prog.fd)
    fd = bpf(Cmd.RAW_TRACEPOINT_OPEN, attr, f"{name!r} (program {prog.name!r})")
    return Link(f"raw_tracepoint {name}", fd, -1, prog)


def kprobes_supported() -> bool:
    """Whether this kernel has kprobes (the kprobe PMU or tracefs kprobe_events)."""
    if os.path.isdir(KPROBE_PMU):
        return True
    try:
        return os.path.exists(os.path.join(tracefs_root(), "kprobe_events"))
    except OSError:
        return False


def attach_kprobe(prog: Program, symbol: str, offset: int = 0, retprobe: bool = False) -> Link:
    """Attach a kprobe program to kernel function `symbol` (+offset), or its return.
    Raises NotSupportedError on kernels built without kprobes."""
    kind = "kretprobe" if retprobe else "kprobe"
    target = f"{kind} {symbol}+{offset}"
    _check_type(prog, ProgType.KPROBE, target)
    if not kprobes_supported():
        raise NotSupportedError(
            f"kprobes are not supported by this kernel (CONFIG_KPROBES off: no {KPROBE_PMU} and "
            f"no kprobe_events in tracefs); cannot attach {target}; use a tracepoint instead"
        )
    if not os.path.isdir(KPROBE_PMU):
        raise NotSupportedError(f"{target}: this kernel has kprobe_events but no kprobe PMU; "
                                "legacy tracefs kprobes are not implemented")
    with open(os.path.join(KPROBE_PMU, "type")) as f:
        pmu_type = int(f.read())
    config = 0
    if retprobe:
        with open(os.path.join(KPROBE_PMU, "format", "retprobe")) as f:
            bit = int(f.read().strip().split(":")[1])  # "config:0"
        config = 1 << bit
    func = ctypes.create_string_buffer(symbol.encode())
    attr = PerfEventAttr(type=pmu_type, config=config, config1=ctypes.addressof(func),
                         config2=offset, sample_period=1, wakeup_events=1)
    perf_fd = perf_event_open(attr, pid=-1, cpu=0, what=target)
    return attach_perf_event(prog, perf_fd, target)


_SOCK_ADDR_HOOKS = ("INET4_BIND", "INET6_BIND", "INET4_CONNECT", "INET6_CONNECT",
                    "UDP4_SENDMSG", "UDP6_SENDMSG", "UDP4_RECVMSG", "UDP6_RECVMSG",
                    "INET4_GETPEERNAME", "INET6_GETPEERNAME", "INET4_GETSOCKNAME",
                    "INET6_GETSOCKNAME", "UNIX_CONNECT", "UNIX_SENDMSG", "UNIX_RECVMSG",
                    "UNIX_GETPEERNAME", "UNIX_GETSOCKNAME")
#: The program type each cgroup attach type runs.
CGROUP_PROG_TYPES: dict[AttachType, ProgType] = {
    AttachType.CGROUP_INET_INGRESS: ProgType.CGROUP_SKB,
    AttachType.CGROUP_INET_EGRESS: ProgType.CGROUP_SKB,
    AttachType.CGROUP_INET_SOCK_CREATE: ProgType.CGROUP_SOCK,
    AttachType.CGROUP_INET4_POST_BIND: ProgType.CGROUP_SOCK,
    AttachType.CGROUP_INET6_POST_BIND: ProgType.CGROUP_SOCK,
    AttachType.CGROUP_INET_SOCK_RELEASE: ProgType.CGROUP_SOCK,
    AttachType.CGROUP_SOCK_OPS: ProgType.SOCK_OPS,
    AttachType.CGROUP_DEVICE: ProgType.CGROUP_DEVICE,
    AttachType.CGROUP_SYSCTL: ProgType.CGROUP_SYSCTL,
    AttachType.CGROUP_GETSOCKOPT: ProgType.CGROUP_SOCKOPT,
    AttachType.CGROUP_SETSOCKOPT: ProgType.CGROUP_SOCKOPT,
    **{AttachType["CGROUP_" + hook]: ProgType.CGROUP_SOCK_ADDR for hook in _SOCK_ADDR_HOOKS},
}


def attach_cgroup(prog: Program, cgroup: str, attach_type: AttachType | str | int,
                  flags: int = 0) -> Link:
    """Attach `prog` to cgroup v2 directory `cgroup` at hook `attach_type` (e.g.
    "cgroup_inet4_getpeername" or "getpeername4") with BPF_LINK_CREATE. It runs for the
    cgroup and its descendants, next to other programs there. Close the Link to detach, or
    pin it to keep it attached.

    Raises NotCgroup2Error (a ValueError) if `cgroup` is not a cgroup2 directory, ValueError
    for an attach type that is not a cgroup hook or a program of the wrong type."""
    atype = AttachType.parse(attach_type)
    try:
        hook = AttachType(atype)
        want = CGROUP_PROG_TYPES[hook]
    except (ValueError, KeyError):
        raise ValueError(f"attach type {_attach_name(atype)} is not a cgroup hook; "
                         "cgroup hooks: " + ", ".join(t.name.lower() for t in CGROUP_PROG_TYPES)
                         ) from None
    target = f"cgroup {cgroup} ({hook.name.lower()})"
    _check_type(prog, want, target)
    expected = prog.spec.attach_type if prog.spec is not None else None
    if expected is not None and AttachType.parse(expected) != hook:
        raise ValueError(f"cannot attach program {prog.name!r} to {target}: it was loaded "
                         f"with expected_attach_type {_attach_name(AttachType.parse(expected))}")
    cg_fd = open_cgroup(cgroup)
    try:
        attr = LinkCreateAttr(prog_fd=prog.fd, target_fd=cg_fd, attach_type=hook, flags=flags)
        try:
            fd = bpf(Cmd.LINK_CREATE, attr, f"{target} (program {prog.name!r})")
        except BPFError as e:
            if e.errno == errno.EINVAL:
                e.strerror += (" (was the program loaded with expected_attach_type "
                               f"{hook.name.lower()}? are the flags {flags:#x} valid?)")
            raise
    finally:
        close_fd(cg_fd)
    return Link(target, fd, -1, prog)
