"""What the tracer's BPF programs and user space agree on, and what the kernel tells both.

* the record every program emits (:data:`RECORD`, its kinds :class:`EventKind`) and the
  values of the maps the programs keep (:data:`STASH_VALUE`, :data:`TRACKED_KEY`,
  :data:`TRACKED_VALUE`, :data:`CONFIG_VALUE`);
* where the running kernel keeps the struct fields the programs read (:class:`KernelLayout`,
  from BTF) and the tracepoint arguments (:class:`TracepointArgs`, from tracefs).

The programs themselves, and the specs of the maps they use, are in
:mod:`ebpfrouter.tracer_programs`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from bpf_asm.btf import BTF, BTFError, FieldLocation
from bpf_asm.tracefs import EventFormat, event_format

__all__ = [
    "CONFIG_AGE",
    "CONFIG_FILTER_REMOTE",
    "CONFIG_VALUE",
    "COUNT_VALUE",
    "EAGER_ACCEPT",
    "EAGER_CONNECT",
    "EAGER_KEY",
    "EAGER_PEER_KEY",
    "FLAG_AGED",
    "FLAG_FORKED",
    "FLAG_STOPPED",
    "EventKind",
    "KernelLayout",
    "RECORD",
    "RECORD_SIZE",
    "STASH_VALUE",
    "SYSCALLS",
    "SYSCALL_KIND",
    "TRACKED_KEY",
    "TRACKED_VALUE",
    "TracepointArgs",
]


class EventKind(IntEnum):
    """What a record reports."""

    LISTEN = 1
    ACCEPT = 2
    CONNECT = 3
    CLOSE = 4
    EXIT = 5
    FORK = 6  # arg: the child's pid (a process, or a thread of the same process)
    EXEC = 7


#: The syscalls traced, enter and exit each, and what each one's record reports.
SYSCALLS = ("listen", "accept", "accept4", "connect", "close")
SYSCALL_KIND = {
    "listen": EventKind.LISTEN,
    "accept": EventKind.ACCEPT,
    "accept4": EventKind.ACCEPT,
    "connect": EventKind.CONNECT,
    "close": EventKind.CLOSE,
}


# ----------------------------------------------------------------------------- records
#
# The record every program emits (native byte order, 88 bytes):
#   0 u32 kind      4 u32 pid (tgid)    8 u32 tid        12 s32 fd
#  16 u32 netns    20 s32 arg (accept: listening fd; fork: child pid; else -1)
#  24 u64 sock_ino  32 s64 ret          40 u64 ktime_ns
#  48 u16 family   50 u16 lport (host order)  52 u16 rport (network order)
#  54 u16 flags (FLAG_STOPPED: the program stopped the caller for the eager swap)
#  56 u8 laddr[16] 72 u8 raddr[16]      (IPv4: first 4 bytes)
RECORD = struct.Struct("=IIIiIiQqQHHHH16s16s")
RECORD_SIZE = RECORD.size
OFF_KIND, OFF_PID, OFF_TID, OFF_FD, OFF_NETNS, OFF_ARG = 0, 4, 8, 12, 16, 20
OFF_INO, OFF_RET, OFF_TS = 24, 32, 40
OFF_FAMILY, OFF_LPORT, OFF_RPORT, OFF_FLAGS = 48, 50, 52, 54
OFF_LADDR, OFF_RADDR = 56, 72
assert RECORD_SIZE == 88

FLAG_STOPPED = 1
#: the record lived in ``young`` until user space found it `age` old (no min_age wait left)
FLAG_AGED = 2
#: the record comes out of ``young`` at its close because its process forked meanwhile: the
#: socket may live on in the child (the close record that follows carries the flag too)
FLAG_FORKED = 4
#: config flags: report connects/accepts only with a peer in ``remote_pods``; keep them in
#: ``young`` until user space finds them old enough (a young close is forgotten, no event)
CONFIG_FILTER_REMOTE, CONFIG_AGE = 1, 2
#: eager_listeners value bits: stop a connect to it (a peer's listener), an accept on it (ours)
EAGER_CONNECT, EAGER_ACCEPT = 1, 2
#: eager_listeners key: u16 family, u16 port (host order), u8 addr[16] (IPv4: first 4 bytes)
EAGER_KEY = struct.Struct("=HH16s")
#: eager_peers key (LPM trie): u32 prefix length, u8 addr[16] (IPv4 v4-mapped, /96 + n)
EAGER_PEER_KEY = struct.Struct("=I16s")
#: stash value: u32 fd, u32 kind, u32 netns, u32 config flags (key: u64 pid_tgid)
STASH_VALUE = struct.Struct("=IIII")
#: tracked key: u32 pid, s32 fd
TRACKED_KEY = struct.Struct("=Ii")
#: tracked value: u64 socket inode, u32 netns, u32 pad
TRACKED_VALUE = struct.Struct("=QII")
#: config value (array map, key 0): u64 host netns inode (0 = trace every namespace),
#: u64 records dropped because the perf/ring buffer was full (counted by the programs),
#: u64 flags (CONFIG_*), u64 connections closed young and forgotten in the kernel
CONFIG_VALUE = struct.Struct("=QQQQ")
#: young_closes value: u64 accepted connections closed young (key: EAGER_KEY of the listener)
COUNT_VALUE = struct.Struct("=Q")


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class KernelLayout:
    """The struct fields the programs read, located in the running kernel's BTF."""

    task_files: FieldLocation
    task_nsproxy: FieldLocation
    files_fdt: FieldLocation
    fdt_max_fds: FieldLocation
    fdt_fd: FieldLocation
    file_f_inode: FieldLocation
    file_private_data: FieldLocation
    inode_i_mode: FieldLocation
    inode_i_ino: FieldLocation
    socket_sk: FieldLocation
    nsproxy_net_ns: FieldLocation
    net_inum: FieldLocation
    sk_family: FieldLocation
    sk_type: FieldLocation
    sk_protocol: FieldLocation
    sk_num: FieldLocation
    sk_dport: FieldLocation
    sk_rcv_saddr: FieldLocation
    sk_daddr: FieldLocation
    sk_v6_rcv_saddr: FieldLocation | None
    sk_v6_daddr: FieldLocation | None
    pointer_size: int

    @classmethod
    def from_btf(cls, btf: BTF | None = None) -> KernelLayout:
        """Resolve every field from ``btf`` (default: the running kernel's)."""
        btf = btf or BTF.vmlinux()
        r = btf.resolve

        def optional(path: str) -> FieldLocation | None:
            try:
                return r(path)
            except BTFError:
                return None  # e.g. a kernel built without IPv6

        # ns_common moved around over the years; net.ns.inum is the stable spelling, but
        # fall back to the older proc_inum if this kernel predates ns_common.
        net_inum = optional("net.ns.inum") or r("net.proc_inum")
        return cls(
            task_files=r("task_struct.files"),
            task_nsproxy=r("task_struct.nsproxy"),
            files_fdt=r("files_struct.fdt"),
            fdt_max_fds=r("fdtable.max_fds"),
            fdt_fd=r("fdtable.fd"),
            file_f_inode=r("file.f_inode"),
            file_private_data=r("file.private_data"),
            inode_i_mode=r("inode.i_mode"),
            inode_i_ino=r("inode.i_ino"),
            socket_sk=r("socket.sk"),
            nsproxy_net_ns=r("nsproxy.net_ns"),
            net_inum=net_inum,
            sk_family=r("sock.__sk_common.skc_family"),
            sk_type=r("sock.sk_type"),
            sk_protocol=r("sock.sk_protocol"),
            sk_num=r("sock.__sk_common.skc_num"),
            sk_dport=r("sock.__sk_common.skc_dport"),
            sk_rcv_saddr=r("sock.__sk_common.skc_rcv_saddr"),
            sk_daddr=r("sock.__sk_common.skc_daddr"),
            sk_v6_rcv_saddr=optional("sock.__sk_common.skc_v6_rcv_saddr"),
            sk_v6_daddr=optional("sock.__sk_common.skc_v6_daddr"),
            pointer_size=btf.pointer_size,
        )


@dataclass(frozen=True)
class TracepointArgs:
    """Offsets (and sizes) of the tracepoint arguments the programs read, from tracefs."""

    enter_fd: dict[str, tuple[int, int]]  # syscall -> (offset, size) of its fd argument
    exit_ret: dict[str, tuple[int, int]]  # syscall -> (offset, size) of ret
    group_dead: tuple[int, int] | None  # sched_process_exit.group_dead, if present
    fork_child_pid: tuple[int, int]  # sched_process_fork.child_pid

    @classmethod
    def from_tracefs(cls, formats: dict[str, EventFormat] | None = None) -> TracepointArgs:
        """Read the ``format`` files (or use ``formats``, keyed by "category:name")."""
        formats = dict(formats or {})

        def fmt(category: str, name: str) -> EventFormat:
            key = f"{category}:{name}"
            if key not in formats:
                formats[key] = event_format(category, name)
            return formats[key]

        enter, exit_ = {}, {}
        for sc in SYSCALLS:
            f = fmt("syscalls", f"sys_enter_{sc}").field("fd")
            enter[sc] = (f.offset, f.size)
            r = fmt("syscalls", f"sys_exit_{sc}").field("ret")
            exit_[sc] = (r.offset, r.size)
        pexit = fmt("sched", "sched_process_exit")
        try:
            g = pexit.field("group_dead")
            group_dead: tuple[int, int] | None = (g.offset, g.size)
        except KeyError:
            group_dead = None
        c = fmt("sched", "sched_process_fork").field("child_pid")
        return cls(enter, exit_, group_dead, (c.offset, c.size))
