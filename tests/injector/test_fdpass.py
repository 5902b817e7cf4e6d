"""injector.fdpass: hand a socket to a frozen, real process, also across network namespaces."""

from __future__ import annotations

import os
import socket

import pytest
from _swap_support import assert_running, fresh_pair, recv_exact, snapshot
from _targets import FdTarget

from injector.errors import InjectorError
from injector.fdpass import listen_in_netns, same_netns, send_fd
from injector.freeze import freeze
from injector.inspect import fd_flags

pytestmark = pytest.mark.root


def _unix_sockets(pid: int) -> int:
    """How many fds of `pid` are unix sockets (inodes listed in its netns' /proc/net/unix)."""
    with open(f"/proc/{pid}/net/unix") as f:
        unix = {line.split()[6] for line in list(f)[1:] if len(line.split()) > 6}
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{name}")
        if link.startswith("socket:[") and link[8:-1] in unix:
            n += 1
    return n


def _check_handoff(t: FdTarget) -> None:
    s2, c2 = fresh_pair()
    with s2, c2:
        before = snapshot(t.pid)
        unix_before = _unix_sockets(t.pid)
        with freeze(t.pid) as proc:
            fd = send_fd(proc, s2)
        assert_running(t.pid)
        after = snapshot(t.pid)
        assert after.fds == before.fds + 1  # exactly the received fd, no temporaries
        assert after.maps == before.maps  # scratch memory unmapped
        assert _unix_sockets(t.pid) == unix_before
        assert os.stat(f"/proc/{t.pid}/fd/{fd}").st_ino == os.fstat(s2.fileno()).st_ino
        assert fd_flags(t.pid, fd).cloexec  # MSG_CMSG_CLOEXEC
        # the target really owns a working socket at that number
        s2.close()
        c2.sendall(b"hello")
        assert bytes.fromhex(t.cmd("recv", fd, 5)) == b"hello"
        assert t.cmd("send", fd, b"world".hex()) == "5"
        assert recv_exact(c2, 5) == b"world"
        assert t.cmd("close", fd) == "ok"
        assert snapshot(t.pid).fds == before.fds


def test_send_fd_same_netns():
    t = FdTarget()
    try:
        assert same_netns(t.pid)
        _check_handoff(t)
    finally:
        t.close()


def test_send_fd_into_other_netns():
    """The target lives in its own network namespace; the socket comes from ours."""
    t = FdTarget(prefix=["unshare", "--net", "--"])
    try:
        assert not same_netns(t.pid)
        _check_handoff(t)
        # the abstract listener was really created in the target's netns, not ours
        name = b"\0ebpf-router-test-" + os.urandom(4).hex().encode()
        with (
            listen_in_netns(t.pid, name),
            socket.socket(socket.AF_UNIX) as probe,
            pytest.raises(ConnectionRefusedError),
        ):
            probe.connect(name)
        assert same_netns(os.getpid())  # this thread never left home
    finally:
        t.close()


def test_send_fd_target_gone_is_an_error():
    t = FdTarget()
    s2, c2 = fresh_pair()
    with s2, c2:
        try:
            with pytest.raises(InjectorError) as ei, freeze(t.pid) as proc:
                os.kill(t.pid, 9)
                send_fd(proc, s2)
            assert "pid" in str(ei.value)
        finally:
            t.close()
