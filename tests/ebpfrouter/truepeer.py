"""What a process's socket is really connected to, from the kernel's tables.

With address virtualization, `getpeername()` on a swapped socket answers the overlay peer
(in the daemon and in tests too: the hook follows the socket, not the caller), so tests that
must tell a swapped socket from an overlay one read the truth from /proc/net/tcp[6] of the
process's network namespace, then of every other one (host sockets live in the namespace
of the daemon that made them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket

from ebpfrouter.tracer_seed import ProcSocket, parse_proc_net_tcp


def _net_dirs(pid: int) -> list[str]:
    """/proc/PID/net of `pid`, then ours, then one per other network namespace (a host socket
    lives where the daemon that made it runs: a testbed node's namespace)."""
    dirs, seen = [f"/proc/{pid}/net", "/proc/self/net"], set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ino = os.stat(f"/proc/{entry}/ns/net").st_ino
            except OSError:
                continue
            if ino not in seen:
                seen.add(ino)
                dirs.append(f"/proc/{entry}/net")
    return dirs


def kernel_row(pid: int, fd: int) -> ProcSocket | None:
    """The /proc/net/tcp[6] row of the connected TCP socket at `pid`'s `fd` (None if none)."""
    try:
        inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except OSError:
        return None
    for base in _net_dirs(pid):
        for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            try:
                with open(f"{base}/{name}") as f:
                    rows = parse_proc_net_tcp(f.read(), family)
            except OSError:
                continue
            for row in rows:
                if row.inode == inode and row.rport:
                    return dataclasses.replace(row, laddr=_dotted(row.laddr),
                                               raddr=_dotted(row.raddr))
    return None


def _dotted(addr: str) -> str:
    """An IPv4-mapped IPv6 address written as the socket API writes it (::ffff:a.b.c.d)."""
    ip = ipaddress.ip_address(addr)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else addr


def kernel_peer(pid: int, fd: int) -> tuple[str, int] | None:
    """(peer address, port) as the kernel has it (IPv4-mapped addresses unmapped)."""
    row = kernel_row(pid, fd)
    return None if row is None else (row.raddr.removeprefix("::ffff:"), row.rport)
