"""Attach programs: tracepoints (perf event + BPF link, ioctl fallback), raw tracepoints,
kprobes where the kernel has them. A `Link` detaches when closed."""

from __future__ import annotations

import ctypes
import errno
import os

from ._closing import Closing
from .programs import Program
from .syscall import (
    PERF_EVENT_IOC_ENABLE,
    PERF_EVENT_IOC_SET_BPF,
    AttachType,
    BPFError,
    Cmd,
    LinkCreateAttr,
    LinkInfo,
    NotSupportedError,
    PerfEventAttr,
    ProgType,
    RawTracepointAttr,
    bpf,
    close_fd,
    ioctl,
    obj_get_info,
    perf_event_open,
)
from .tracefs import event_id, tracefs_root

PERF_TYPE_TRACEPOINT = 2
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"
# Errors meaning "this kernel has no BPF_PERF_EVENT links" (524 is the kernel's ENOTSUPP).
_NO_PERF_LINK = {errno.EINVAL, errno.EOPNOTSUPP, 524}


class Link(Closing):
    """An attachment. `fd` is the BPF link fd (or -1 for the ioctl fallback), `perf_fd`
    the perf event if any. Closing detaches; a context manager."""

    def __init__(self, target: str, fd: int, perf_fd: int = -1, prog: Program | None = None):
        self.target = target
        self.fd = fd
        self.perf_fd = perf_fd
        self.prog = prog

    @property
    def closed(self) -> bool:
        return self.fd < 0 and self.perf_fd < 0

    def info(self) -> LinkInfo:
        """BPF_OBJ_GET_INFO_BY_FD of the link (type, id, prog_id)."""
        if self.fd < 0:
            raise ValueError(f"link {self.target} has no BPF link fd (ioctl attach or closed)")
        return obj_get_info(self.fd, LinkInfo, f"on link {self.target}")

    def close(self) -> None:
        """Detach: close the link and the perf event."""
        fd, self.fd = self.fd, -1
        perf_fd, self.perf_fd = self.perf_fd, -1
        close_fd(fd)
        close_fd(perf_fd)


    def __repr__(self) -> str:
        return f"<Link {self.target} fd={self.fd} perf_fd={self.perf_fd}>"


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
