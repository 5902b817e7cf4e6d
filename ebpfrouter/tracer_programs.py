"""The socket tracer's BPF programs, generated with `bpf_asm.Builder` (no clang).

Thirteen tracepoint programs watch ``listen``, ``accept``, ``accept4``, ``connect`` and
``close`` (enter and exit each) and ``sched_process_{exit,fork,exec}``. Every struct offset
comes from the kernel's BTF (:class:`KernelLayout`) and every tracepoint argument offset from
tracefs (:class:`TracepointArgs`), so nothing here depends on a kernel version; the records
and map values they write are laid out in :mod:`ebpfrouter.tracer_layout`. The maps they use
are specs here (:func:`map_specs`), referenced by name and made by the Tracer.

Flow of one traced syscall:

* **enter** (listen/accept/accept4/connect): read the caller's network namespace inode
  (``task->nsproxy->net_ns->ns.inum``); if it is the host's (``config`` map) do nothing,
  else stash ``{fd, kind, netns}`` in ``stash`` under the thread's ``pid_tgid``.
* **exit**: take the stash entry back (a thread is in one syscall at a time), check the
  return value (listen: 0; accept: a new fd; connect: 0 or -EINPROGRESS), find the
  socket behind the fd (``task->files->fdt->fd[fd]``, a file whose inode is ``S_IFSOCK``,
  ``file->private_data`` is the ``struct socket``, ``socket->sk`` the ``struct sock``),
  keep only TCP (family AF_INET/AF_INET6, type SOCK_STREAM, protocol IPPROTO_TCP), emit a
  record and remember ``(pid, fd) -> (inode, netns)`` in ``tracked``; ``pids`` notes the
  process has tracked sockets.
* **close**: enter stashes only fds found in ``tracked``; exit emits and forgets them.
* **process exit**: when the whole thread group is gone (``group_dead`` where the
  tracepoint has it, else the leader's exit) and the process is in ``pids``, emit.
  User space then drops the process's ``tracked`` entries (a BPF program cannot cheaply
  walk a hash map; the maps are LRU so nothing can fill them up for good).
* **fork**: a process in ``pids`` forks (or makes a thread: the tracepoint cannot tell, user
  space can): emit the child's pid in ``arg`` and add the child to ``pids``, so its exit is
  reported even if it exits before user space has tracked the fds it inherited.
* **exec**: a process in ``pids`` execs (its close-on-exec fds are gone without a close):
  emit, so user space can check which of its tracked fds survived.

The socket inode is read as ``file->f_inode->i_ino``: that works for any file, needs no
assumption that ``struct socket`` is embedded in ``struct socket_alloc`` next to its inode
(an internal detail of net/socket.c), and the same ``f_inode`` read gives ``i_mode`` to
check that the fd is a socket at all before ``private_data`` is trusted as one.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from bpf_asm.btf import FieldLocation
from bpf_asm.builder import Builder
from bpf_asm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10, Instructions, Reg
from bpf_asm.maps import MapSpec
from bpf_asm.relocate import MapFd

from .tracer_layout import (
    CONFIG_AGE,
    CONFIG_FILTER_REMOTE,
    CONFIG_VALUE,
    COUNT_VALUE,
    EAGER_ACCEPT,
    EAGER_CONNECT,
    EAGER_KEY,
    EAGER_PEER_KEY,
    FLAG_AGED,
    FLAG_FORKED,
    FLAG_STOPPED,
    OFF_ARG,
    OFF_FAMILY,
    OFF_FD,
    OFF_FLAGS,
    OFF_INO,
    OFF_KIND,
    OFF_LADDR,
    OFF_LPORT,
    OFF_NETNS,
    OFF_PID,
    OFF_RADDR,
    OFF_RET,
    OFF_RPORT,
    OFF_TID,
    OFF_TS,
    RECORD_SIZE,
    STASH_VALUE,
    SYSCALL_KIND,
    SYSCALLS,
    TRACKED_KEY,
    TRACKED_VALUE,
    EventKind,
    KernelLayout,
    TracepointArgs,
)

__all__ = ["MAX_TRACKED", "RING_SIZE", "TRACEPOINTS", "EventKind", "ProgramDef", "events_spec",
           "generate_programs", "map_specs"]


# ----------------------------------------------------------------------------- maps
#
# The maps the programs reference by name (``b.ld_map_fd(R1, "stash")``), as plain specs;
# the Tracer makes the kernel objects (``MapSpec.load()``) and builds the programs with them.
# The hash maps are LRU, so nothing can fill them up for good.

MAX_TRACKED = 65536  # entries of stash, tracked and pids (the daemon's default)
MAX_EAGER_LISTENERS = 16384
MAX_EAGER_PEERS = 1024
MAX_STOPS = 16384
MAX_REMOTE_PODS = 4096  # remote pod CIDRs (one or two per node)
MAX_COUNTED_LISTENERS = 4096  # listeners whose young closes are counted
RING_SIZE = 1 << 20  # bytes of the events ring buffer


def events_spec(ringbuf: bool = True, ring_size: int = RING_SIZE) -> MapSpec:
    """``events``, where every record goes: a BPF ring buffer of ``ring_size`` bytes, or
    (``ringbuf=False``, kernels before 5.8) a perf event array with one ring per CPU."""
    if ringbuf:
        return MapSpec("ringbuf", max_entries=ring_size, name="er_events")
    return MapSpec("perf_event_array", name="er_events")


def map_specs(
    max_tracked: int = MAX_TRACKED, ring_size: int = RING_SIZE, *, ringbuf: bool = True
) -> dict[str, MapSpec]:
    """Every map the programs use, under the name they use it by (fresh specs each call).

    * ``config`` (array, one entry): host netns inode and the dropped-records counter
      (:data:`CONFIG_VALUE`);
    * ``stash`` (pid_tgid -> :data:`STASH_VALUE`): a syscall's enter, waiting for its exit;
    * ``tracked`` (:data:`TRACKED_KEY` -> :data:`TRACKED_VALUE`): the sockets being followed;
    * ``pids`` (u32 pid -> u32 1): processes with tracked sockets (their exit and forks count);
    * ``eager_listeners`` (:data:`EAGER_KEY` -> u32 flags): overlay listeners whose new
      connections are stopped at `connect()` return (:data:`EAGER_CONNECT`: a peer's
      announced listener) or `accept()` return (:data:`EAGER_ACCEPT`: ours), kept by the
      daemon;
    * ``eager_peers`` (LPM trie, :data:`EAGER_PEER_KEY` -> u32 1): remote pod CIDRs served by a
      live peer router (IPv4 as v4-mapped); an accept is stopped only from one of them;
    * ``stops`` (u32 pid -> u64 ktime): processes a program stopped that the daemon has not
      resumed yet (the guardian resumes them if the daemon dies);
    * ``remote_pods`` (LPM trie, :data:`EAGER_PEER_KEY` -> u32 1): other nodes' pod CIDRs; with
      :data:`CONFIG_FILTER_REMOTE` a connect or accept whose peer is not in them, or whose own
      address is, is not reported (nor tracked);
    * ``young`` (:data:`TRACKED_KEY` -> the record): with :data:`CONFIG_AGE`, connects and
      accepts wait here instead of the ring until user space finds them old enough (and takes
      them out); a close finding its record here deletes it, and nothing is reported;
    * ``young_closes`` (:data:`EAGER_KEY` of a listener -> :data:`COUNT_VALUE`): its accepted
      connections closed young (how user space learns which listeners serve short ones);
    * ``forks`` (u32 pid -> u64 ktime): the last fork of each process in ``pids`` (a young
      socket older than that may live on in the child: its close reports it);
    * ``events``: see :func:`events_spec`.
    """
    return {
        "config": MapSpec("array", 4, CONFIG_VALUE.size, 1, name="er_config"),
        "stash": MapSpec("lru_hash", 8, STASH_VALUE.size, max_tracked, name="er_stash"),
        "tracked": MapSpec(
            "lru_hash", TRACKED_KEY.size, TRACKED_VALUE.size, max_tracked, name="er_tracked"
        ),
        "pids": MapSpec("lru_hash", 4, 4, max_tracked, name="er_pids"),
        "eager_listeners": MapSpec("hash", EAGER_KEY.size, 4, MAX_EAGER_LISTENERS,
                                   name="er_eager_lst"),
        "eager_peers": MapSpec("lpm_trie", EAGER_PEER_KEY.size, 4, MAX_EAGER_PEERS,
                               name="er_eager_peer"),
        "stops": MapSpec("hash", 4, 8, MAX_STOPS, name="er_stops"),
        "remote_pods": MapSpec("lpm_trie", EAGER_PEER_KEY.size, 4, MAX_REMOTE_PODS,
                               name="er_remote_pods"),
        "young": MapSpec("lru_hash", TRACKED_KEY.size, RECORD_SIZE, max_tracked,
                         name="er_young"),
        "young_closes": MapSpec("lru_hash", EAGER_KEY.size, COUNT_VALUE.size,
                                MAX_COUNTED_LISTENERS, name="er_young_closes"),
        "forks": MapSpec("lru_hash", 4, 8, max_tracked, name="er_forks"),
        "events": events_spec(ringbuf, ring_size),
    }


# Stack frame (offsets from r10).
_REC = -RECORD_SIZE  # the record
_SCRATCH = _REC - 8  # probe_read destination
_KEY = _SCRATCH - 8  # u64 pid_tgid / u32 0 for the config lookup
_TKEY = _KEY - 8  # tracked key
_SVAL = _TKEY - 16  # stash value / tracked value
_ZERO = _SVAL - 8  # u32 0 for array lookups
_EKEY = _ZERO - 24  # eager_listeners key (EAGER_KEY, 20 bytes)
_PKEY = _EKEY - 24  # eager_peers / remote_pods key (EAGER_PEER_KEY, 20 bytes)
_CFLAGS = _PKEY - 8  # u32 config flags, from the stash
_YREC = _CFLAGS - RECORD_SIZE  # close: the young record, copied out of its map

BPF_ANY = 0
BPF_F_CURRENT_CPU = 0xFFFFFFFF
S_IFMT = 0o170000
S_IFSOCK = 0o140000
SIGSTOP = 19
# bytes 8..11 of a v4-mapped IPv6 address (00 00 ff ff) as the s32 a BPF store takes
_V4MAPPED_WORD = int.from_bytes(b"\0\0\xff\xff", sys.byteorder, signed=True)


@dataclass(frozen=True)
class ProgramDef:
    """One generated program: its object name, tracepoint and instructions (maps by name)."""

    name: str
    category: str
    tracepoint: str
    builder: Builder

    def build(self, maps: Mapping[str, MapFd] | None = None) -> Instructions:
        """Resolve labels and map names (fds from ``maps``, e.g. the maps made from
        :func:`map_specs`)."""
        return self.builder.build(maps)


#: (object name, category, tracepoint) of every program, in attach order.
TRACEPOINTS: tuple[tuple[str, str, str], ...] = tuple(
    [(f"er_en_{sc}", "syscalls", f"sys_enter_{sc}") for sc in SYSCALLS]
    + [(f"er_ex_{sc}", "syscalls", f"sys_exit_{sc}") for sc in SYSCALLS]
    + [("er_proc_exit", "sched", "sched_process_exit"),
       ("er_proc_fork", "sched", "sched_process_fork"),
       ("er_proc_exec", "sched", "sched_process_exec")]
)


# ----------------------------------------------------------------------------- codegen


class _Gen:
    """Code generation helpers around a Builder (register use documented per program)."""

    def __init__(self, layout: KernelLayout, ringbuf: bool) -> None:
        self.b = Builder()
        self.layout = layout
        self.ringbuf = ringbuf
        self._n = 0

    def fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def ctx_load(self, dst: Reg, off_size: tuple[int, int], signed: bool = False) -> None:
        """Load a tracepoint argument (ctx in r6)."""
        off, size = off_size
        if size not in (1, 2, 4, 8):
            raise ValueError(f"tracepoint argument of {size} bytes at offset {off}")
        if signed and size < 8:
            self.b.ldsx(size * 8, dst, R6, off)
        else:
            self.b.ldx(size * 8, dst, R6, off)

    def probe_read(self, dst_stack: int, size: int | Reg, src: Reg, off: int) -> None:
        """probe_read_kernel(r10 + dst_stack, size, src + off); clobbers r1-r5, r0 = result."""
        b = self.b
        b.mov64(R1, R10).add64(R1, dst_stack)
        b.mov64(R2, size)
        b.mov64(R3, src)
        if off:
            b.add64(R3, off)
        b.call("probe_read_kernel")

    def read_field(self, dst: Reg, base: Reg, loc: FieldLocation, fail: str) -> None:
        """dst = the scalar field ``loc`` of the kernel object at ``base`` (bitfields too)."""
        if loc.size not in (1, 2, 4, 8):
            raise ValueError(f"{loc.path}: cannot load a {loc.size}-byte field into a register")
        b = self.b
        self.probe_read(_SCRATCH, loc.size, base, loc.offset)
        b.jne(R0, 0, fail)
        b.ldx(loc.size * 8, dst, R10, _SCRATCH)
        if loc.is_bitfield:
            b.lsh64(dst, loc.lshift)
            (b.arsh64 if loc.signed else b.rsh64)(dst, loc.rshift)

    def read_ptr(self, dst: Reg, base: Reg, loc: FieldLocation, fail: str) -> None:
        """dst = pointer field ``loc`` of the object at ``base``; jump to ``fail`` if NULL."""
        self.read_field(dst, base, loc, fail)
        self.b.jeq(dst, 0, fail)

    def netns_inum(self, dst: Reg, task: Reg, fail: str) -> None:
        """dst = task->nsproxy->net_ns->ns.inum (task in a callee-saved register)."""
        lay = self.layout
        self.read_ptr(dst, task, lay.task_nsproxy, fail)
        self.read_ptr(dst, dst, lay.nsproxy_net_ns, fail)
        self.read_field(dst, dst, lay.net_inum, fail)

    def zero_record(self) -> None:
        for off in range(_REC, 0, 8):
            self.b.st(64, R10, off, 0)

    def emit_record(self, at: int = _REC, stamp: bool = True) -> None:
        """Output the record on the stack at ``at`` to the ``events`` map (ctx in r6),
        time-stamped now (``stamp``) or keeping its time."""
        b = self.b
        if stamp:
            b.call("ktime_get_ns")
            b.stx(64, R10, R0, at + OFF_TS)
        if self.ringbuf:
            b.ld_map_fd(R1, "events")
            b.mov64(R2, R10).add64(R2, at)
            b.mov64(R3, RECORD_SIZE)
            b.mov64(R4, 0)
            b.call("ringbuf_output")
        else:
            b.mov64(R1, R6)
            b.ld_map_fd(R2, "events")
            b.ld_imm64(R3, BPF_F_CURRENT_CPU)
            b.mov64(R4, R10).add64(R4, at)
            b.mov64(R5, RECORD_SIZE)
            b.call("perf_event_output")
        # Count records the kernel could not deliver (ring full) in config.drops.
        done = self.fresh("emitted")
        b.jeq(R0, 0, done)
        b.st(32, R10, _ZERO, 0)
        b.ld_map_fd(R1, "config")
        b.mov64(R2, R10).add64(R2, _ZERO)
        b.call("map_lookup_elem")
        b.jeq(R0, 0, done)
        b.mov64(R1, 1)
        b.atomic("add", 64, R0, R1, 8)
        b.label(done)

    def peer_key(self, family_off: int, addr_off: int) -> None:
        """The ``remote_pods``/``eager_peers`` key at _PKEY for the address at r10 +
        ``addr_off`` of the family at r10 + ``family_off`` (IPv4 as v4-mapped /128)."""
        b = self.b
        v6 = self.fresh("peer_v6")
        done = self.fresh("peer_key")
        b.st(32, R10, _PKEY, 128)
        b.ldx(16, R1, R10, family_off)
        b.jne(R1, socket.AF_INET, v6)
        b.st(32, R10, _PKEY + 4, 0)
        b.st(32, R10, _PKEY + 8, 0)
        b.st(32, R10, _PKEY + 12, _V4MAPPED_WORD)  # ::ffff:a.b.c.d
        b.ldx(32, R1, R10, addr_off)
        b.stx(32, R10, R1, _PKEY + 16)
        b.ja(done)
        b.label(v6)
        for off in range(0, 16, 4):
            b.ldx(32, R1, R10, addr_off + off)
            b.stx(32, R10, R1, _PKEY + 4 + off)
        b.label(done)

    def listener_key(self, rec: int) -> None:
        """The ``eager_listeners``/``young_closes`` key at _EKEY of the local (addr, port) of
        the record at r10 + ``rec`` (an accept's: its listener)."""
        b = self.b
        b.ldx(16, R1, R10, rec + OFF_FAMILY)
        b.stx(16, R10, R1, _EKEY)
        b.ldx(16, R1, R10, rec + OFF_LPORT)
        b.stx(16, R10, R1, _EKEY + 2)
        for off in range(0, 16, 4):  # (the key's address is 4-byte aligned only)
            b.ldx(32, R1, R10, rec + OFF_LADDR + off)
            b.stx(32, R10, R1, _EKEY + 4 + off)

    def count(self, map_name: str, key_off: int) -> None:
        """``map_name``[r10 + key_off] += 1 (a u64 counter; created at 1)."""
        b = self.b
        made = self.fresh("counted")
        b.ld_map_fd(R1, map_name)
        b.mov64(R2, R10).add64(R2, key_off)
        b.call("map_lookup_elem")
        add = self.fresh("count_add")
        b.jne(R0, 0, add)
        b.st(64, R10, _SCRATCH, 1)
        b.ld_map_fd(R1, map_name)
        b.mov64(R2, R10).add64(R2, key_off)
        b.mov64(R3, R10).add64(R3, _SCRATCH)
        b.mov64(R4, BPF_ANY)
        b.call("map_update_elem")
        b.ja(made)
        b.label(add)
        b.mov64(R1, 1)
        b.atomic("add", 64, R0, R1, 0)
        b.label(made)

    def config_add(self, off: int) -> None:
        """config.<u64 at ``off``> += 1."""
        b = self.b
        done = self.fresh("config_added")
        b.st(32, R10, _ZERO, 0)
        b.ld_map_fd(R1, "config")
        b.mov64(R2, R10).add64(R2, _ZERO)
        b.call("map_lookup_elem")
        b.jeq(R0, 0, done)
        b.mov64(R1, 1)
        b.atomic("add", 64, R0, R1, off)
        b.label(done)

    def host_netns(self, dst: Reg, out: str) -> None:
        """dst = config.host_netns; jump to ``out`` if the config entry is missing."""
        b = self.b
        b.st(32, R10, _ZERO, 0)
        b.ld_map_fd(R1, "config")
        b.mov64(R2, R10).add64(R2, _ZERO)
        b.call("map_lookup_elem")
        b.jeq(R0, 0, out)
        b.ldx(64, dst, R0, 0)

    def process_record(self, kind: EventKind) -> None:
        """A zeroed record of a process event: `kind`, tid and pid from r7 (pid_tgid), no fd
        (the caller sets `arg`)."""
        b = self.b
        self.zero_record()
        b.st(32, R10, _REC + OFF_KIND, int(kind))
        b.stx(32, R10, R7, _REC + OFF_TID)
        b.mov64(R1, R7).rsh64(R1, 32)
        b.stx(32, R10, R1, _REC + OFF_PID)
        b.st(32, R10, _REC + OFF_FD, -1)

    def emit_with_netns(self) -> None:
        """Fill in the current task's netns (if readable), emit the record and return 0."""
        b = self.b
        b.call("get_current_task").mov64(R8, R0)
        self.netns_inum(R8, R8, "emit")
        b.stx(32, R10, R8, _REC + OFF_NETNS)
        b.label("emit")
        self.emit_record()
        self.finish()

    def finish(self, out: str = "out") -> None:
        self.b.label(out)
        self.b.mov64(R0, 0)
        self.b.exit()


def _enter_program(lay: KernelLayout, args: TracepointArgs, sc: str, ringbuf: bool) -> Builder:
    """Stash {fd, kind, netns} for the exit program, unless the caller is in the host netns.

    r6 ctx, r7 pid_tgid, r8 task / netns, r9 host netns.
    """
    g = _Gen(lay, ringbuf)
    b = g.b
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid").mov64(R7, R0)
    b.call("get_current_task").mov64(R8, R0)
    g.netns_inum(R8, R8, "out")
    g.host_netns(R9, "out")
    b.ldx(32, R1, R0, 16)  # config flags (r0: the config value still)
    b.stx(32, R10, R1, _SVAL + 12)
    b.jeq(R8, R9, "out")
    g.ctx_load(R1, args.enter_fd[sc])
    b.stx(32, R10, R1, _SVAL + 0)
    b.st(32, R10, _SVAL + 4, int(SYSCALL_KIND[sc]))
    b.stx(32, R10, R8, _SVAL + 8)
    b.stx(64, R10, R7, _KEY)
    b.ld_map_fd(R1, "stash")
    b.mov64(R2, R10).add64(R2, _KEY)
    b.mov64(R3, R10).add64(R3, _SVAL)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    g.finish()
    return b


def _close_enter_program(lay: KernelLayout, args: TracepointArgs, ringbuf: bool) -> Builder:
    """Stash close(fd) only if (pid, fd) is tracked. r6 ctx, r7 pid_tgid, r8 fd."""
    g = _Gen(lay, ringbuf)
    b = g.b
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid").mov64(R7, R0)
    g.ctx_load(R8, args.enter_fd["close"])
    b.mov64(R1, R7).rsh64(R1, 32)
    b.stx(32, R10, R1, _TKEY)
    b.stx(32, R10, R8, _TKEY + 4)
    b.ld_map_fd(R1, "tracked")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    b.ldx(32, R1, R0, 8)  # netns from the tracked value
    b.stx(32, R10, R8, _SVAL + 0)
    b.st(32, R10, _SVAL + 4, int(EventKind.CLOSE))
    b.stx(32, R10, R1, _SVAL + 8)
    b.st(32, R10, _SVAL + 12, 0)
    b.stx(64, R10, R7, _KEY)
    b.ld_map_fd(R1, "stash")
    b.mov64(R2, R10).add64(R2, _KEY)
    b.mov64(R3, R10).add64(R3, _SVAL)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    g.finish()
    return b


def _take_stash(g: _Gen, kind: EventKind) -> None:
    """Common exit prologue: r6 ctx, r7 pid_tgid; record zeroed and filled with the
    stash's fd (r9) and netns; stash entry deleted. Jumps to "out" if there is none."""
    b = g.b
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid").mov64(R7, R0)
    b.stx(64, R10, R7, _KEY)
    b.ld_map_fd(R1, "stash")
    b.mov64(R2, R10).add64(R2, _KEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    b.ldx(32, R9, R0, 0)  # fd
    b.ldx(32, R8, R0, 4)  # kind
    b.ldx(32, R1, R0, 8)  # netns
    g.zero_record()
    b.stx(32, R10, R1, _REC + OFF_NETNS)
    b.ldx(32, R1, R0, 12)  # config flags, as the enter program saw them
    b.stx(32, R10, R1, _CFLAGS)
    b.ld_map_fd(R1, "stash")
    b.mov64(R2, R10).add64(R2, _KEY)
    b.call("map_delete_elem")
    b.jne(R8, int(kind), "out")  # a stale entry from a syscall that never returned
    b.st(32, R10, _REC + OFF_KIND, int(kind))
    b.stx(32, R10, R7, _REC + OFF_TID)
    b.mov64(R1, R7).rsh64(R1, 32)
    b.stx(32, R10, R1, _REC + OFF_PID)
    b.st(32, R10, _REC + OFF_ARG, -1)


def _exit_program(lay: KernelLayout, args: TracepointArgs, sc: str, ringbuf: bool) -> Builder:
    """listen/accept/accept4/connect exit: check ret, find the TCP socket, emit, track.

    r6 ctx, r7 pid_tgid, r8 scratch pointer (task, files, ..., sock), r9 fd.
    """
    kind = SYSCALL_KIND[sc]
    g = _Gen(lay, ringbuf)
    b = g.b
    _take_stash(g, kind)
    g.ctx_load(R1, args.exit_ret[sc], signed=True)
    b.stx(64, R10, R1, _REC + OFF_RET)
    if kind == EventKind.LISTEN:
        b.jne(R1, 0, "out")
    elif kind == EventKind.ACCEPT:
        b.jslt(R1, 0, "out")
        b.stx(32, R10, R9, _REC + OFF_ARG)  # the listening fd
        b.mov64(R9, R1)  # the accepted connection's fd
    else:
        b.jeq(R1, 0, "ok_ret")
        b.jne(R1, -errno.EINPROGRESS, "out")
        b.label("ok_ret")
    b.stx(32, R10, R9, _REC + OFF_FD)

    # fd -> struct file (bounds-checked against fdt->max_fds).
    b.call("get_current_task").mov64(R8, R0)
    g.read_ptr(R8, R8, lay.task_files, "out")
    g.read_ptr(R8, R8, lay.files_fdt, "out")
    g.read_field(R1, R8, lay.fdt_max_fds, "out")
    b.jge(R9, R1, "out")
    g.read_ptr(R8, R8, lay.fdt_fd, "out")
    b.mov64(R1, R9).lsh64(R1, 3 if lay.pointer_size == 8 else 2)
    b.add64(R8, R1)
    b.mov64(R1, R10).add64(R1, _SCRATCH)
    b.mov64(R2, lay.pointer_size)
    b.mov64(R3, R8)
    b.call("probe_read_kernel")
    b.jne(R0, 0, "out")
    b.ldx(lay.pointer_size * 8, R8, R10, _SCRATCH)
    b.jeq(R8, 0, "out")
    # file -> inode: must be a socket; its number is the socket inode.
    b.stx(64, R10, R8, _SVAL)  # keep the file pointer
    g.read_ptr(R8, R8, lay.file_f_inode, "out")
    g.read_field(R1, R8, lay.inode_i_mode, "out")
    b.and64(R1, S_IFMT)
    b.jne(R1, S_IFSOCK, "out")
    g.read_field(R1, R8, lay.inode_i_ino, "out")
    b.stx(64, R10, R1, _REC + OFF_INO)
    # file -> socket -> sock; TCP only.
    b.ldx(64, R8, R10, _SVAL)
    g.read_ptr(R8, R8, lay.file_private_data, "out")
    g.read_ptr(R8, R8, lay.socket_sk, "out")
    g.read_field(R1, R8, lay.sk_type, "out")
    b.jne(R1, socket.SOCK_STREAM, "out")
    g.read_field(R1, R8, lay.sk_protocol, "out")
    b.jne(R1, socket.IPPROTO_TCP, "out")
    g.read_field(R1, R8, lay.sk_family, "out")
    b.stx(16, R10, R1, _REC + OFF_FAMILY)
    b.jeq(R1, socket.AF_INET, "v4")
    b.jne(R1, socket.AF_INET6, "out")
    if lay.sk_v6_rcv_saddr is not None and lay.sk_v6_daddr is not None:
        g.probe_read(_REC + OFF_LADDR, 16, R8, lay.sk_v6_rcv_saddr.offset)
        g.probe_read(_REC + OFF_RADDR, 16, R8, lay.sk_v6_daddr.offset)
    b.ja("ports")
    b.label("v4")
    g.probe_read(_REC + OFF_LADDR, 4, R8, lay.sk_rcv_saddr.offset)
    g.probe_read(_REC + OFF_RADDR, 4, R8, lay.sk_daddr.offset)
    b.label("ports")
    g.read_field(R1, R8, lay.sk_num, "emit")
    b.stx(16, R10, R1, _REC + OFF_LPORT)
    g.read_field(R1, R8, lay.sk_dport, "emit")
    b.stx(16, R10, R1, _REC + OFF_RPORT)
    if kind in (EventKind.ACCEPT, EventKind.CONNECT):
        _skip_unless_remote(g)
        _stop_if_eager(g, kind)
        _keep_young_or_emit(g)
    else:
        b.label("emit")
        g.emit_record()
    # Track (pid, fd) -> (inode, netns), and the pid.
    b.ldx(32, R1, R10, _REC + OFF_PID)
    b.stx(32, R10, R1, _TKEY)
    b.stx(32, R10, R9, _TKEY + 4)
    b.ldx(64, R1, R10, _REC + OFF_INO)
    b.stx(64, R10, R1, _SVAL)
    b.ldx(32, R1, R10, _REC + OFF_NETNS)
    b.stx(32, R10, R1, _SVAL + 8)
    b.st(32, R10, _SVAL + 12, 0)
    b.ld_map_fd(R1, "tracked")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.mov64(R3, R10).add64(R3, _SVAL)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    b.st(32, R10, _SCRATCH, 1)
    b.ld_map_fd(R1, "pids")
    b.mov64(R2, R10).add64(R2, _TKEY)  # the key's first u32 is the pid
    b.mov64(R3, R10).add64(R3, _SCRATCH)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    g.finish()
    return b


def _skip_unless_remote(g: _Gen) -> None:
    """With CONFIG_FILTER_REMOTE, a connection whose peer is not in ``remote_pods`` (another
    node's pods), or whose own address is (a process of another node: nodes that share a
    kernel, as on the testbed), ends here: no record, not tracked. r1-r5, r0 clobbered."""
    b = g.b
    keep = g.fresh("remote")
    b.ldx(32, R1, R10, _CFLAGS)
    b.and64(R1, CONFIG_FILTER_REMOTE)
    b.jeq(R1, 0, keep)
    g.peer_key(_REC + OFF_FAMILY, _REC + OFF_RADDR)
    b.ld_map_fd(R1, "remote_pods")
    b.mov64(R2, R10).add64(R2, _PKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    g.peer_key(_REC + OFF_FAMILY, _REC + OFF_LADDR)
    b.ld_map_fd(R1, "remote_pods")
    b.mov64(R2, R10).add64(R2, _PKEY)
    b.call("map_lookup_elem")
    b.jne(R0, 0, "out")
    b.label(keep)


def _keep_young_or_emit(g: _Gen) -> None:
    """With CONFIG_AGE, a connection the program did not stop goes into ``young`` (stamped,
    flagged aged) instead of the ring; else it is emitted. Defines "emit" (the record is
    reported whenever a step before jumps there). r1-r5, r0 clobbered."""
    b = g.b
    young = g.fresh("young")
    tracked = g.fresh("emitted")
    b.ldx(32, R1, R10, _CFLAGS)
    b.and64(R1, CONFIG_AGE)
    b.jeq(R1, 0, "emit")
    b.ldx(16, R1, R10, _REC + OFF_FLAGS)
    b.and64(R1, FLAG_STOPPED)
    b.jeq(R1, 0, young)
    b.label("emit")
    g.emit_record()
    b.ja(tracked)
    b.label(young)
    b.call("ktime_get_ns")
    b.stx(64, R10, R0, _REC + OFF_TS)
    b.st(16, R10, _REC + OFF_FLAGS, FLAG_AGED)
    b.ldx(32, R1, R10, _REC + OFF_PID)
    b.stx(32, R10, R1, _TKEY)
    b.stx(32, R10, R9, _TKEY + 4)
    b.ld_map_fd(R1, "young")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.mov64(R3, R10).add64(R3, _REC)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    b.jeq(R0, 0, tracked)
    b.ja("emit")  # the map refused it: report it now rather than lose it
    b.label(tracked)


def _stop_if_eager(g: _Gen, kind: EventKind) -> None:
    """Stop the caller (SIGSTOP to this thread: the whole process group-stops before it runs
    another instruction of its own) if the connection is eligible for the eager swap, and flag
    the record `stopped`. Eligible: a connect to a listener in ``eager_listeners`` (a live
    peer announced it), or an accept on one of ours from a pod CIDR in ``eager_peers``.
    Falls through to "emit" either way. r1-r5, r0 clobbered; r8 (the sock) is not needed after.
    """
    b = g.b
    skip = g.fresh("not_eager")
    if kind == EventKind.CONNECT:
        b.ldx(16, R1, R10, _REC + OFF_FAMILY)
        b.stx(16, R10, R1, _EKEY)
        b.ldx(16, R1, R10, _REC + OFF_RPORT)
        b.be(R1, 16)  # skc_dport is in network order; the key's port is in host order
        b.stx(16, R10, R1, _EKEY + 2)
        for off in range(0, 16, 4):  # (the key's address is 4-byte aligned only)
            b.ldx(32, R1, R10, _REC + OFF_RADDR + off)
            b.stx(32, R10, R1, _EKEY + 4 + off)
    else:
        g.listener_key(_REC)
    b.ld_map_fd(R1, "eager_listeners")
    b.mov64(R2, R10).add64(R2, _EKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, skip)
    b.ldx(32, R1, R0, 0)  # as a peer's listener (connect) or as ours (accept)?
    b.and64(R1, EAGER_CONNECT if kind == EventKind.CONNECT else EAGER_ACCEPT)
    b.jeq(R1, 0, skip)
    if kind == EventKind.ACCEPT:  # and the client is a remote pod served by a live peer
        g.peer_key(_REC + OFF_FAMILY, _REC + OFF_RADDR)
        b.ld_map_fd(R1, "eager_peers")
        b.mov64(R2, R10).add64(R2, _PKEY)
        b.call("map_lookup_elem")
        b.jeq(R0, 0, skip)
    b.mov64(R1, SIGSTOP)
    b.call("send_signal_thread")
    b.jne(R0, 0, skip)
    b.st(16, R10, _REC + OFF_FLAGS, FLAG_STOPPED)
    b.call("ktime_get_ns")
    b.stx(64, R10, R0, _SCRATCH)
    b.ld_map_fd(R1, "stops")
    b.mov64(R2, R10).add64(R2, _REC + OFF_PID)
    b.mov64(R3, R10).add64(R3, _SCRATCH)
    b.mov64(R4, BPF_ANY)
    b.call("map_update_elem")
    b.label(skip)


def _close_exit_program(lay: KernelLayout, args: TracepointArgs, ringbuf: bool) -> Builder:
    """close exit: forget (pid, fd) and emit with the tracked inode, unless the connection is
    still in ``young``: then it is forgotten there too, counted, and nothing is reported (a
    short connection costs user space nothing), or, if its process forked since it was
    made (the child may hold it on), its record is reported first, flagged forked. r9 fd."""
    g = _Gen(lay, ringbuf)
    b = g.b
    _take_stash(g, EventKind.CLOSE)
    g.ctx_load(R1, args.exit_ret["close"], signed=True)
    b.stx(64, R10, R1, _REC + OFF_RET)
    b.stx(32, R10, R9, _REC + OFF_FD)
    b.ldx(32, R1, R10, _REC + OFF_PID)
    b.stx(32, R10, R1, _TKEY)
    b.stx(32, R10, R9, _TKEY + 4)
    b.ld_map_fd(R1, "tracked")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")  # untracked meanwhile (e.g. by user space)
    b.ldx(64, R1, R0, 0)
    b.stx(64, R10, R1, _REC + OFF_INO)
    b.ld_map_fd(R1, "tracked")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_delete_elem")
    _close_young(g)
    b.label("emit")
    g.emit_record()
    g.finish()
    return b


def _close_young(g: _Gen) -> None:
    """The young part of a close (key at _TKEY): falls through to "emit" unless the young
    connection is forgotten here ("out"). Deleting is what decides: of this program and user
    space taking the record out (`Map.take`), exactly one succeeds, so a connection is either
    reported with its close or not at all."""
    b = g.b
    shared = g.fresh("forked")
    b.ld_map_fd(R1, "young")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "emit")  # reported already (or never young)
    for off in range(0, RECORD_SIZE, 8):  # copy it out: deleting frees the element
        b.ldx(64, R1, R0, off)
        b.stx(64, R10, R1, _YREC + off)
    b.ld_map_fd(R1, "forks")
    b.mov64(R2, R10).add64(R2, _TKEY)  # the key's first u32 is the pid
    b.call("map_lookup_elem")
    b.jeq(R0, 0, shared + "_no")
    b.ldx(64, R1, R0, 0)
    b.ldx(64, R2, R10, _YREC + OFF_TS)
    b.jge(R1, R2, shared)  # forked after the connection was made
    b.label(shared + "_no")
    b.ld_map_fd(R1, "young")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_delete_elem")
    b.jne(R0, 0, "emit")  # user space took it first: it was reported, so is its close
    g.config_add(24)  # config.young_closed
    b.ldx(32, R1, R10, _YREC + OFF_KIND)
    b.jne(R1, int(EventKind.ACCEPT), "out")
    g.listener_key(_YREC)
    g.count("young_closes", _EKEY)
    b.ja("out")
    b.label(shared)
    b.ld_map_fd(R1, "young")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_delete_elem")
    b.jne(R0, 0, "emit")
    b.st(16, R10, _YREC + OFF_FLAGS, FLAG_FORKED)
    g.emit_record(_YREC, stamp=False)
    b.st(16, R10, _REC + OFF_FLAGS, FLAG_FORKED)


def _process_exit_program(lay: KernelLayout, args: TracepointArgs, ringbuf: bool) -> Builder:
    """sched_process_exit: when the thread group is gone and had tracked sockets, emit.

    r6 ctx, r7 pid_tgid, r8 task / netns.
    """
    g = _Gen(lay, ringbuf)
    b = g.b
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid").mov64(R7, R0)
    if args.group_dead is not None:
        g.ctx_load(R1, args.group_dead)
        b.jeq(R1, 0, "out")
    else:
        b.mov64(R1, R7).rsh64(R1, 32)
        b.mov32(R2, R7)
        b.jne(R1, R2, "out")
    b.mov64(R1, R7).rsh64(R1, 32)
    b.stx(32, R10, R1, _TKEY)
    b.ld_map_fd(R1, "pids")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    b.ld_map_fd(R1, "pids")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_delete_elem")
    g.process_record(EventKind.EXIT)
    b.st(32, R10, _REC + OFF_ARG, -1)
    g.emit_with_netns()
    return b


def _process_event_program(lay: KernelLayout, args: TracepointArgs, kind: EventKind,
                           ringbuf: bool) -> Builder:
    """sched_process_fork / sched_process_exec of a process in ``pids``: emit (fork: the
    child's pid in ``arg``, and the child goes into ``pids`` too). r6 ctx, r7 pid_tgid, r8
    task / netns, r9 child pid."""
    g = _Gen(lay, ringbuf)
    b = g.b
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid").mov64(R7, R0)
    b.mov64(R1, R7).rsh64(R1, 32)
    b.stx(32, R10, R1, _TKEY)
    b.ld_map_fd(R1, "pids")
    b.mov64(R2, R10).add64(R2, _TKEY)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    g.process_record(kind)
    if kind == EventKind.FORK:  # its young sockets may live on in the child: note when
        b.call("ktime_get_ns")
        b.stx(64, R10, R0, _SCRATCH)
        b.ld_map_fd(R1, "forks")
        b.mov64(R2, R10).add64(R2, _TKEY)
        b.mov64(R3, R10).add64(R3, _SCRATCH)
        b.mov64(R4, BPF_ANY)
        b.call("map_update_elem")
        g.ctx_load(R9, args.fork_child_pid)
        b.stx(32, R10, R9, _REC + OFF_ARG)
        b.stx(32, R10, R9, _TKEY)
        b.st(32, R10, _SCRATCH, 1)
        b.ld_map_fd(R1, "pids")
        b.mov64(R2, R10).add64(R2, _TKEY)
        b.mov64(R3, R10).add64(R3, _SCRATCH)
        b.mov64(R4, BPF_ANY)
        b.call("map_update_elem")
    else:
        b.st(32, R10, _REC + OFF_ARG, -1)
    g.emit_with_netns()
    return b


def generate_programs(
    layout: KernelLayout | None = None,
    args: TracepointArgs | None = None,
    ringbuf: bool = False,
) -> list[ProgramDef]:
    """All tracer programs, unresolved (maps referenced by the names of :func:`map_specs`).
    ``ringbuf`` selects bpf_ringbuf_output over bpf_perf_event_output (and so the kind of
    ``events`` map they need)."""
    layout = layout or KernelLayout.from_btf()
    args = args or TracepointArgs.from_tracefs()
    out: list[ProgramDef] = []
    for name, cat, tp in TRACEPOINTS:
        if tp.startswith("sys_enter_"):
            sc = tp.removeprefix("sys_enter_")
            b = (
                _close_enter_program(layout, args, ringbuf)
                if sc == "close"
                else _enter_program(layout, args, sc, ringbuf)
            )
        elif tp.startswith("sys_exit_"):
            sc = tp.removeprefix("sys_exit_")
            b = (
                _close_exit_program(layout, args, ringbuf)
                if sc == "close"
                else _exit_program(layout, args, sc, ringbuf)
            )
        elif tp == "sched_process_fork":
            b = _process_event_program(layout, args, EventKind.FORK, ringbuf)
        elif tp == "sched_process_exec":
            b = _process_event_program(layout, args, EventKind.EXEC, ringbuf)
        else:
            b = _process_exit_program(layout, args, ringbuf)
        out.append(ProgramDef(name, cat, tp, b))
    return out
