"""Find TCP sockets that existed before the tracer was attached, from /proc.

The BPF programs only see syscalls made after they are attached; a daemon that starts
(or restarts) next to running pods must learn about listeners and connections that are
already there. This module reads ``/proc/PID/fd`` (socket inodes) and the namespace's own
``/proc/PID/net/tcp{,6}`` tables (state, addresses) and turns what it finds into the
same :class:`~ebpfrouter.tracer.SocketEvent` records the tracer emits: LISTEN for
listeners, ACCEPT for a connection whose local port is one of its namespace's listening
ports, CONNECT otherwise (the direction of an established connection is not recorded
anywhere else in /proc).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from injector.netns import netns_inode

from .tracer_programs import EventKind

__all__ = ["ProcSocket", "parse_proc_net_tcp", "existing_sockets"]

TCP_LISTEN = 0x0A
# States with no file descriptor behind them (the socket was closed or is a request sock).
_NO_FD_STATES = {0x03, 0x06, 0x07}  # SYN_RECV, TIME_WAIT, CLOSE


@dataclass(frozen=True)
class ProcSocket:
    """One row of /proc/net/tcp or tcp6."""

    family: int
    laddr: str
    lport: int
    raddr: str
    rport: int
    state: int
    inode: int


def _addr(hexaddr: str, family: int) -> str:
    raw = bytes.fromhex(hexaddr)
    # The kernel prints each 32-bit word of the (network order) address as a host integer.
    words = [raw[i : i + 4] for i in range(0, len(raw), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    packed = b"".join(words)
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(packed))
    return str(ipaddress.IPv6Address(packed))


def parse_proc_net_tcp(text: str, family: int) -> list[ProcSocket]:
    """Parse the text of /proc/net/tcp (AF_INET) or /proc/net/tcp6 (AF_INET6)."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        (la, lp), (ra, rp) = f[1].split(":"), f[2].split(":")
        out.append(
            ProcSocket(
                family,
                _addr(la, family),
                int(lp, 16),
                _addr(ra, family),
                int(rp, 16),
                int(f[3], 16),
                int(f[9]),
            )
        )
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def existing_sockets(
    host_netns: int = 0, pids: Iterable[int] | None = None,
    on_denied: Callable[[int, OSError], None] | None = None,
) -> list[tuple[EventKind, int, int, int, ProcSocket]]:
    """(kind, pid, fd, netns inode, socket) for every TCP socket fd of every process
    outside ``host_netns`` (0: every namespace), or of ``pids`` only. A process whose
    namespace or fds may not be read (EACCES, EPERM) is reported to ``on_denied``, never
    skipped silently; one that is gone is skipped."""
    tables: dict[int, dict[int, ProcSocket]] = {}
    listening: dict[int, set[int]] = {}
    out = []
    for pid in pids if pids is not None else _pids():
        try:
            netns = netns_inode(pid)
            if host_netns and netns == host_netns:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError as exc:
            if on_denied is not None and exc.errno in (errno.EACCES, errno.EPERM):
                on_denied(pid, exc)
            continue  # gone, or a kernel thread
        if netns not in tables:
            rows = parse_proc_net_tcp(_read(f"/proc/{pid}/net/tcp"), socket.AF_INET)
            rows += parse_proc_net_tcp(_read(f"/proc/{pid}/net/tcp6"), socket.AF_INET6)
            tables[netns] = {r.inode: r for r in rows if r.inode and r.state not in _NO_FD_STATES}
            listening[netns] = {r.lport for r in rows if r.state == TCP_LISTEN}
        table = tables[netns]
        for name in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if not target.startswith("socket:["):
                continue
            row = table.get(int(target[8:-1]))
            if row is None:
                continue  # not TCP (or not in this namespace's table)
            if row.state == TCP_LISTEN:
                kind = EventKind.LISTEN
            elif row.lport in listening[netns]:
                kind = EventKind.ACCEPT
            else:
                kind = EventKind.CONNECT
            out.append((kind, pid, int(name), netns, row))
    return out
