"""The bpf(2) system call through ctypes: commands, attribute structs, errors, verifier log.

Only this module (and `perf_event_open`, `mount`, `mmap` wrappers below) talks to the kernel
directly; maps, programs, attach and the readers build on it. Every failure becomes a
`BPFError` that names the command, the object and the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as _errno
import os
import platform
from typing import TypeVar

__all__ = [
    "BPFError",
    "VerifierError",
    "NotSupportedError",
    "Cmd",
    "MapType",
    "ProgType",
    "AttachType",
    "LinkType",
    "bpf",
    "perf_event_open",
    "obj_get_info",
    "obj_pin",
    "obj_get",
    "libc",
    "possible_cpus",
    "online_cpus",
    "parse_cpu_list",
]

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
libc.mount.argtypes = [
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
]

# System call numbers per architecture: (bpf, perf_event_open).
_SYSCALLS = {"x86_64": (321, 298), "aarch64": (280, 241), "arm64": (280, 241)}
try:
    _NR_BPF, _NR_PERF_EVENT_OPEN = _SYSCALLS[platform.machine()]
except KeyError:  # pragma: no cover - other architectures
    raise ImportError(f"bpf_asm: unsupported architecture {platform.machine()!r}") from None


class BPFError(OSError):
    """A bpf(2) (or perf/tracefs) operation failed; `.op` names the operation and object."""

    errno: int  # always set (OSError's may be None)
    strerror: str

    def __init__(self, err: int, op: str, hint: str = "") -> None:
        text = f"{op}: {os.strerror(err)}"
        if hint:
            text += f" ({hint})"
        super().__init__(err, text)
        self.op = op


class VerifierError(BPFError):
    """The verifier rejected a program. The message shows the log's tail; `.log` has all."""

    TAIL_LINES = 12

    def __init__(self, err: int, op: str, log: str) -> None:
        self.log = log
        tail = _log_tail(log, self.TAIL_LINES)
        super().__init__(err, op)
        self.strerror = f"{op}: {os.strerror(err)}; verifier log (last lines):\n{tail}"


class NotSupportedError(BPFError):
    """The running kernel lacks a feature (e.g. kprobes)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EOPNOTSUPP, message)
        self.strerror = message


def _log_tail(log: str, n: int) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip()]
    # The verifier's summary line ("processed N insns ...") is noise after an error.
    while lines and lines[-1].startswith("processed "):
        lines.pop()
    return "\n".join("  " + ln for ln in lines[-n:]) or "  (empty log)"


class Cmd(enum.IntEnum):
    """bpf(2) commands (enum bpf_cmd)."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    RAW_TRACEPOINT_OPEN = 17
    BTF_LOAD = 18
    BTF_GET_FD_BY_ID = 19
    TASK_FD_QUERY = 20
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_FREEZE = 22
    BTF_GET_NEXT_ID = 23
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    LINK_DETACH = 34


class MapType(enum.IntEnum):
    """Map types (enum bpf_map_type)."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33

    @classmethod
    def parse(cls, value: str | int | MapType) -> MapType:
        """Accept a MapType, its number, or a name such as "hash" / "percpu_array"."""
        return _parse_enum(cls, value, "map type")


class ProgType(enum.IntEnum):
    """Program types (enum bpf_prog_type)."""

    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31
    NETFILTER = 32

    @classmethod
    def parse(cls, value: str | int | ProgType) -> ProgType:
        """Accept a ProgType, its number, or a name such as "tracepoint" / "xdp"."""
        return _parse_enum(cls, value, "program type")


class AttachType(enum.IntEnum):
    """Attach types (enum bpf_attach_type); only the ones this package uses by name.

    Names are the kernel's without `BPF_` (`CGROUP_INET4_GETPEERNAME`); `parse` also takes
    bpftool's short names for the cgroup hooks (`getpeername4`, `connect6`, `ingress`)."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    CGROUP_DEVICE = 6
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_SYSCTL = 18
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    TRACE_RAW_TP = 23
    TRACE_FENTRY = 24
    TRACE_FEXIT = 25
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    CGROUP_INET_SOCK_RELEASE = 34
    XDP = 37
    PERF_EVENT = 41
    TRACE_KPROBE_MULTI = 42
    CGROUP_UNIX_CONNECT = 49
    CGROUP_UNIX_SENDMSG = 50
    CGROUP_UNIX_RECVMSG = 51
    CGROUP_UNIX_GETPEERNAME = 52
    CGROUP_UNIX_GETSOCKNAME = 53

    @classmethod
    def parse(cls, value: str | int | AttachType) -> int:
        """Accept an AttachType, any number, or a known name."""
        if isinstance(value, int):
            return int(value)
        return _parse_enum(cls, value, "attach type", _ATTACH_ALIASES)


# bpftool's names for the cgroup hooks (`bpftool cgroup attach CGROUP getpeername4 ...`).
_ATTACH_ALIASES = {
    "ingress": "cgroup_inet_ingress", "egress": "cgroup_inet_egress",
    "sock_create": "cgroup_inet_sock_create", "sock_ops": "cgroup_sock_ops",
    "device": "cgroup_device", "sysctl": "cgroup_sysctl",
    "getsockopt": "cgroup_getsockopt", "setsockopt": "cgroup_setsockopt",
    "sock_release": "cgroup_inet_sock_release",
    **{f"{hook}{v}": f"cgroup_inet{v}_{hook}"
       for hook in ("bind", "connect", "post_bind", "getpeername", "getsockname")
       for v in (4, 6)},
    **{f"{hook}{v}": f"cgroup_udp{v}_{hook}" for hook in ("sendmsg", "recvmsg") for v in (4, 6)},
    **{f"{hook}_unix": f"cgroup_unix_{hook}"
       for hook in ("connect", "sendmsg", "recvmsg", "getpeername", "getsockname")},
}


class LinkType(enum.IntEnum):
    """BPF link types (enum bpf_link_type), as `BPF_OBJ_GET_INFO_BY_FD` reports them."""

    UNSPEC = 0
    RAW_TRACEPOINT = 1
    TRACING = 2
    CGROUP = 3
    ITER = 4
    NETNS = 5
    XDP = 6
    PERF_EVENT = 7
    KPROBE_MULTI = 8
    STRUCT_OPS = 9
    NETFILTER = 10
    TCX = 11
    UPROBE_MULTI = 12
    NETKIT = 13
    SOCKMAP = 14


_ALIASES = {"ring_buffer": "ringbuf", "raw_tp": "raw_tracepoint"}
_E = TypeVar("_E", bound=enum.IntEnum)


def _parse_enum(cls: type[_E], value: str | int, what: str,
                aliases: dict[str, str] = _ALIASES) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, int):
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value}") from None
    key = str(value).strip().lower().replace("-", "_")
    key = aliases.get(key, key)
    try:
        return cls[key.upper()]
    except KeyError:
        known = ", ".join(m.name.lower() for m in cls)
        raise ValueError(f"unknown {what} {value!r}; known: {known}") from None


# --- attribute structs (union bpf_attr members) -------------------------------------------

_u32, _u64, _s32 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int32


class MapCreateAttr(ctypes.Structure):
    """BPF_MAP_CREATE."""

    _fields_ = [
        ("map_type", _u32), ("key_size", _u32), ("value_size", _u32), ("max_entries", _u32),
        ("map_flags", _u32), ("inner_map_fd", _u32), ("numa_node", _u32),
        ("map_name", ctypes.c_char * 16), ("map_ifindex", _u32), ("btf_fd", _u32),
        ("btf_key_type_id", _u32), ("btf_value_type_id", _u32),
        ("btf_vmlinux_value_type_id", _u32), ("map_extra", _u64),
    ]


class MapElemAttr(ctypes.Structure):
    """BPF_MAP_{LOOKUP,UPDATE,DELETE}_ELEM, BPF_MAP_GET_NEXT_KEY."""

    _fields_ = [("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64)]


class MapBatchAttr(ctypes.Structure):
    """BPF_MAP_{LOOKUP,LOOKUP_AND_DELETE,UPDATE,DELETE}_BATCH."""

    _fields_ = [("in_batch", _u64), ("out_batch", _u64), ("keys", _u64), ("values", _u64),
                ("count", _u32), ("map_fd", _u32), ("elem_flags", _u64), ("flags", _u64)]


class ProgLoadAttr(ctypes.Structure):
    """BPF_PROG_LOAD."""

    _fields_ = [
        ("prog_type", _u32), ("insn_cnt", _u32), ("insns", _u64), ("license", _u64),
        ("log_level", _u32), ("log_size", _u32), ("log_buf", _u64), ("kern_version", _u32),
        ("prog_flags", _u32), ("prog_name", ctypes.c_char * 16), ("prog_ifindex", _u32),
        ("expected_attach_type", _u32), ("prog_btf_fd", _u32), ("func_info_rec_size", _u32),
        ("func_info", _u64), ("func_info_cnt", _u32), ("line_info_rec_size", _u32),
        ("line_info", _u64), ("line_info_cnt", _u32), ("attach_btf_id", _u32),
        ("attach_prog_fd", _u32), ("core_relo_cnt", _u32), ("fd_array", _u64),
        ("core_relos", _u64), ("core_relo_rec_size", _u32), ("log_true_size", _u32),
    ]


class ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN, BPF_OBJ_GET."""

    _fields_ = [("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32)]


class GetIdAttr(ctypes.Structure):
    """BPF_*_GET_NEXT_ID, BPF_*_GET_FD_BY_ID."""

    _fields_ = [("id", _u32), ("next_id", _u32), ("open_flags", _u32)]


class InfoAttr(ctypes.Structure):
    """BPF_OBJ_GET_INFO_BY_FD."""

    _fields_ = [("bpf_fd", _u32), ("info_len", _u32), ("info", _u64)]


class RawTracepointAttr(ctypes.Structure):
    """BPF_RAW_TRACEPOINT_OPEN."""

    _fields_ = [("name", _u64), ("prog_fd", _u32), ("cookie", _u64)]


class LinkCreateAttr(ctypes.Structure):
    """BPF_LINK_CREATE (perf_event flavour: bpf_cookie follows flags)."""

    _fields_ = [
        ("prog_fd", _u32), ("target_fd", _u32), ("attach_type", _u32), ("flags", _u32),
        ("bpf_cookie", _u64),
    ]


class LinkUpdateAttr(ctypes.Structure):
    """BPF_LINK_UPDATE (old_prog_fd checked only with BPF_F_REPLACE)."""

    _fields_ = [("link_fd", _u32), ("new_prog_fd", _u32), ("flags", _u32),
                ("old_prog_fd", _u32)]


class LinkDetachAttr(ctypes.Structure):
    """BPF_LINK_DETACH."""

    _fields_ = [("link_fd", _u32)]


class TestRunAttr(ctypes.Structure):
    """BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest class
    _fields_ = [
        ("prog_fd", _u32), ("retval", _u32), ("data_size_in", _u32), ("data_size_out", _u32),
        ("data_in", _u64), ("data_out", _u64), ("repeat", _u32), ("duration", _u32),
        ("ctx_size_in", _u32), ("ctx_size_out", _u32), ("ctx_in", _u64), ("ctx_out", _u64),
        ("flags", _u32), ("cpu", _u32), ("batch_size", _u32),
    ]


class MapInfo(ctypes.Structure):
    """struct bpf_map_info."""

    _fields_ = [
        ("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
        ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * 16),
        ("ifindex", _u32), ("btf_vmlinux_value_type_id", _u32), ("netns_dev", _u64),
        ("netns_ino", _u64), ("btf_id", _u32), ("btf_key_type_id", _u32),
        ("btf_value_type_id", _u32), ("btf_vmlinux_id", _u32), ("map_extra", _u64),
    ]


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (up to verified_insns)."""

    _fields_ = [
        ("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32), ("jited_prog_insns", _u64), ("xlated_prog_insns", _u64),
        ("load_time", _u64), ("created_by_uid", _u32), ("nr_map_ids", _u32), ("map_ids", _u64),
        ("name", ctypes.c_char * 16), ("ifindex", _u32), ("gpl_compatible", _u32),
        ("netns_dev", _u64), ("netns_ino", _u64), ("nr_jited_ksyms", _u32),
        ("nr_jited_func_lens", _u32), ("jited_ksyms", _u64), ("jited_func_lens", _u64),
        ("btf_id", _u32), ("func_info_rec_size", _u32), ("func_info", _u64),
        ("nr_func_info", _u32), ("nr_line_info", _u32), ("line_info", _u64),
        ("jited_line_info", _u64), ("nr_jited_line_info", _u32), ("line_info_rec_size", _u32),
        ("jited_line_info_rec_size", _u32), ("nr_prog_tags", _u32), ("prog_tags", _u64),
        ("run_time_ns", _u64), ("run_cnt", _u64), ("recursion_misses", _u64),
        ("verified_insns", _u32),
    ]


class CgroupLinkInfo(ctypes.Structure):
    """The `cgroup` member of struct bpf_link_info's union."""

    _fields_ = [("cgroup_id", _u64), ("attach_type", _u32), ("_pad", _u32)]


class _LinkInfoUnion(ctypes.Union):
    _fields_ = [("raw", ctypes.c_uint8 * 48), ("cgroup", CgroupLinkInfo)]


class LinkInfo(ctypes.Structure):
    """struct bpf_link_info: the common header, and the per-type union (`.cgroup` read for
    cgroup links, where `cgroup_id` is the inode number of the cgroup's directory)."""

    _anonymous_ = ("_union",)
    _fields_ = [("type", _u32), ("id", _u32), ("prog_id", _u32), ("_pad", _u32),
                ("_union", _LinkInfoUnion)]


# --- calls ----------------------------------------------------------------------------------


def bpf(cmd: Cmd, attr: ctypes.Structure, what: str = "") -> int:
    """Run bpf(cmd, &attr); return the result or raise BPFError naming `cmd` and `what`."""
    ret = libc.syscall(_NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr),
                       ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        op = f"BPF_{Cmd(cmd).name}" + (f" {what}" if what else "")
        raise BPFError(err, op)
    return int(ret)


_Info = TypeVar("_Info", bound=ctypes.Structure)


def obj_get_info(fd: int, info_type: type[_Info], what: str = "") -> _Info:
    """BPF_OBJ_GET_INFO_BY_FD into a fresh `info_type` struct."""
    info = info_type()
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    bpf(Cmd.OBJ_GET_INFO_BY_FD, attr, what)
    return info


def obj_pin(fd: int, path: str, what: str = "") -> None:
    """BPF_OBJ_PIN `fd` at `path` (which must be on a bpf filesystem)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    bpf(Cmd.OBJ_PIN, ObjAttr(pathname=ctypes.addressof(raw), bpf_fd=fd),
        f"{what} at {path}".strip())


def obj_get(path: str, flags: int = 0) -> int:
    """BPF_OBJ_GET: open a pinned object; returns a new fd."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return bpf(Cmd.OBJ_GET, ObjAttr(pathname=ctypes.addressof(raw), file_flags=flags), path)


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr (PERF_ATTR_SIZE_VER8, 136 bytes); flags as one bit field word."""

    _fields_ = [
        ("type", _u32), ("size", _u32), ("config", _u64), ("sample_period", _u64),
        ("sample_type", _u64), ("read_format", _u64), ("flags", _u64), ("wakeup_events", _u32),
        ("bp_type", _u32), ("config1", _u64), ("config2", _u64), ("branch_sample_type", _u64),
        ("sample_regs_user", _u64), ("sample_stack_user", _u32), ("clockid", _s32),
        ("sample_regs_intr", _u64), ("aux_watermark", _u32), ("sample_max_stack", ctypes.c_uint16),
        ("_reserved_2", ctypes.c_uint16), ("aux_sample_size", _u32), ("_reserved_3", _u32),
        ("sig_data", _u64), ("config3", _u64),
    ]


PERF_FLAG_FD_CLOEXEC = 8
PERF_ATTR_FLAG_DISABLED = 1 << 0
PERF_ATTR_FLAG_WATERMARK = 1 << 14
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_DISABLE = 0x2401
PERF_EVENT_IOC_SET_BPF = 0x40042408


def perf_event_open(attr: PerfEventAttr, pid: int, cpu: int, what: str,
                    group_fd: int = -1) -> int:
    """perf_event_open(2) with FD_CLOEXEC; raises BPFError naming `what`."""
    attr.size = ctypes.sizeof(PerfEventAttr)
    ret = libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), ctypes.c_int(pid),
                       ctypes.c_int(cpu), ctypes.c_int(group_fd),
                       ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if ret < 0:
        raise BPFError(ctypes.get_errno(), f"perf_event_open {what}")
    return int(ret)


def ioctl(fd: int, request: int, arg: int, what: str) -> int:
    """ioctl(2) with an integer argument; raises BPFError naming `what`."""
    ret = libc.ioctl(fd, request, arg)
    if ret < 0:
        raise BPFError(ctypes.get_errno(), what)
    return int(ret)


def mount(source: str, target: str, fstype: str, data: str = "") -> None:
    """mount(2); raises BPFError naming the file system and target."""
    ret = libc.mount(source.encode(), target.encode(), fstype.encode(), 0,
                     data.encode() if data else None)
    if ret < 0:
        raise BPFError(ctypes.get_errno(), f"mount {fstype} at {target}")


# f_type values of statfs(2) (linux/magic.h).
CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB
BPF_FS_MAGIC = 0xCAFE4A11
TMPFS_MAGIC = 0x01021994


def fstatfs_type(fd: int, what: str = "") -> int:
    """The file system type (`f_type`, a *_MAGIC number) of the file open at `fd`."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.fstatfs(fd, buf) < 0:
        raise BPFError(ctypes.get_errno(), f"fstatfs {what or fd}")
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def mount_point(fstype: str, preferred: str | None = None) -> str | None:
    """Where a file system of `fstype` is mounted (`preferred` if it is one of them)."""
    found: list[str] = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == fstype:
                found.append(parts[1].replace("\\040", " "))
    if preferred is not None and preferred in found:
        return preferred
    return found[0] if found else None


def parse_cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as "0-3,5"."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def possible_cpus() -> list[int]:
    """CPUs the kernel could ever bring online (sizes per-CPU maps)."""
    with open("/sys/devices/system/cpu/possible") as f:
        return parse_cpu_list(f.read())


def online_cpus() -> list[int]:
    """CPUs online now (where perf rings can be opened)."""
    with open("/sys/devices/system/cpu/online") as f:
        return parse_cpu_list(f.read())


def close_fd(fd: int) -> None:
    """Close `fd` if it is valid, ignoring EBADF."""
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_obj_name(name: str, what: str) -> bytes:
    """Validate a BPF object name (<= 15 chars of [A-Za-z0-9_.]); returns it encoded."""
    if len(name) > 15:
        raise ValueError(f"{what} name {name!r} is longer than 15 characters")
    if any(not (c.isascii() and (c.isalnum() or c in "_.")) for c in name):
        raise ValueError(f"{what} name {name!r} may only contain letters, digits, '_' and '.'")
    return name.encode()
