"""What a process's socket is really connected to, from the kernel's tables.

With address virtualization, `getpeername()` on a swapped socket answers the overlay peer
(in the daemon and in tests too: the hook follows the socket, not the caller), so tests that
must tell a swapped socket from an overlay one read the truth from /proc/net/tcp[6] of the
process's network namespace and of ours (host sockets live in the host's).
"""

from __future__ import annotations

import os
import socket

from ebpfrouter.tracer_seed import ProcSocket, parse_proc_net_tcp


def kernel_row(pid: int, fd: int) -> ProcSocket | None:
    """The /proc/net/tcp[6] row of the connected TCP socket at `pid`'s `fd` (None if none)."""
    try:
        inode = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except OSError:
        return None
    for base in (f"/proc/{pid}/net", "/proc/self/net"):
        for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
            try:
                with open(f"{base}/{name}") as f:
                    rows = parse_proc_net_tcp(f.read(), family)
            except OSError:
                continue
            for row in rows:
                if row.inode == inode and row.rport:
                    return row
    return None


def kernel_peer(pid: int, fd: int) -> tuple[str, int] | None:
    """(peer address, port) as the kernel has it (IPv4-mapped addresses unmapped)."""
    row = kernel_row(pid, fd)
    return None if row is None else (row.raddr.removeprefix("::ffff:"), row.rport)
