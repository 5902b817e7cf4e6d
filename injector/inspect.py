"""Look at another process's socket without ptrace: a `pidfd_getfd` copy, inode checks, queues,
TCP_INFO, the socket options worth carrying to a replacement, and fd flags from fdinfo."""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass, fields
from typing import NamedTuple, Self

from injector.errors import InjectorError

__all__ = [
    "AsyncOwner",
    "async_owner",
    "set_async_owner",
    "FdAccessError",
    "FdFlags",
    "NotASocketError",
    "SocketOptions",
    "StaleFdError",
    "TcpInfo",
    "apply_options",
    "copy_socket",
    "fd_flags",
    "getfd",
    "not_sent",
    "pidfd_getfd",
    "queue_sizes",
    "socket_inode",
    "socket_options",
    "tcp_info",
]

# Syscall numbers of the "generic" table: the same on x86_64 and aarch64.
_NR_PIDFD_GETFD = 438

SIOCINQ = 0x541B  # == FIONREAD
SIOCOUTQ = 0x5411  # == TIOCOUTQ
SIOCOUTQNSD = 0x894B

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class FdAccessError(InjectorError, OSError):
    """Could not reach fd `fd` of pid `pid` (``errno`` says why: ESRCH, EBADF, EPERM...)."""

    def __init__(self, err: int, pid: int, fd: int, what: str) -> None:
        name = _errno.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"pid {pid} fd {fd}: {what}: {name} ({os.strerror(err)})")
        self.pid = pid
        self.fd = fd

    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        return (type(self), (self.errno, self.pid, self.fd, "access"))


class NotASocketError(InjectorError):
    """The fd exists but is not a socket."""

    def __init__(self, pid: int, fd: int, target: str) -> None:
        super().__init__(f"pid {pid} fd {fd}: not a socket ({target!r})")
        self.pid = pid
        self.fd = fd
        self.target = target


class StaleFdError(InjectorError):
    """fd `fd` of pid `pid` no longer refers to the socket we expected (the number was reused)."""

    def __init__(self, pid: int, fd: int, expected: int, actual: int) -> None:
        super().__init__(
            f"pid {pid} fd {fd}: socket inode is {actual}, expected {expected} "
            "(fd closed and its number reused?); refusing"
        )
        self.pid = pid
        self.fd = fd
        self.expected = expected
        self.actual = actual


# --- fds of another process ---------------------------------------------------------------


def getfd(pid: int, fd: int) -> int:
    """Return a new fd in this process for the file at `fd` in `pid` (close-on-exec)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        raise FdAccessError(e.errno or _errno.ESRCH, pid, fd, "pidfd_open") from None
    try:
        new = _libc.syscall(_NR_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise FdAccessError(err, pid, fd, "pidfd_getfd")
        return int(new)
    finally:
        os.close(pidfd)


def pidfd_getfd(pid: int, fd: int) -> socket.socket:
    """Return a copy of the socket at `fd` in `pid` (shares the same kernel socket)."""
    new = getfd(pid, fd)
    try:
        return socket.socket(fileno=new)
    except OSError as e:
        os.close(new)
        if e.errno == _errno.ENOTSOCK:
            raise NotASocketError(pid, fd, _readlink(pid, fd, default="?")) from None
        raise FdAccessError(e.errno or _errno.EINVAL, pid, fd, "socket(fileno=)") from None


def _readlink(pid: int, fd: int, default: str | None = None) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError as e:
        if default is not None:
            return default
        err = e.errno or _errno.EBADF
        if err == _errno.ENOENT:  # /proc/PID/fd/N missing: no such fd, or no such process
            err = _errno.EBADF if os.path.exists(f"/proc/{pid}") else _errno.ESRCH
        raise FdAccessError(err, pid, fd, "readlink /proc/PID/fd") from None


def socket_inode(pid: int, fd: int) -> int:
    """Inode number of the socket at `fd` in `pid`, from ``/proc/PID/fd/N`` (``socket:[N]``)."""
    target = _readlink(pid, fd)
    if not (target.startswith("socket:[") and target.endswith("]")):
        raise NotASocketError(pid, fd, target)
    return int(target[len("socket:[") : -1])


def copy_socket(pid: int, fd: int, expected_inode: int | None = None) -> socket.socket:
    """A `pidfd_getfd` copy of `fd` in `pid`, checked to be the socket we think it is.

    The copy's inode (``os.fstat``) must match ``/proc/PID/fd/N`` and, if given,
    `expected_inode`; otherwise `StaleFdError` is raised and nothing is kept.
    """
    linked = socket_inode(pid, fd)
    sock = pidfd_getfd(pid, fd)
    actual = os.fstat(sock.fileno()).st_ino
    want = linked if expected_inode is None else expected_inode
    if actual != want or actual != linked:
        sock.close()
        raise StaleFdError(pid, fd, want, actual if actual != want else linked)
    return sock


# --- fd flags -----------------------------------------------------------------------------


class FdFlags(NamedTuple):
    """File status flags of one fd, from ``/proc/PID/fdinfo/N`` (``flags:`` is octal)."""

    flags: int

    @property
    def nonblock(self) -> bool:
        """O_NONBLOCK is set on the open file."""
        return bool(self.flags & os.O_NONBLOCK)

    @property
    def async_io(self) -> bool:
        """O_ASYNC (signal-driven I/O) is set on the open file."""
        return bool(self.flags & os.O_ASYNC)

    @property
    def cloexec(self) -> bool:
        """FD_CLOEXEC is set on the fd (shown by the kernel as the O_CLOEXEC bit)."""
        return bool(self.flags & os.O_CLOEXEC)


def read_fdinfo(pid: int, fd: int) -> str:
    """Text of ``/proc/PID/fdinfo/N``."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            return f.read()
    except OSError as e:
        err = e.errno or _errno.EBADF
        if err == _errno.ENOENT:
            err = _errno.EBADF if os.path.exists(f"/proc/{pid}") else _errno.ESRCH
        raise FdAccessError(err, pid, fd, "read /proc/PID/fdinfo") from None


def fd_flags(pid: int, fd: int) -> FdFlags:
    """O_NONBLOCK / FD_CLOEXEC (and the rest) of `fd` in `pid`."""
    for line in read_fdinfo(pid, fd).splitlines():
        if line.startswith("flags:"):
            return FdFlags(int(line.split(":", 1)[1].strip(), 8))
    raise FdAccessError(_errno.EINVAL, pid, fd, "no 'flags:' line in fdinfo")


# --- signal-driven I/O (O_ASYNC) -------------------------------------------------------------

F_SETSIG = 10
F_GETSIG = 11
F_SETOWN_EX = 15
F_GETOWN_EX = 16


class AsyncOwner(NamedTuple):
    """Who gets SIGIO for an O_ASYNC file: ``F_GETOWN_EX`` (type, pid) and ``F_GETSIG``."""

    owner_type: int  # F_OWNER_TID 0, F_OWNER_PID 1, F_OWNER_PGRP 2
    owner: int
    signal: int  # 0: SIGIO


def async_owner(sock: socket.socket) -> AsyncOwner:
    """The SIGIO owner and signal of the open file behind `sock`."""
    raw = fcntl.fcntl(sock.fileno(), F_GETOWN_EX, b"\0" * 8)
    kind, pid = struct.unpack("@ii", raw)
    return AsyncOwner(kind, pid, fcntl.fcntl(sock.fileno(), F_GETSIG))


def set_async_owner(sock: socket.socket, owner: AsyncOwner) -> None:
    """Set the SIGIO owner and signal of `sock` (O_ASYNC itself is set by whoever owns the fd,
    as the kernel records the fd number for ``si_fd``)."""
    fcntl.fcntl(sock.fileno(), F_SETOWN_EX, struct.pack("@ii", owner.owner_type, owner.owner))
    fcntl.fcntl(sock.fileno(), F_SETSIG, owner.signal)


# --- queues and TCP_INFO ------------------------------------------------------------------


def _ioctl_int(sock: socket.socket, request: int) -> int:
    buf = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


def queue_sizes(sock: socket.socket) -> tuple[int, int]:
    """(unread, unsent) bytes of a connected TCP socket: SIOCINQ and SIOCOUTQ.

    ``unsent`` counts every byte not yet acknowledged by the peer (sent or not).
    """
    return _ioctl_int(sock, SIOCINQ), _ioctl_int(sock, SIOCOUTQ)


def not_sent(sock: socket.socket) -> int:
    """Bytes queued but not yet sent at all (SIOCOUTQNSD)."""
    return _ioctl_int(sock, SIOCOUTQNSD)


TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}

# struct tcp_info (include/uapi/linux/tcp.h): 8 u8, 24 u32, 4 u64, 2 u32 (first 144 bytes).
_TCP_INFO = struct.Struct("=8B24I4Q2I")


@dataclass(frozen=True)
class TcpInfo:
    """A few fields of ``struct tcp_info``; times in microseconds."""

    state: int
    ca_state: int
    retransmits: int
    rto: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    lost: int
    retrans: int
    pmtu: int
    rtt: int
    rttvar: int
    snd_cwnd: int
    total_retrans: int
    bytes_acked: int
    bytes_received: int

    @property
    def state_name(self) -> str:
        """TCP state as ``ss`` names it (ESTABLISHED, LISTEN...)."""
        return TCP_STATES.get(self.state, str(self.state))


def tcp_info(sock: socket.socket) -> TcpInfo:
    """TCP_INFO of a TCP socket."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    if len(raw) < _TCP_INFO.size:
        raw = raw + b"\0" * (_TCP_INFO.size - len(raw))
    v = _TCP_INFO.unpack_from(raw)
    u8, u32, u64 = v[:8], v[8:32], v[32:36]
    return TcpInfo(
        state=u8[0],
        ca_state=u8[1],
        retransmits=u8[2],
        rto=u32[0],
        snd_mss=u32[2],
        rcv_mss=u32[3],
        unacked=u32[4],
        lost=u32[6],
        retrans=u32[7],
        pmtu=u32[13],
        rtt=u32[15],
        rttvar=u32[16],
        snd_cwnd=u32[18],
        total_retrans=u32[23],
        bytes_acked=u64[2],
        bytes_received=u64[3],
    )


# --- socket options -----------------------------------------------------------------------

_TIMEVAL = struct.Struct("@ll")  # struct timeval: two longs
_LINGER = struct.Struct("=ii")


def _sysctl_triple(name: str) -> tuple[int, int, int]:
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            a, b, c = (int(x) for x in f.read().split())
            return a, b, c
    except (OSError, ValueError):
        return (4096, 131072, 6291456) if name == "tcp_rmem" else (4096, 16384, 4194304)


@dataclass
class SocketOptions:
    """Options of a socket that a replacement socket should carry. ``None``: leave as is.

    SO_RCVBUF/SO_SNDBUF are kept only when the app looks to have set them: the kernel's
    lock bits (SOCK_RCVBUF_LOCK...) are invisible from userspace, so the rule is a heuristic:
    a TCP buffer size below the sysctl default (``tcp_rmem[1]``/``tcp_wmem[1]``) or above
    the autotuning ceiling (``tcp_rmem[2]``/``tcp_wmem[2]``) cannot come from autotuning,
    so the app set it. A value in between is assumed to be autotuned and is not carried
    (carrying it would lock the new socket's buffer and switch its autotuning off).
    The values are those getsockopt shows (the kernel doubles what setsockopt was given).
    """

    nodelay: bool | None = None
    cork: bool | None = None
    keepalive: bool | None = None
    keepidle: int | None = None
    keepintvl: int | None = None
    keepcnt: int | None = None
    rcvbuf: int | None = None
    sndbuf: int | None = None
    rcvtimeo: tuple[int, int] | None = None  # (seconds, microseconds)
    sndtimeo: tuple[int, int] | None = None
    linger: tuple[int, int] | None = None  # (onoff, seconds)
    user_timeout: int | None = None
    notsent_lowat: int | None = None
    congestion: str | None = None
    tos: int | None = None  # IP_TOS, or IPV6_TCLASS on AF_INET6
    priority: int | None = None
    mark: int | None = None
    oobinline: bool | None = None

    def items(self) -> dict[str, object]:
        """The options that are set (not ``None``), by field name."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if v is not None}


def _is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


def socket_options(sock: socket.socket) -> SocketOptions:
    """Read the options worth carrying from `sock` (see `SocketOptions` for the buffer rule)."""
    g = sock.getsockopt
    sol = socket.SOL_SOCKET
    o = SocketOptions()
    o.keepalive = bool(g(sol, socket.SO_KEEPALIVE))
    o.rcvtimeo = _TIMEVAL.unpack(g(sol, socket.SO_RCVTIMEO, _TIMEVAL.size))
    o.sndtimeo = _TIMEVAL.unpack(g(sol, socket.SO_SNDTIMEO, _TIMEVAL.size))
    o.linger = _LINGER.unpack(g(sol, socket.SO_LINGER, _LINGER.size))
    o.priority = g(sol, socket.SO_PRIORITY)
    o.mark = g(sol, socket.SO_MARK)
    o.oobinline = bool(g(sol, socket.SO_OOBINLINE))
    if not _is_tcp(sock):
        return o
    tcp = socket.IPPROTO_TCP
    o.nodelay = bool(g(tcp, socket.TCP_NODELAY))
    o.cork = bool(g(tcp, socket.TCP_CORK))
    o.keepidle = g(tcp, socket.TCP_KEEPIDLE)
    o.keepintvl = g(tcp, socket.TCP_KEEPINTVL)
    o.keepcnt = g(tcp, socket.TCP_KEEPCNT)
    o.user_timeout = g(tcp, socket.TCP_USER_TIMEOUT)
    o.notsent_lowat = g(tcp, socket.TCP_NOTSENT_LOWAT)
    o.congestion = g(tcp, socket.TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()
    if sock.family == socket.AF_INET:
        o.tos = g(socket.IPPROTO_IP, socket.IP_TOS)
    else:
        o.tos = g(socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
    rmin, rdef, rmax = _sysctl_triple("tcp_rmem")
    wmin, wdef, wmax = _sysctl_triple("tcp_wmem")
    rcv, snd = g(sol, socket.SO_RCVBUF), g(sol, socket.SO_SNDBUF)
    o.rcvbuf = rcv if (rcv < rdef or rcv > rmax) else None
    o.sndbuf = snd if (snd < wdef or snd > wmax) else None
    del rmin, wmin
    return o


class OptionError(InjectorError, OSError):
    """Setting one option on the replacement socket failed."""

    def __init__(self, err: int, option: str, value: object) -> None:
        name = _errno.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"setsockopt {option}={value!r} failed: {name}")
        self.option = option


def apply_options(opts: SocketOptions, sock: socket.socket) -> None:
    """Set every option of `opts` that is not ``None`` on `sock` (TCP ones only on TCP)."""
    sol = socket.SOL_SOCKET
    tcp = socket.IPPROTO_TCP
    plan: list[tuple[str, int, int, int | bytes]] = []

    def add(name: str, level: int, opt: int, value: int | bytes | None) -> None:
        if value is not None:
            plan.append((name, level, opt, int(value) if isinstance(value, bool) else value))

    add("keepalive", sol, socket.SO_KEEPALIVE, opts.keepalive)
    add("rcvtimeo", sol, socket.SO_RCVTIMEO, opts.rcvtimeo and _TIMEVAL.pack(*opts.rcvtimeo))
    add("sndtimeo", sol, socket.SO_SNDTIMEO, opts.sndtimeo and _TIMEVAL.pack(*opts.sndtimeo))
    add("linger", sol, socket.SO_LINGER, opts.linger and _LINGER.pack(*opts.linger))
    add("priority", sol, socket.SO_PRIORITY, opts.priority)
    add("mark", sol, socket.SO_MARK, opts.mark or None)  # 0 is the default; setting needs CAP
    add("oobinline", sol, socket.SO_OOBINLINE, opts.oobinline)
    # The kernel doubles what it is given; getsockopt showed the doubled value.
    add("rcvbuf", sol, socket.SO_RCVBUF, None if opts.rcvbuf is None else opts.rcvbuf // 2)
    add("sndbuf", sol, socket.SO_SNDBUF, None if opts.sndbuf is None else opts.sndbuf // 2)
    if _is_tcp(sock):
        add("nodelay", tcp, socket.TCP_NODELAY, opts.nodelay)
        add("keepidle", tcp, socket.TCP_KEEPIDLE, opts.keepidle)
        add("keepintvl", tcp, socket.TCP_KEEPINTVL, opts.keepintvl)
        add("keepcnt", tcp, socket.TCP_KEEPCNT, opts.keepcnt)
        add("user_timeout", tcp, socket.TCP_USER_TIMEOUT, opts.user_timeout)
        add("notsent_lowat", tcp, socket.TCP_NOTSENT_LOWAT, opts.notsent_lowat)
        add("congestion", tcp, socket.TCP_CONGESTION,
            opts.congestion.encode() if opts.congestion else None)
        if sock.family == socket.AF_INET:
            add("tos", socket.IPPROTO_IP, socket.IP_TOS, opts.tos)
        else:
            add("tos", socket.IPPROTO_IPV6, socket.IPV6_TCLASS, opts.tos)
        add("cork", tcp, socket.TCP_CORK, opts.cork)
    # Setting IP_TOS also sets SO_PRIORITY (rt_tos2priority): the app's priority goes last.
    plan.sort(key=lambda step: step[0] == "priority")
    for name, level, opt, value in plan:
        try:
            sock.setsockopt(level, opt, value)
        except OSError as e:
            raise OptionError(e.errno or _errno.EINVAL, name, value) from None
