"""The router's socket tracer: load the BPF programs, attach them, decode their records.

    with Tracer() as tracer:                 # host netns = this process's, filtered out
        for ev in tracer.read(timeout=1.0):  # list[SocketEvent]
            ...
        tracer.track(pid, fd)                # seed a connection that existed before us

The programs and the specs of their maps live in :mod:`ebpfrouter.tracer_programs`, the
record layout in :mod:`ebpfrouter.tracer_layout`. Records arrive through a BPF ring buffer
where the kernel has one (5.8+), else a perf buffer; ``buffer=`` forces either. Everything
the tracer creates (maps, programs, links, reader) is closed by :meth:`Tracer.close` /
leaving the ``with`` block, also when opening fails half way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bpf_asm.attach import Link, attach_tracepoint
from bpf_asm.btf import BTF
from bpf_asm.maps import Map, MapSpec
from bpf_asm.perf import PerfBuffer
from bpf_asm.programs import Program, load_program
from bpf_asm.ringbuf import RingBuffer
from bpf_asm.syscall import BPFError, MapType
from injector.netns import netns_inode

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
    OFF_TS,
    RECORD,
    RECORD_SIZE,
    TRACKED_KEY,
    TRACKED_VALUE,
    EventKind,
    KernelLayout,
    TracepointArgs,
)
from .tracer_programs import MAX_TRACKED, RING_SIZE, events_spec, generate_programs, map_specs
from .tracer_seed import existing_sockets

__all__ = ["EventKind", "SocketEvent", "Tracer", "TracerError", "netns_inode", "socket_inode"]

log = logging.getLogger(__name__)


class TracerError(RuntimeError):
    """The tracer could not be set up (names the program, map or tracepoint)."""


def socket_inode(pid: int | str, fd: int) -> int:
    """Inode of the socket behind ``/proc/PID/fd/FD``; ValueError if it is not a socket."""
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    if not (target.startswith("socket:[") and target.endswith("]")):
        raise ValueError(f"pid {pid} fd {fd} is not a socket: {target}")
    return int(target[len("socket:[") : -1])


@dataclass(frozen=True)
class SocketEvent:
    """One decoded tracer record.

    ``fd`` is the socket's fd (for accept: the new connection; for exit: -1), ``listen_fd``
    the listening fd an accept came from. ``ret`` is the syscall's return value (-errno on
    failure; connect reports 0 or -EINPROGRESS). Addresses are strings (None if unknown),
    ports host order. ``ts_ns`` is CLOCK_MONOTONIC (``time.monotonic_ns()``).
    """

    kind: EventKind
    pid: int
    tid: int
    fd: int
    netns: int
    sock_ino: int
    ret: int
    ts_ns: int
    family: int = 0
    laddr: str | None = None
    lport: int = 0
    raddr: str | None = None
    rport: int = 0
    listen_fd: int | None = None
    child_pid: int | None = None  # FORK: the new task (a process, or a thread of `pid`)
    stopped: bool = False  # the program stopped the caller (SIGSTOP) for the eager swap
    aged: bool = False  # held in the kernel until `age` old (``ts_ns``: when it happened)
    forked: bool = False  # reported at its close: its process forked, the child may hold it

    @classmethod
    def decode(cls, data: bytes) -> SocketEvent:
        """Decode one record (trailing padding ignored)."""
        if len(data) < RECORD_SIZE:
            raise ValueError(f"tracer record of {len(data)} bytes, expected {RECORD_SIZE}")
        (kind, pid, tid, fd, netns, arg, ino, ret, ts, family, lport, rport, flags, laddr,
         raddr) = RECORD.unpack_from(data)
        try:
            k = EventKind(kind)
        except ValueError:
            raise ValueError(f"tracer record of unknown kind {kind}") from None
        la = ra = None
        if family == socket.AF_INET:  # inet_ntop: the daemon decodes thousands per second
            la, ra = socket.inet_ntop(family, laddr[:4]), socket.inet_ntop(family, raddr[:4])
        elif family == socket.AF_INET6:
            la, ra = socket.inet_ntop(family, laddr), socket.inet_ntop(family, raddr)
        return cls(
            kind=k,
            pid=pid,
            tid=tid,
            fd=fd,
            netns=netns,
            sock_ino=ino,
            ret=ret,
            ts_ns=ts,
            family=family,
            laddr=la,
            lport=lport,
            raddr=ra,
            rport=socket.ntohs(rport),
            listen_fd=arg if k == EventKind.ACCEPT else None,
            child_pid=arg if k == EventKind.FORK else None,
            stopped=bool(flags & FLAG_STOPPED),
            aged=bool(flags & FLAG_AGED),
            forked=bool(flags & FLAG_FORKED),
        )


SCAN_INTERVAL_NS = 25_000_000  # the shortest time between two scans of ``young`` (25 ms)
SCAN_RACE_NS = 1_000_000  # a connection stamped just before a scan may be inserted after it
_TS = struct.Struct("=Q")  # a record's ts_ns, read alone (the young map is scanned often)


def _peer_key(cidr: str) -> bytes:
    """The LPM key of `cidr` in ``eager_peers``/``remote_pods`` (IPv4 as v4-mapped)."""
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 4:
        addr, plen = b"\0" * 10 + b"\xff\xff" + net.network_address.packed, 96 + net.prefixlen
    else:
        addr, plen = net.network_address.packed, net.prefixlen
    return EAGER_PEER_KEY.pack(plen, addr)


def _listener_of(key: bytes) -> tuple[str, int]:
    """(addr, port) of an ``eager_listeners``/``young_closes`` key; a v4-mapped address as
    plain IPv4."""
    family, port, raw = EAGER_KEY.unpack(key)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw[:4]), port
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped or ip), port


def _eager_keys(addr: str, port: int) -> list[bytes]:
    ip = ipaddress.ip_address(addr)
    if ip.version == 4:
        mapped = b"\0" * 10 + b"\xff\xff" + ip.packed
        return [EAGER_KEY.pack(socket.AF_INET, port, ip.packed),
                EAGER_KEY.pack(socket.AF_INET6, port, mapped)]
    return [EAGER_KEY.pack(socket.AF_INET6, port, ip.packed)]


class Tracer:
    """Loads and attaches the socket tracer; a context manager that detaches everything.

    ``host_netns_inode``: processes in this network namespace are not traced (default:
    this process's namespace; 0 traces every namespace). ``buffer``: "auto" (ring buffer
    if the kernel has it), "ringbuf" or "perf".

    In-kernel filtering, both off by default: ``filter_remote`` reports (and tracks) only
    connects and accepts whose peer is in one of the CIDRs given to :meth:`remote_pods`;
    ``age`` (seconds, > 0) keeps each connect and accept the programs did not stop in the
    kernel until it is that old: :meth:`read` reports it then (``aged``, with the time it
    happened), and one closed younger is never reported at all (:attr:`young_closed`,
    :meth:`young_closes` count them).
    """

    def __init__(
        self,
        host_netns_inode: int | None = None,
        *,
        buffer: str = "auto",
        btf: BTF | None = None,
        max_tracked: int = MAX_TRACKED,
        ring_size: int = RING_SIZE,
        perf_pages: int = 64,
        filter_remote: bool = False,
        age: float = 0.0,
    ) -> None:
        if buffer not in ("auto", "ringbuf", "perf"):
            raise ValueError(f"buffer must be 'auto', 'ringbuf' or 'perf', not {buffer!r}")
        if not 0 <= age <= 3600:
            raise ValueError(f"age must be 0..3600 seconds, not {age}")
        self.filter_remote = filter_remote
        self.age_ns = int(age * 1e9)
        self.host_netns = netns_inode() if host_netns_inode is None else host_netns_inode
        self.buffer = buffer
        self._btf = btf
        self.max_tracked = max_tracked
        self.ring_size = ring_size
        self.perf_pages = perf_pages
        self.maps: dict[str, Map] = {}
        self.programs: list[Program] = []
        self.links: list[Link] = []
        self.reader: RingBuffer | PerfBuffer | None = None
        self.kind: str | None = None  # "ringbuf" or "perf" once open
        self._eager_flags: dict[bytes, int] = {}  # eager_listeners as written (the bits)
        self.next_due_ns: int | None = None  # when the oldest young connection grows up
        self._scanned_ns = 0  # when ``young`` was last scanned (less SCAN_RACE_NS)

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Tracer:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Create maps, generate and load the programs, start the reader, attach."""
        if self.programs:
            raise TracerError("tracer is already open")
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        layout = KernelLayout.from_btf(self._btf)
        args = TracepointArgs.from_tracefs()
        specs = map_specs(self.max_tracked, self.ring_size, ringbuf=self.buffer != "perf")
        for name, spec in specs.items():
            self.maps[name] = self._events_map(spec) if name == "events" else spec.load()
        flags = ((CONFIG_FILTER_REMOTE if self.filter_remote else 0)
                 | (CONFIG_AGE if self.age_ns else 0))
        self.maps["config"][b"\0\0\0\0"] = CONFIG_VALUE.pack(self.host_netns, 0, flags, 0)
        ringbuf = self.kind == "ringbuf"
        defs = generate_programs(layout, args, ringbuf=ringbuf)
        for d in defs:
            self.programs.append(load_program(d.build(self.maps), "tracepoint", name=d.name))
        if ringbuf:
            self.reader = RingBuffer(self.maps["events"])
        else:
            self.reader = PerfBuffer(self.maps["events"], page_count=self.perf_pages)
        # Attach exits before enters, so no enter stashes for an exit that is not there yet.
        order = sorted(
            zip(defs, self.programs, strict=True),
            key=lambda dp: dp[0].tracepoint.startswith("sys_enter_"),
        )
        for d, prog in order:
            try:
                self.links.append(attach_tracepoint(prog, d.category, d.tracepoint))
            except (OSError, BPFError) as e:
                raise TracerError(
                    f"cannot attach {d.name} to {d.category}:{d.tracepoint}: {e}"
                ) from e

    def _events_map(self, spec: MapSpec) -> Map:
        """The ``events`` map from ``spec``; a ring buffer the kernel cannot make falls back
        to a perf buffer unless ``buffer="ringbuf"`` asked for one. Sets ``kind``."""
        if MapType.parse(spec.type) == MapType.RINGBUF:
            try:
                m = spec.load()
                self.kind = "ringbuf"
                return m
            except (BPFError, ValueError) as e:
                if self.buffer == "ringbuf":
                    raise TracerError(f"cannot create ring buffer map {spec.name}: {e}") from e
                log.info("no BPF ring buffer (%s); using a perf buffer", e)
            spec = events_spec(ringbuf=False)
        self.kind = "perf"
        return spec.load()

    def close(self) -> None:
        """Detach and close everything (idempotent)."""
        # Each detach waits for an RCU grace period in the kernel; do them side by side.
        threads = [threading.Thread(target=link.close, daemon=True) for link in self.links]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for link in self.links:
            link.close()  # no-op unless a thread failed
        self.links.clear()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        for prog in self.programs:
            prog.close()
        self.programs.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    @property
    def closed(self) -> bool:
        """True before open() and after close()."""
        return not self.programs

    # ------------------------------------------------------------------ events

    def fileno(self) -> int:
        """A file descriptor that polls readable when events are waiting."""
        return self._reader().fileno()

    def _reader(self) -> RingBuffer | PerfBuffer:
        if self.reader is None:
            raise TracerError("tracer is not open")
        return self.reader

    def read(
        self, timeout: float | None = 0.0, max_records: int | None = None
    ) -> list[SocketEvent]:
        """Events waiting now, or within ``timeout`` seconds (None: block until some).

        With ``age``, connections that have lived that long in the kernel come first (oldest
        first). On a process exit the process's remaining tracked fds are forgotten.
        """
        out = self._grown_up() if self.age_ns else []
        for raw in self._reader().read(timeout, max_records):
            try:
                ev = SocketEvent.decode(raw)
            except ValueError as e:
                log.warning("dropping malformed tracer record: %s", e)
                continue
            if ev.kind == EventKind.EXIT:
                self._forget_pid(ev.pid)
            out.append(ev)
        return out

    def _scan_at_ns(self) -> int:
        """When ``young`` next holds something due: its oldest entry as of the last scan, or
        one made just after that scan; never sooner than :data:`SCAN_INTERVAL_NS` after it."""
        unknown = self._scanned_ns + self.age_ns  # made since the last scan: due no sooner
        due = unknown if self.next_due_ns is None else min(self.next_due_ns, unknown)
        return max(due, self._scanned_ns + SCAN_INTERVAL_NS)

    def _grown_up(self) -> list[SocketEvent]:
        """Take the connections at least `age` old out of ``young`` (a close racing with
        this either finds its record gone and reports itself, or takes it and reports
        nothing; `Map.take` is what decides). The map is scanned only when something in it
        can be due, so reads woken by the ring often cost no scan."""
        now = time.monotonic_ns()
        if now < self._scan_at_ns():
            return []
        self._scanned_ns = now - SCAN_RACE_NS
        young = self._map("young")
        entries = young.lookup_batch()
        self.next_due_ns = None
        if not entries:
            return []
        limit = now - self.age_ns
        out = []
        for key, raw in entries:
            (ts,) = _TS.unpack_from(raw, OFF_TS)
            if ts > limit:
                due = ts + self.age_ns
                if self.next_due_ns is None or due < self.next_due_ns:
                    self.next_due_ns = due
                continue
            taken = young.take(key)
            if taken is None:  # closed meanwhile
                continue
            try:
                out.append(SocketEvent.decode(taken))
            except ValueError as e:
                log.warning("dropping malformed young record: %s", e)
        out.sort(key=lambda ev: ev.ts_ns)
        return out

    def next_due(self) -> float | None:
        """Seconds until :meth:`read` next finds a connection grown up in the kernel: the
        oldest waiting as of the last read, or one made just after it (0: due now; None:
        no ``age``). A caller that reads again by then misses none and scans no sooner than
        needed."""
        if not self.age_ns:
            return None
        return max(0.0, (self._scan_at_ns() - time.monotonic_ns()) / 1e9)

    @property
    def young_closed(self) -> int:
        """Connections closed young and forgotten in the kernel (never reported)."""
        return CONFIG_VALUE.unpack(self._map("config")[b"\0\0\0\0"])[3]

    def young_closes(self) -> dict[tuple[str, int], int]:
        """Accepted connections closed young per local listener (addr, port) since the last
        call (the counts are taken out of the kernel map)."""
        counts = self._map("young_closes")
        out: dict[tuple[str, int], int] = {}
        for key, _ in counts.lookup_batch():
            value = counts.take(key)
            if value is not None:
                lst = _listener_of(key)
                out[lst] = out.get(lst, 0) + COUNT_VALUE.unpack(value)[0]
        return out

    def young_entries(self) -> int:
        """Connections waiting in the kernel to grow up."""
        return len(self._map("young").lookup_batch())

    # ------------------------------------------------------------------ remote pods

    def remote_pods(self, cidr: str, on: bool = True) -> None:
        """With ``filter_remote``: connections to or from pod CIDR `cidr` (another node's)
        are reported, or no longer (``on=False``)."""
        pods = self._map("remote_pods")
        if on:
            pods[_peer_key(cidr)] = (1).to_bytes(4, "little")
        else:
            with contextlib.suppress(KeyError, BPFError):
                pods.delete(_peer_key(cidr))

    def remote_pod_entries(self) -> int:
        """CIDRs in ``remote_pods`` now."""
        return sum(1 for _ in self._map("remote_pods"))

    @property
    def lost(self) -> int:
        """Records dropped because the buffer was full, as counted by the programs.

        Every failed `bpf_{perf_event,ringbuf}_output` bumps the programs' counter. The perf
        reader's PERF_RECORD_LOST count describes the same records again, so it is not added.
        """
        cfg = self.maps.get("config")
        if cfg is None:
            return int(getattr(self.reader, "lost", 0) or 0)
        return CONFIG_VALUE.unpack(cfg[b"\0\0\0\0"])[1]

    @property
    def prog_ids(self) -> list[int]:
        """Kernel ids of the loaded programs (as ``bpftool prog show`` lists them)."""
        return [p.id for p in self.programs]

    # ------------------------------------------------------------------ tracked fds

    def track(self, pid: int, fd: int, inode: int | None = None, netns: int | None = None) -> None:
        """Track an fd opened before the tracer (its close and the process exit will be
        reported). ``inode``/``netns`` default to what /proc says now."""
        if inode is None:
            inode = socket_inode(pid, fd)
        if netns is None:
            netns = netns_inode(pid)
        self._map("tracked")[TRACKED_KEY.pack(pid, fd)] = TRACKED_VALUE.pack(inode, netns, 0)
        self._map("pids")[pid.to_bytes(4, "little")] = (1).to_bytes(4, "little")

    def forget_pid(self, pid: int) -> None:
        """Stop reporting `pid`'s exit and forks (the fork program adds every child, threads
        too; user space tells them apart)."""
        with contextlib.suppress(KeyError, BPFError):
            self._map("pids").delete(pid.to_bytes(4, "little"))

    def untrack(self, pid: int, fd: int) -> bool:
        """Stop tracking (pid, fd); True if it was tracked."""
        return bool(self._map("tracked").delete(TRACKED_KEY.pack(pid, fd)))

    def tracked(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(pid, fd) -> (socket inode, netns inode) for every tracked fd."""
        out = {}
        for k, v in self._map("tracked").items():
            pid, fd = TRACKED_KEY.unpack(k)
            ino, netns, _ = TRACKED_VALUE.unpack(v)
            out[(pid, fd)] = (ino, netns)
        return out

    def seed(self, track: bool = True, pids: Iterable[int] | None = None,
             on_denied: Callable[[int, OSError], None] | None = None) -> list[SocketEvent]:
        """Events for TCP sockets that already existed outside the host namespace (from
        /proc; see :mod:`ebpfrouter.tracer_seed`), tracked unless ``track=False``.
        ``on_denied(pid, error)`` hears of every process whose fds could not be read.

        Call it after the tracer is open, so nothing falls between the scan and the
        programs; a socket made in between may then be reported twice.
        """
        out = []
        for kind, pid, fd, netns, row in existing_sockets(self.host_netns, pids, on_denied):
            if track:
                self.track(pid, fd, row.inode, netns)
            out.append(
                SocketEvent(
                    kind=kind,
                    pid=pid,
                    tid=pid,
                    fd=fd,
                    netns=netns,
                    sock_ino=row.inode,
                    ret=0,
                    ts_ns=time.monotonic_ns(),
                    family=row.family,
                    laddr=row.laddr,
                    lport=row.lport,
                    raddr=row.raddr,
                    rport=row.rport,
                )
            )
        return out

    # ------------------------------------------------------------------ eager swap maps

    def eager_listener(self, addr: str, port: int, on: bool = True, *, remote: bool) -> None:
        """Stop new connections to overlay `addr:port` at `connect()` return (``remote``: a
        peer's listener) or accepted on it at `accept()` return (ours), or no longer
        (``on=False``). IPv4 addresses are entered in both forms, plain and v4-mapped (a
        dual-stack socket reports the latter)."""
        lst = self._map("eager_listeners")
        bit = EAGER_CONNECT if remote else EAGER_ACCEPT
        for key in _eager_keys(addr, port):
            flags = self._eager_flags.get(key, 0)
            flags = flags | bit if on else flags & ~bit
            if flags:
                lst[key] = flags.to_bytes(4, "little")
                self._eager_flags[key] = flags
            else:
                self._eager_flags.pop(key, None)
                with contextlib.suppress(KeyError, BPFError):
                    lst.delete(key)

    def eager_peer(self, cidr: str, on: bool = True) -> None:
        """Accepts from pod CIDR `cidr` (served by a live peer router) may be stopped."""
        key = _peer_key(cidr)
        peers = self._map("eager_peers")
        if on:
            peers[key] = (1).to_bytes(4, "little")
        else:
            with contextlib.suppress(KeyError, BPFError):
                peers.delete(key)

    def eager_clear(self) -> None:
        """Forget every eager listener and peer: nothing is stopped any more."""
        self._eager_flags.clear()
        for name in ("eager_listeners", "eager_peers"):
            m = self._map(name)
            for k in list(m.keys()):
                with contextlib.suppress(KeyError, BPFError):
                    m.delete(k)

    def eager_entries(self) -> tuple[int, int]:
        """(listener keys, peer CIDRs) in the kernel maps now."""
        return (sum(1 for _ in self._map("eager_listeners")),
                sum(1 for _ in self._map("eager_peers")))

    @property
    def stops_map(self) -> Map:
        """u32 pid -> u64 ktime of each process a program stopped and the daemon has not
        resumed (its fd is handed to the guardian)."""
        return self._map("stops")

    def stop_settled(self, pid: int) -> None:
        """`pid` was resumed (or is gone): forget its stop."""
        with contextlib.suppress(KeyError, BPFError):
            self._map("stops").delete(pid.to_bytes(4, "little"))

    def _forget_pid(self, pid: int) -> None:
        for name in ("tracked", "young"):
            m = self._map(name)
            for k in list(m.keys()):
                if TRACKED_KEY.unpack(k)[0] == pid:
                    with contextlib.suppress(KeyError, BPFError):
                        m.delete(k)
        with contextlib.suppress(KeyError, BPFError):
            self._map("forks").delete(pid.to_bytes(4, "little"))

    def _map(self, name: str) -> Map:
        m = self.maps.get(name)
        if m is None:
            raise TracerError("tracer is not open")
        return m
