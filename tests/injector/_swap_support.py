"""Helpers for the swap tests: real servers as child processes, the server-side fd of a
connection (sock_diag + /proc), fresh connected pairs, and process snapshots."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import DiagSocket

from injector.epoll import epoll_fds, read_epoll_entries

HERE = Path(__file__).parent


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the kernel picks it: unique per run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    """Kill a child started by a fixture and reap it (never leave it behind)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 18)  # SIGCONT, in case a failed test left it stopped
        proc.kill()
    proc.wait(timeout=10)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def wait_listen(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Wait until a TCP socket listens on `port` (sock_diag; no connection is made)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        with DiagSocket() as ds:
            ds.bind()
            for m in ds.get_sock_stats(family=socket.AF_INET, states=1 << 10):
                if m["idiag_sport"] == port and m["idiag_state"] == 10:
                    return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


@contextlib.contextmanager
def running(argv: list[str], port: int | None = None, **kw) -> Iterator[subprocess.Popen]:
    """Run `argv` as a child for the duration of the block (waiting for `port` if given)."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(argv, **kw)
    try:
        if port is not None:
            wait_listen(port, proc)
        yield proc
    finally:
        stop(proc)


def redis_argv(port: int) -> list[str]:
    return [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
        "--logfile", "", "--loglevel", "warning",
    ]  # fmt: skip


def memcached_argv(port: int) -> list[str]:
    return ["memcached", "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-t", "4", "-u", "root"]


def echo_server_argv(port: int) -> list[str]:
    return [sys.executable, "-u", str(HERE / "_echo_server.py"), str(port)]


# --- finding the server's fd of a connection ----------------------------------------------


def diag_inode(local: tuple[str, int], remote: tuple[str, int]) -> int:
    """Socket inode of the TCP socket with this 4-tuple (local end), via sock_diag."""
    with DiagSocket() as ds:
        ds.bind()
        found = [
            m
            # only ESTABLISHED: a dump of thousands of TIME_WAIT sockets is slow to parse
            for m in ds.get_sock_stats(family=socket.AF_INET, states=1 << 1)
            if (m["idiag_src"], m["idiag_sport"]) == local
            and (m["idiag_dst"], m["idiag_dport"]) == remote
            and m["idiag_inode"]
        ]
    if len(found) != 1:
        states = [(m["idiag_state"], m["idiag_inode"]) for m in found]
        raise LookupError(f"{len(found)} TCP sockets {local} -> {remote} in sock_diag: {states}")
    return int(found[0]["idiag_inode"])


def fd_of_inode(pid: int, inode: int) -> int:
    """The fd number in `pid` that holds socket `inode`."""
    want = f"socket:[{inode}]"
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return int(name)
    raise LookupError(f"pid {pid} has no fd for socket inode {inode}")


def diag_state(local: tuple[str, int], remote: tuple[str, int]) -> list[tuple[int, int]]:
    """(state, inode) of every TCP socket with this 4-tuple (for error messages)."""
    with DiagSocket() as ds:
        ds.bind()
        return [
            (m["idiag_state"], m["idiag_inode"])
            for m in ds.get_sock_stats(family=socket.AF_INET)
            if (m["idiag_src"], m["idiag_sport"]) == local
            and (m["idiag_dst"], m["idiag_dport"]) == remote
        ]


def holders(inode: int) -> list[tuple[int, str, int]]:
    """(pid, command, fd) of every process holding socket `inode` (for error messages)."""
    want = f"socket:[{inode}]"
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for name in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                        with open(f"/proc/{pid}/comm") as f:
                            out.append((int(pid), f.read().strip(), int(name)))
    return out


def server_fd(pid: int, client: socket.socket, timeout: float = 5.0) -> tuple[int, int]:
    """(fd, inode) in server `pid` of the server end of `client`'s connection."""
    local, remote = client.getpeername(), client.getsockname()
    inode = diag_inode(local, remote)
    deadline = time.monotonic() + timeout
    while True:  # the server may not have accepted yet
        try:
            return fd_of_inode(pid, inode), inode
        except LookupError:
            if time.monotonic() > deadline:
                raise LookupError(
                    f"pid {pid} has no fd for socket inode {inode} after {timeout}s; "
                    f"held by: {holders(inode)}; now {diag_state(local, remote)}"
                ) from None
            time.sleep(0.01)


def fresh_pair() -> tuple[socket.socket, socket.socket]:
    """(server side S2, client side C2) of a new loopback connection owned by the test."""
    with socket.create_server(("127.0.0.1", 0)) as lst:
        c2 = socket.create_connection(lst.getsockname())
        s2, _ = lst.accept()
    return s2, c2


# --- process state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a swap must leave as it was: fds, mappings, epoll registrations, run state."""

    fds: int
    maps: int
    epoll: dict[int, list[tuple[int, int, int]]]  # epfd -> [(tfd, events, data)]
    threads: int


def snapshot(pid: int) -> Snapshot:
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    ep = {
        epfd: sorted((e.tfd, e.events, e.data) for e in read_epoll_entries(pid, epfd))
        for epfd in epoll_fds(pid)
    }
    return Snapshot(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        maps=maps,
        epoll=ep,
        threads=len(os.listdir(f"/proc/{pid}/task")),
    )


def thread_states(pid: int) -> dict[int, str]:
    """State letter of every thread (R, S, D, t, T...)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as f:
            out[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
    return out


def assert_running(pid: int) -> None:
    """No thread of `pid` is stopped or traced, and nobody traces it."""
    states = thread_states(pid)
    assert not [t for t, s in states.items() if s in "tT"], f"stopped threads: {states}"
    with open(f"/proc/{pid}/status") as f:
        tracer = [ln for ln in f if ln.startswith("TracerPid:")][0].split()[1]
    assert tracer == "0", f"pid {pid} still traced by {tracer}"


def recv_exact(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    """Read exactly n bytes."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class Resp:
    """A minimal RESP (redis) client over one socket, unbuffered beyond what it parses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, *args: bytes | str | int) -> None:
        parts = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            parts += [f"${len(b)}\r\n".encode(), b, b"\r\n"]
        self.sock.sendall(b"".join(parts))

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        i = self.buf.index(b"\r\n")
        line = bytes(self.buf[:i])
        del self.buf[: i + 2]
        return line

    def _fill(self) -> None:
        self.sock.settimeout(10)
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("redis closed the connection")
        self.buf += chunk

    def reply(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            data = bytes(self.buf[:n])
            del self.buf[: n + 2]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"bad RESP line {line[:50]!r}")

    def call(self, *args: bytes | str | int) -> object:
        self.send(*args)
        return self.reply()
