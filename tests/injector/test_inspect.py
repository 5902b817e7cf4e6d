"""injector.inspect against real processes: pidfd_getfd copies, inodes, queues, options."""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import subprocess
import time

import pytest
from _swap_support import free_port, redis_argv, running, server_fd
from _targets import FdTarget

from injector.inspect import (
    FdAccessError,
    NotASocketError,
    SocketOptions,
    StaleFdError,
    apply_options,
    copy_socket,
    fd_flags,
    not_sent,
    pidfd_getfd,
    queue_sizes,
    socket_inode,
    socket_options,
    tcp_info,
)

pytestmark = pytest.mark.root


@pytest.fixture
def target():
    t = FdTarget()
    yield t
    t.close()


def test_copy_of_redis_client_socket_matches_sock_diag_and_ss():
    port = free_port()
    with running(redis_argv(port), port) as redis, socket.create_connection(
        ("127.0.0.1", port)
    ) as c:
        c.sendall(b"PING\r\n")
        assert c.recv(100) == b"+PONG\r\n"
        fd, inode = server_fd(redis.pid, c)
        assert socket_inode(redis.pid, fd) == inode
        with copy_socket(redis.pid, fd, expected_inode=inode) as cp:
            assert os.fstat(cp.fileno()).st_ino == inode
            assert cp.getpeername() == c.getsockname()
            assert cp.getsockname() == c.getpeername()
            info = tcp_info(cp)
            assert info.state_name == "ESTABLISHED"
            assert info.bytes_received == len(b"PING\r\n")
        # cross-check once with ss: same inode and fd for the process
        out = subprocess.run(
            ["ss", "-tnpie", "state", "established", "dst", f"127.0.0.1:{c.getsockname()[1]}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"pid={redis.pid},fd={fd})" in out
        assert re.search(rf"\bino:{inode}\b", out)


def test_errors_name_pid_fd_errno(target):
    with pytest.raises(FdAccessError) as ei:
        pidfd_getfd(target.pid, 999)
    assert ei.value.errno == errno.EBADF and f"pid {target.pid} fd 999" in str(ei.value)
    with pytest.raises(NotASocketError, match=f"pid {target.pid} fd 0"):
        pidfd_getfd(target.pid, 0)  # stdin: a pipe
    with pytest.raises(NotASocketError):
        socket_inode(target.pid, 0)
    with pytest.raises(FdAccessError) as ei:
        socket_inode(target.pid, 999)
    assert ei.value.errno == errno.EBADF
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(FdAccessError) as ei:
        pidfd_getfd(dead.pid, 0)
    assert ei.value.errno == errno.ESRCH


def test_stale_inode_is_refused(target):
    c, fd = target.connect()
    with c:
        inode = socket_inode(target.pid, fd)
        with pytest.raises(StaleFdError) as ei:
            copy_socket(target.pid, fd, expected_inode=inode + 1)
        assert (ei.value.expected, ei.value.actual) == (inode + 1, inode)
        assert str(target.pid) in str(ei.value) and f"fd {fd}" in str(ei.value)
        # the app closes the fd and the number is reused by another connection
        assert target.cmd("close", fd) == "ok"
        c2, fd2 = target.connect()
        with c2:
            assert fd2 == fd
            with pytest.raises(StaleFdError):
                copy_socket(target.pid, fd, expected_inode=inode)


def test_queue_sizes_of_target_socket(target):
    c, fd = target.connect()
    with c:
        c.sendall(b"x" * 1000)
        with copy_socket(target.pid, fd) as cp:
            deadline = time.monotonic() + 5
            while queue_sizes(cp)[0] < 1000 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert queue_sizes(cp) == (1000, 0)
            assert target.cmd("recv", fd, 400) == "78" * 400
            assert queue_sizes(cp) == (600, 0)
            assert tcp_info(cp).bytes_received == 1000


def test_unsent_counts_unacked_bytes_when_peer_window_is_full():
    with socket.create_server(("127.0.0.1", 0)) as lst:
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
    with c, s:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        sent = 0
        try:
            while True:
                sent += s.send(b"y" * 65536)
        except BlockingIOError:
            pass
        time.sleep(0.05)
        unread_c, _ = queue_sizes(c)
        _, unsent_s = queue_sizes(s)
        assert unsent_s > 0
        assert unread_c + unsent_s == sent
        assert 0 <= not_sent(s) <= unsent_s


def test_fd_flags_follow_the_app(target):
    c, fd = target.connect()
    with c:
        assert fd_flags(target.pid, fd).cloexec  # Python sockets are close-on-exec
        assert not fd_flags(target.pid, fd).nonblock
        target.cmd("nonblock", fd, 1)
        target.cmd("inherit", fd, 1)
        f = fd_flags(target.pid, fd)
        assert f.nonblock and not f.cloexec
        target.cmd("nonblock", fd, 0)
        assert not fd_flags(target.pid, fd).nonblock


def test_options_read_through_copy(target):
    c, fd = target.connect()
    with c:
        assert target.cmd("rcvtimeo", fd, 2, 250000) == "ok"
        with copy_socket(target.pid, fd) as cp:
            o = socket_options(cp)
        sec, usec = o.rcvtimeo
        assert sec == 2 and abs(usec - 250000) <= 10000  # the kernel keeps jiffies
        assert o.sndtimeo == (0, 0)
        assert o.rcvbuf is None and o.sndbuf is None  # app did not set them


def _set_many(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 7)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 1, 500))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 12345)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, 3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 42)


def test_options_round_trip_onto_a_fresh_socket():
    with socket.socket() as a, socket.socket() as b, socket.socket() as plain:
        _set_many(a)
        o = socket_options(a)
        assert o.nodelay and o.keepalive and (o.keepidle, o.keepintvl, o.keepcnt) == (33, 7, 4)
        assert o.rcvbuf == 16384 and o.sndbuf is None
        assert o.congestion == "reno" and o.tos == 0x10 and o.mark == 42
        assert socket_options(plain) != o
        apply_options(o, b)
        assert socket_options(b) == o
        assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 16384


def test_buffer_rule_keeps_large_user_buffers():
    with socket.socket() as a:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        o = socket_options(a)
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            wmax = int(f.read().split()[2])
        shown = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert o.sndbuf == (shown if shown > wmax else None)
    assert SocketOptions().items() == {}
