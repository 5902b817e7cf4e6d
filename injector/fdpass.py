"""Hand a socket to a frozen process: an abstract unix socket in the target's network
namespace, the target connects and receives the fd with SCM_RIGHTS (``MSG_CMSG_CLOEXEC``).

No filesystem is touched: abstract names live in the network namespace, so the listener is
created by a short-lived thread that ``setns``es into the target's netns (setns with
CLONE_NEWNET is per-thread); the socket keeps that namespace after the thread is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import struct
from typing import Protocol

from injector.errors import InjectorError, RemoteSyscallError, TargetGoneError
from injector.netns import netns_inode, netns_path, run_in_thread

__all__ = ["FdPassError", "listen_in_netns", "same_netns", "send_fd"]

CLONE_NEWNET = 0x40000000
MSG_CTRUNC = 0x8
MSG_CMSG_CLOEXEC = 0x40000000
SOCK_CLOEXEC = 0o2000000

_libc = ctypes.CDLL(None, use_errno=True)

# LP64 layouts (x86_64 and aarch64 agree on these).
_MSGHDR = struct.Struct("@PI4xPQPQi4x")  # name, namelen, iov, iovlen, control, controllen, flags
_IOVEC = struct.Struct("@PQ")
_CMSGHDR = struct.Struct("@Qii")  # cmsg_len, cmsg_level, cmsg_type
_INT = struct.Struct("@i")


def _cmsg_align(n: int) -> int:
    return (n + 7) & ~7


CMSG_LEN_1FD = _CMSGHDR.size + _INT.size
CMSG_SPACE_1FD = _cmsg_align(_CMSGHDR.size) + _cmsg_align(_INT.size)


class Frozen(Protocol):
    """What fdpass needs of a frozen target (`injector.freeze.FrozenProcess`)."""

    pid: int

    def syscall(self, name: str, *args: int, tid: int | None = None) -> int: ...
    def scratch(self, size: int) -> contextlib.AbstractContextManager[int]: ...
    def read_memory(self, addr: int, n: int) -> bytes: ...
    def write_memory(self, addr: int, data: bytes) -> None: ...


class FdPassError(InjectorError):
    """Handing the fd to the target failed (the message says at which step)."""

    def __init__(self, pid: int, what: str) -> None:
        super().__init__(f"pid {pid}: fd handoff: {what}")
        self.pid = pid


def same_netns(pid: int) -> bool:
    """True if `pid` is in this thread's network namespace."""
    return netns_inode(pid) == netns_inode("thread-self")


def listen_in_netns(pid: int, name: bytes, backlog: int = 1) -> socket.socket:
    """A listening AF_UNIX stream socket bound to abstract `name` in `pid`'s network namespace."""
    if not name.startswith(b"\0"):
        raise ValueError("abstract unix names start with a NUL byte")

    def make() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(name)
            s.listen(backlog)
        except BaseException:
            s.close()
            raise
        return s

    try:
        if same_netns(pid):
            return make()
        return run_in_thread(make, netns=netns_path(pid), name=f"fdpass-netns-{pid}")
    except FileNotFoundError:
        raise TargetGoneError(pid, detail="no /proc/PID/ns/net") from None
    except Exception as e:
        raise FdPassError(pid, f"listener in target netns: {e}") from e


def _sockaddr_un(name: bytes) -> bytes:
    return struct.pack("@H", socket.AF_UNIX) + name


def _close_remote(proc: Frozen, fd: int) -> None:
    try:
        proc.syscall("close", fd)
    except TargetGoneError:
        raise
    except RemoteSyscallError:
        pass


SCRATCH_SIZE = 320  # bytes of target memory send_fd uses: sockaddr, msghdr, iovec, cmsg
assert 128 + _MSGHDR.size + _IOVEC.size + 8 + CMSG_SPACE_1FD <= SCRATCH_SIZE


def send_fd(
    proc: Frozen, sock: socket.socket | int, timeout: float = 5.0, buffer: int | None = None
) -> int:
    """Give the frozen target its own fd for `sock` (close-on-exec); return its number there.

    Checks that nothing was truncated and that the received fd is the same file (inode and
    device) as `sock`. Every temporary (unix sockets here and in the target) is closed,
    also on failure. The caller keeps `sock` open and owns it. `buffer`: the address of
    `SCRATCH_SIZE` writable bytes in the target to use (else a page is mapped for the call).
    """
    pid = proc.pid
    fileno = sock if isinstance(sock, int) else sock.fileno()
    st = os.fstat(fileno)
    name = b"\0ebpf-router-fdpass-" + secrets.token_hex(8).encode()
    addr = _sockaddr_un(name)
    listener = listen_in_netns(pid, name)
    conn: socket.socket | None = None
    remote_unix = -1
    received = -1
    try:
        listener.settimeout(timeout)
        scratch = (
            contextlib.nullcontext(buffer) if buffer is not None else proc.scratch(SCRATCH_SIZE)
        )
        with scratch as base:
            a_addr = base
            a_msg = base + 128
            a_iov = a_msg + _MSGHDR.size
            a_data = a_iov + _IOVEC.size
            a_cmsg = a_data + 8
            stype = socket.SOCK_STREAM | SOCK_CLOEXEC
            remote_unix = proc.syscall("socket", socket.AF_UNIX, stype, 0)
            proc.write_memory(a_addr, addr)
            proc.syscall("connect", remote_unix, a_addr, len(addr))
            # A unix stream connect completes into the backlog; accept it here.
            conn, _ = listener.accept()
            conn.settimeout(timeout)
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_pid = struct.unpack("@iII", cred)[0]
            if peer_pid != pid:
                raise FdPassError(pid, f"unexpected peer pid {peer_pid} on {name[1:]!r}")
            socket.send_fds(conn, [b"F"], [fileno])
            proc.write_memory(a_iov, _IOVEC.pack(a_data, 1))
            proc.write_memory(a_data, b"\0" * 8)
            proc.write_memory(a_cmsg, b"\0" * CMSG_SPACE_1FD)
            proc.write_memory(a_msg, _MSGHDR.pack(0, 0, a_iov, 1, a_cmsg, CMSG_SPACE_1FD, 0))
            n = proc.syscall("recvmsg", remote_unix, a_msg, MSG_CMSG_CLOEXEC)
            msg = _MSGHDR.unpack(proc.read_memory(a_msg, _MSGHDR.size))
            controllen, flags = msg[5], msg[6]
            cmsg = proc.read_memory(a_cmsg, CMSG_SPACE_1FD)
            data = proc.read_memory(a_data, 1)
            clen, level, ctype = _CMSGHDR.unpack_from(cmsg)
            if controllen >= CMSG_LEN_1FD and level == socket.SOL_SOCKET and ctype == 1:
                received = _INT.unpack_from(cmsg, _CMSGHDR.size)[0]
            if flags & MSG_CTRUNC:
                raise FdPassError(pid, f"control data truncated (msg_flags {flags:#x})")
            if n != 1 or data != b"F":
                raise FdPassError(pid, f"recvmsg returned {n} byte(s) {data!r}, expected b'F'")
            if received < 0 or clen != CMSG_LEN_1FD or ctype != socket.SCM_RIGHTS:
                raise FdPassError(
                    pid, f"no SCM_RIGHTS fd received (cmsg len {clen} level {level} type {ctype})"
                )
            try:
                got = os.stat(f"/proc/{pid}/fd/{received}")
            except OSError as e:
                raise FdPassError(pid, f"received fd {received} not visible: {e}") from None
            if (got.st_ino, got.st_dev) != (st.st_ino, st.st_dev):
                raise FdPassError(
                    pid,
                    f"received fd {received} is inode {got.st_ino}, expected {st.st_ino}",
                )
            _close_remote(proc, remote_unix)
            remote_unix = -1
            result, received = received, -1
            return result
    except TimeoutError:
        raise FdPassError(pid, f"timed out after {timeout}s") from None
    except OSError as e:
        if isinstance(e, InjectorError):
            raise
        raise FdPassError(pid, f"{e}") from e
    finally:
        try:
            if received >= 0:
                _close_remote(proc, received)
            if remote_unix >= 0:
                _close_remote(proc, remote_unix)
        except TargetGoneError:
            pass
        finally:
            if conn is not None:
                conn.close()
            listener.close()
