"""replace_fd against real, unmodified programs: the test is the client, swaps the server's end of
its connection to a fresh connection it owns, switches its own end, and checks every byte."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import select
import socket
import subprocess
import threading
import time

import pytest
from _swap_support import (
    Resp,
    assert_running,
    echo_server_argv,
    free_port,
    fresh_pair,
    memcached_argv,
    recv_exact,
    redis_argv,
    running,
    server_fd,
    snapshot,
    wait_listen,
)
from _targets import FdTarget

from injector import swap as swap_mod
from injector.errors import InjectorError, RemoteSyscallError
from injector.freeze import freeze
from injector.inspect import (
    StaleFdError,
    async_owner,
    copy_socket,
    fd_flags,
    queue_sizes,
    socket_inode,
)
from injector.swap import SwapError, replace_fd, swap_many

pytestmark = pytest.mark.root


def swap_server_end(pid: int, client: socket.socket, **kw) -> socket.socket:
    """Swap the server's end of `client` for a fresh pair; return the new client end."""
    fd, inode = server_fd(pid, client)
    s2, c2 = fresh_pair()
    try:
        old = replace_fd(pid, fd, s2, expected_inode=inode, **kw)
    except BaseException:
        c2.close()
        raise
    finally:
        s2.close()  # the server holds its own reference now
    old.close()
    client.close()
    return c2


# --- redis ----------------------------------------------------------------------------------


@pytest.fixture
def redis():
    port = free_port()
    with running(redis_argv(port), port) as p:
        p.port = port
        yield p


def test_redis_keeps_serving_across_swap(redis):
    a = socket.create_connection(("127.0.0.1", redis.port))
    r = Resp(a)
    assert r.call("CLIENT", "SETNAME", "swapped") == "OK"
    before = {f"k{i}": os.urandom(300_000 + i) for i in range(4)}
    for k, v in before.items():
        assert r.call("SET", k, v) == "OK"
    assert all(r.call("GET", k) == v for k, v in before.items())
    assert not r.buf
    fd, inode = server_fd(redis.pid, a)
    watchers_before = snapshot(redis.pid).epoll
    s2, c2 = fresh_pair()
    r2 = Resp(c2)
    during = os.urandom(2_000_000)  # bigger than socket buffers: sent while the swap runs
    sender = threading.Thread(target=r2.send, args=("SET", "during", during))
    sender.start()
    old = replace_fd(redis.pid, fd, s2, expected_inode=inode)
    s2.close()
    sender.join(10)
    assert not sender.is_alive()
    assert r2.reply() == "OK"
    assert r2.call("CLIENT", "GETNAME") == b"swapped"  # the same redis client session
    assert r2.call("GET", "during") == during
    for k, v in before.items():
        assert r2.call("GET", k) == v
    after = os.urandom(1_000_000)
    assert r2.call("SET", "after", after) == "OK"
    assert r2.call("GET", "after") == after
    assert len(r2.call("CLIENT", "LIST").splitlines()) == 1
    # the old connection is ours alone now: redis never touched it again. (Its last bytes,
    # read before the swap, may still wait for the delayed ACK of the reader: give it 2 s.)
    deadline = time.monotonic() + 2.0
    while queue_sizes(old) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queue_sizes(old) == (0, 0)
    assert queue_sizes(a)[0] == 0  # and nothing was written to it after the swap
    assert snapshot(redis.pid).epoll == watchers_before
    assert_running(redis.pid)
    old.close()
    a.close()
    c2.close()


# --- memcached (libevent, 4 worker threads) ----------------------------------------------------


def mc_set(s: socket.socket, key: str, value: bytes) -> None:
    s.sendall(f"set {key} 0 0 {len(value)}\r\n".encode() + value + b"\r\n")
    assert recv_exact(s, 8) == b"STORED\r\n"


def mc_get(s: socket.socket, key: str, size: int) -> bytes:
    s.sendall(f"get {key}\r\n".encode())
    head = f"VALUE {key} 0 {size}\r\n".encode()
    got = recv_exact(s, len(head) + size + 7)
    assert got.startswith(head) and got.endswith(b"\r\nEND\r\n"), got[:60]
    return got[len(head) : len(head) + size]


def mc_stat(s: socket.socket, name: str) -> int:
    s.sendall(b"stats\r\n")
    buf = b""
    while not buf.endswith(b"END\r\n"):
        buf += s.recv(65536)
    for line in buf.decode().splitlines():
        if line.startswith(f"STAT {name} "):
            return int(line.split()[2])
    raise KeyError(name)


def test_memcached_keeps_serving_across_swap():
    port = free_port()
    with running(memcached_argv(port), port) as mc:
        assert snapshot(mc.pid).threads >= 5
        a = socket.create_connection(("127.0.0.1", port))
        values = {f"k{i}": os.urandom(500_000 + i) for i in range(3)}
        for k, v in values.items():
            mc_set(a, k, v)
        conns = mc_stat(a, "curr_connections")
        total = mc_stat(a, "total_connections")
        ep_before = snapshot(mc.pid).epoll
        fd, inode = server_fd(mc.pid, a)
        s2, c2 = fresh_pair()
        during = os.urandom(900_000)  # sent on the new connection while the swap runs
        request = f"set during 0 0 {len(during)}\r\n".encode() + during + b"\r\n"
        sender = threading.Thread(target=c2.sendall, args=(request,))
        sender.start()
        old = replace_fd(mc.pid, fd, s2, expected_inode=inode)
        s2.close()
        sender.join(10)
        assert not sender.is_alive()
        assert recv_exact(c2, 8) == b"STORED\r\n"
        old.close()
        a.close()
        with c2:
            assert mc_get(c2, "during", len(during)) == during
            for k, v in values.items():
                assert mc_get(c2, k, len(v)) == v
            new = os.urandom(700_000)
            mc_set(c2, "new", new)
            assert mc_get(c2, "new", len(new)) == new
            assert mc_stat(c2, "curr_connections") == conns
            assert mc_stat(c2, "total_connections") == total  # no reconnect seen by memcached
            assert snapshot(mc.pid).epoll == ep_before
            assert_running(mc.pid)


# --- asyncio echo server ----------------------------------------------------------------------


@pytest.fixture
def echo():
    port = free_port()
    with running(echo_server_argv(port), port) as p:
        p.port = port
        yield p


def _pump(sock: socket.socket, payload: bytes, out: dict) -> None:
    """Send payload and read the same amount back, from two threads; record the digests."""
    got = bytearray()

    def reader() -> None:
        try:
            got.extend(recv_exact(sock, len(payload), timeout=20))
        except Exception as e:  # noqa: BLE001 - reported through `out`
            out["error"] = e

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(payload)
    t.join(30)
    out["digest"] = hashlib.sha256(bytes(got)).hexdigest()


def test_asyncio_echo_stream_before_during_after(echo):
    a = socket.create_connection(("127.0.0.1", echo.port))
    first = os.urandom(3_000_000)
    a.sendall(first[:1000])
    assert recv_exact(a, 1000) == first[:1000]
    res: dict = {}
    _pump(a, first, res)
    assert res["digest"] == hashlib.sha256(first).hexdigest()
    fd, inode = server_fd(echo.pid, a)
    flags_before = fd_flags(echo.pid, fd)
    assert flags_before.nonblock  # asyncio sockets are non-blocking
    ep_before = snapshot(echo.pid).epoll
    s2, c2 = fresh_pair()
    assert s2.getblocking()
    second = os.urandom(8_000_000)
    res2: dict = {}
    pump = threading.Thread(target=_pump, args=(c2, second, res2))
    pump.start()  # bytes flow into S2 while the swap happens
    old = replace_fd(echo.pid, fd, s2, expected_inode=inode)
    assert not s2.getblocking()  # O_NONBLOCK carried over to the new socket
    s2.close()
    pump.join(30)
    assert "error" not in res2 and res2["digest"] == hashlib.sha256(second).hexdigest()
    third = os.urandom(2_000_000)
    res3: dict = {}
    _pump(c2, third, res3)
    assert res3["digest"] == hashlib.sha256(third).hexdigest()
    assert fd_flags(echo.pid, fd) == flags_before
    assert socket_inode(echo.pid, fd) != inode
    assert snapshot(echo.pid).epoll == ep_before  # same events and data
    assert_running(echo.pid)
    old.close()
    a.close()
    c2.close()


@pytest.mark.parametrize("server", ["asyncio", "redis"])
def test_thousand_swaps_leave_process_as_it_was(server):
    port = free_port()
    argv = echo_server_argv(port) if server == "asyncio" else redis_argv(port)
    with running(argv, port) as p:
        c = socket.create_connection(("127.0.0.1", port))

        def check(i: int) -> None:
            if server == "asyncio":
                msg = f"ping {i}".encode()
                c.sendall(msg)
                assert recv_exact(c, len(msg)) == msg
            else:
                assert Resp(c).call("INCR", "n") == i + 1

        check(0)
        fd, inode = server_fd(p.pid, c)  # once: then we know which socket we put there
        before = snapshot(p.pid)
        t0 = time.monotonic()
        for i in range(1, 1001):
            s2, c2 = fresh_pair()
            new_inode = os.fstat(s2.fileno()).st_ino
            try:
                old = replace_fd(p.pid, fd, s2, expected_inode=inode)
            finally:
                s2.close()
            old.close()
            c.close()
            c, inode = c2, new_inode
            check(i)
        elapsed = time.monotonic() - t0
        after = snapshot(p.pid)
        assert after == before, (before, after)
        assert_running(p.pid)
        c.close()
        print(f"1000 swaps into {server}: {elapsed:.2f}s")


# --- iperf3: both ends swapped, two-phase -------------------------------------------------------


def _data_connection(pid: int, port: int) -> tuple[int, socket.socket]:
    """(fd, copy) of the iperf3 client's data connection: the busier of its two sockets."""
    best = None
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            cp = copy_socket(pid, int(name))
        except InjectorError:
            continue
        if cp.type != socket.SOCK_STREAM or cp.getpeername()[1] != port:
            cp.close()
            continue
        acked = cp.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        score = int.from_bytes(acked[120:128], "little")  # tcpi_bytes_acked
        if best is None or score > best[0]:
            if best is not None:
                best[2].close()
            best = (score, int(name), cp)
        else:
            cp.close()
    assert best is not None and best[0] > 1_000_000, "no busy data connection found"
    return best[1], best[2]


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_iperf3_transfer_survives_two_phase_swap(tmp_path):
    port = free_port()
    srv_out = tmp_path / "server.json"
    with open(srv_out, "w") as so, running(
        ["iperf3", "-s", "-1", "-J", "-p", str(port), "-B", "127.0.0.1"], stdout=so
    ) as srv:
        wait_listen(port, srv)  # no probe connection: iperf3 -1 would take it for the test
        cli = subprocess.Popen(
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "5", "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            deadline = time.monotonic() + 3
            while True:  # the transfer must be well under way (slow on a loaded machine)
                try:
                    cfd, ccopy = _data_connection(cli.pid, port)
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            sfd, sinode = server_fd(srv.pid, ccopy)
            scopy = copy_socket(srv.pid, sfd, sinode)
            s2, c2 = fresh_pair()
            assert cli.poll() is None, "iperf3 finished before the swap: machine too slow?"
            with freeze(cli.pid) as pc:  # the writer first
                _wait(lambda: queue_sizes(ccopy)[1] == 0 and queue_sizes(scopy)[0] == 0)
                with freeze(srv.pid) as ps:  # then the reader, now drained
                    old_s = replace_fd(srv.pid, sfd, s2, proc=ps, expected_inode=sinode)
                    cinode = os.fstat(ccopy.fileno()).st_ino
                    old_c = replace_fd(cli.pid, cfd, c2, proc=pc, expected_inode=cinode)
            for s in (s2, c2, old_s, old_c, ccopy, scopy):
                s.close()
            out, err = cli.communicate(timeout=20)
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.communicate()
        srv.wait(timeout=10)
    assert cli.returncode == 0, err
    report = json.loads(out)
    assert "error" not in report, report.get("error")
    sent = report["end"]["sum_sent"]["bytes"]
    received = json.loads(srv_out.read_text())["end"]["sum_received"]["bytes"]
    assert sent > 100_000_000
    assert 0 <= sent - received < 64 * 1024 * 1024  # only what was in flight at the very end
    intervals = [iv["sum"]["bytes"] for iv in report["intervals"]]
    assert len(intervals) >= 5 and all(b > 0 for b in intervals), intervals


# --- option, flag and epoll carry-over on a driven target ---------------------------------------


@pytest.fixture
def target():
    t = FdTarget()
    yield t
    t.close()


def test_rcvtimeo_nonblock_cloexec_and_epoll_carried(target):
    t = target
    c, fd = t.connect()
    assert t.cmd("rcvtimeo", fd, 0, 300000) == "ok"
    assert t.cmd("inherit", fd, 1) == "ok"  # clear FD_CLOEXEC
    ev0 = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    assert t.cmd("epoll", 0, fd, hex(ev0), "0xdeadbeef00000007") == "ok"
    assert t.cmd("epoll", 1, fd, hex(select.EPOLLIN), "0x42") == "ok"
    ep_before = snapshot(t.pid).epoll
    flags_before = fd_flags(t.pid, fd)
    assert not flags_before.cloexec and not flags_before.nonblock
    c2 = swap_server_end(t.pid, c)
    with c2:
        assert fd_flags(t.pid, fd) == flags_before
        assert snapshot(t.pid).epoll == ep_before
        t0 = time.monotonic()
        assert t.cmd("recv", fd, 10) == "EAGAIN"  # SO_RCVTIMEO still works on the new socket
        assert 0.25 < time.monotonic() - t0 < 2
        c2.sendall(b"ping")
        assert t.cmd("wait", 0) == hex(0xDEADBEEF00000007)  # events from the new socket
        assert t.cmd("wait", 1) == "0x42"
        assert bytes.fromhex(t.cmd("recv", fd, 10)) == b"ping"
        # now the other way round: close-on-exec and non-blocking
        assert t.cmd("inherit", fd, 0) == "ok"
        assert t.cmd("nonblock", fd, 1) == "ok"
        flags2 = fd_flags(t.pid, fd)
        c3 = swap_server_end(t.pid, c2)
    with c3:
        assert fd_flags(t.pid, fd) == flags2 and flags2.cloexec and flags2.nonblock
        t0 = time.monotonic()
        assert t.cmd("recv", fd, 10) == "EAGAIN"
        assert time.monotonic() - t0 < 0.2  # non-blocking: no timeout wait
        c3.sendall(b"pong")
        assert t.cmd("wait", 0) == hex(0xDEADBEEF00000007)
        assert bytes.fromhex(t.cmd("recv", fd, 10)) == b"pong"
        assert t.cmd("send", fd, b"back".hex()) == "4"
        assert recv_exact(c3, 4) == b"back"
    assert_running(t.pid)


def test_signal_driven_io_carried(target):
    """O_ASYNC: the new socket still raises SIGIO in the app (owner, signal and flag carried)."""
    t = target
    c, fd = t.connect()
    assert t.cmd("async", fd) == "ok"
    c.sendall(b"1")
    _wait(lambda: int(t.cmd("sigio")) >= 1)
    assert bytes.fromhex(t.cmd("recv", fd, 1)) == b"1"
    flags = fd_flags(t.pid, fd)
    assert flags.async_io
    c2 = swap_server_end(t.pid, c)
    with c2:
        assert fd_flags(t.pid, fd) == flags
        with copy_socket(t.pid, fd) as cp:
            owner = async_owner(cp)
        assert (owner.owner_type, owner.owner) == (1, t.pid)  # F_OWNER_PID
        n = int(t.cmd("sigio"))
        c2.sendall(b"2")
        _wait(lambda: int(t.cmd("sigio")) > n)
        assert bytes.fromhex(t.cmd("recv", fd, 1)) == b"2"
    assert_running(t.pid)


def _v4mapped_pair() -> tuple[socket.socket, socket.socket]:
    """(server side, client side) of a new AF_INET6 loopback connection over ::ffff:127.0.0.1."""
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as lst:
        c2 = socket.socket(socket.AF_INET6)
        c2.connect(("::ffff:127.0.0.1", lst.getsockname()[1]))
        s2, _ = lst.accept()
    return s2, c2


def test_options_of_the_other_family_never_fail_the_swap(target):
    """The one family-specific option carried, IP_TOS / IPV6_TCLASS, is set as the new
    socket's family's: AF_INET -> AF_INET6 (v4-mapped) -> AF_INET, bytes flowing each time."""
    t = target
    c, fd = t.connect()
    with copy_socket(t.pid, fd) as cp:
        assert cp.family == socket.AF_INET
        cp.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x28)
    for make, family, level, opt in (
        (_v4mapped_pair, socket.AF_INET6, socket.IPPROTO_IPV6, socket.IPV6_TCLASS),
        (fresh_pair, socket.AF_INET, socket.IPPROTO_IP, socket.IP_TOS),
    ):
        s2, c2 = make()
        with s2:
            replace_fd(t.pid, fd, s2, expected_inode=socket_inode(t.pid, fd)).close()
        c.close()
        c = c2
        with copy_socket(t.pid, fd) as cp:
            assert cp.family == family and cp.getsockopt(level, opt) == 0x28
        c.sendall(b"fam")
        assert bytes.fromhex(t.cmd("recv", fd, 3)) == b"fam"
        assert t.cmd("send", fd, b"ok".hex()) == "2"
        assert recv_exact(c, 2) == b"ok"
    c.close()
    assert_running(t.pid)


def test_fd_reused_by_app_is_refused_and_target_untouched(target):
    t = target
    c, fd = target.connect()
    inode = socket_inode(t.pid, fd)  # the "event" the router saw
    assert t.cmd("close", fd) == "ok"  # the app closes it and reuses the number
    c.close()
    c_new, fd_new = t.connect()
    assert fd_new == fd
    assert t.cmd("epoll", 0, fd, hex(select.EPOLLIN), "0x1") == "ok"
    before = snapshot(t.pid)
    s2, c2 = fresh_pair()
    with s2, c2, c_new, pytest.raises(StaleFdError) as ei:
        replace_fd(t.pid, fd, s2, expected_inode=inode)
    assert ei.value.pid == t.pid and ei.value.fd == fd and ei.value.expected == inode
    assert snapshot(t.pid) == before
    assert_running(t.pid)
    assert t.cmd("epfds")  # still answering


@pytest.mark.parametrize("fail_at", ["del", "dup3", "add", "fdpass"])
def test_failure_mid_swap_rolls_back(target, monkeypatch, fail_at):
    """A step fails inside the target (a forced error; the target is real): all is undone."""
    t = target
    c, fd = t.connect()
    for n, data in ((0, "0x10"), (1, "0x20")):
        assert t.cmd("epoll", n, fd, hex(select.EPOLLIN), data) == "ok"
    before = snapshot(t.pid)
    inode = socket_inode(t.pid, fd)
    flags = fd_flags(t.pid, fd)
    real_ctl, real_dup3, real_send = (
        swap_mod._Remote.epoll_ctl, swap_mod._Remote.dup3, swap_mod.send_fd,
    )  # fmt: skip
    calls = {"n": 0}

    def ctl(self, op, fd_, w):
        if (fail_at == "del" and op == 2) or (fail_at == "add" and op == 1):
            calls["n"] += 1
            if calls["n"] == 2:  # the second set: one already changed
                raise RemoteSyscallError(12, t.pid, t.pid, "epoll_ctl")
        return real_ctl(self, op, fd_, w)

    def dup3(self, src, dst, cloexec):
        calls["n"] += 1
        if fail_at == "dup3" and calls["n"] == 1:
            raise RemoteSyscallError(24, t.pid, t.pid, "dup3")
        return real_dup3(self, src, dst, cloexec)

    def send(proc, sock, timeout=5.0, buffer=None):
        if fail_at == "fdpass":
            raise InjectorError("forced handoff failure")
        return real_send(proc, sock, timeout=timeout, buffer=buffer)

    monkeypatch.setattr(swap_mod._Remote, "epoll_ctl", ctl)
    monkeypatch.setattr(swap_mod._Remote, "dup3", dup3)
    monkeypatch.setattr(swap_mod, "send_fd", send)
    s2, c2 = fresh_pair()
    with s2, c2, pytest.raises(InjectorError) as ei:
        replace_fd(t.pid, fd, s2)
    if fail_at == "fdpass":
        assert not isinstance(ei.value, SwapError)  # nothing had been changed yet
    else:
        assert isinstance(ei.value, SwapError) and ei.value.rollback_error is None
        assert isinstance(ei.value.__cause__, RemoteSyscallError)
        assert f"pid {t.pid} fd {fd}" in str(ei.value)
    assert socket_inode(t.pid, fd) == inode  # the old socket is back
    assert fd_flags(t.pid, fd) == flags
    assert snapshot(t.pid) == before  # same fds, maps, epoll events and data
    assert_running(t.pid)
    with c:  # and the old connection still works end to end
        c.sendall(b"still")
        assert t.cmd("wait", 0) == "0x10" and t.cmd("wait", 1) == "0x20"
        assert bytes.fromhex(t.cmd("recv", fd, 5)) == b"still"


def test_swap_many_all_or_nothing(target, monkeypatch):
    t = target
    (c1, fd1), (c2, fd2) = t.connect(), t.connect()
    ino1, ino2 = socket_inode(t.pid, fd1), socket_inode(t.pid, fd2)
    pairs = [fresh_pair(), fresh_pair()]
    before = snapshot(t.pid)
    # second one stale: nothing changes, the first is put back
    with pytest.raises(StaleFdError):
        swap_many(t.pid, {fd1: pairs[0][0], fd2: pairs[1][0]},
                  expected_inodes={fd1: ino1, fd2: ino2 + 1})  # fmt: skip
    assert (socket_inode(t.pid, fd1), socket_inode(t.pid, fd2)) == (ino1, ino2)
    assert snapshot(t.pid) == before
    olds = swap_many(t.pid, {fd1: pairs[0][0], fd2: pairs[1][0]},
                     expected_inodes={fd1: ino1, fd2: ino2})  # fmt: skip
    assert {fd: os.fstat(o.fileno()).st_ino for fd, o in olds.items()} == {fd1: ino1, fd2: ino2}
    for (s, c), fd in zip(pairs, (fd1, fd2), strict=True):
        s.close()
        c.sendall(b"x%d" % fd)
        assert bytes.fromhex(t.cmd("recv", fd, 10)) == b"x%d" % fd
        c.close()
    for o in (*olds.values(), c1, c2):
        o.close()
    assert_running(t.pid)


def _socket_in_netns(pid: int) -> socket.socket:
    """A TCP socket created in `pid`'s network namespace (by a thread that setns'es)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list = []

    def work() -> None:
        ns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(ns, 0x40000000) != 0:
                out.append(OSError(ctypes.get_errno(), "setns"))
                return
            out.append(socket.socket())
        finally:
            os.close(ns)  # the thread ends here, still in that netns: harmless

    th = threading.Thread(target=work)
    th.start()
    th.join()
    if isinstance(out[0], OSError):
        raise out[0]
    return out[0]


def test_pod_connection_swapped_for_host_network_socket():
    """The router's case: the app lives in its own netns (a "pod"); its connection there is
    replaced by a socket of the host netns, and it keeps talking without noticing."""
    t = FdTarget(prefix=["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"',
                         "sh"])  # fmt: skip
    try:
        assert os.stat(f"/proc/{t.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        a = _socket_in_netns(t.pid)
        t.proc.stdin.write("accept\n")
        t.proc.stdin.flush()
        a.connect(("127.0.0.1", t.port))  # 127.0.0.1 of the pod's netns
        fd = int(t.readline())
        with a:
            a.sendall(b"overlay")
            assert bytes.fromhex(t.cmd("recv", fd, 7)) == b"overlay"
            s2, c2 = fresh_pair()  # host netns
            with s2:
                old = replace_fd(t.pid, fd, s2, expected_inode=socket_inode(t.pid, fd))
            old.close()
        with c2:
            c2.sendall(b"host")
            assert bytes.fromhex(t.cmd("recv", fd, 4)) == b"host"
            assert t.cmd("send", fd, b"reply".hex()) == "5"
            assert recv_exact(c2, 5) == b"reply"
        assert_running(t.pid)
    finally:
        t.close()


def test_target_killed_while_frozen_is_an_ordinary_error(target):
    t = target
    c, fd = t.connect()
    s2, c2 = fresh_pair()
    with c, s2, c2, pytest.raises(InjectorError), freeze(t.pid) as proc:
        os.kill(t.pid, 9)
        replace_fd(t.pid, fd, s2, proc=proc)
    # (this test process is the target's parent and its tracer: freeze may reap it itself)
    with contextlib.suppress(ChildProcessError, subprocess.TimeoutExpired):
        t.proc.wait(5)
    assert not os.path.exists(f"/proc/{t.pid}")


def test_rollback_failure_is_reported_and_other_undo_steps_still_run(target, monkeypatch):
    """ADD into the second set fails, then re-adding to the first set fails too (forced errors,
    real target): the error says so, and every other undo step still ran."""
    t = target
    c, fd = t.connect()
    for n, data in ((0, "0x10"), (1, "0x20")):
        assert t.cmd("epoll", n, fd, hex(select.EPOLLIN), data) == "ok"
    inode = socket_inode(t.pid, fd)
    before = snapshot(t.pid)
    real_ctl = swap_mod._Remote.epoll_ctl
    adds = {"n": 0}

    def ctl(self, op, fd_, w):
        if op == 1:
            adds["n"] += 1
            # 1st ADD (set 0) ok, 2nd (set 1) fails; rollback re-adds: set 0 fails, set 1 ok
            if adds["n"] in (2, 3):
                raise RemoteSyscallError(12, t.pid, t.pid, "epoll_ctl")
        return real_ctl(self, op, fd_, w)

    monkeypatch.setattr(swap_mod._Remote, "epoll_ctl", ctl)
    s2, c2 = fresh_pair()
    with s2, c2, pytest.raises(SwapError) as ei:
        replace_fd(t.pid, fd, s2)
    assert isinstance(ei.value.rollback_error, RemoteSyscallError)
    assert "ROLLBACK ALSO FAILED" in str(ei.value)
    assert socket_inode(t.pid, fd) == inode  # the old socket is back anyway
    after = snapshot(t.pid)
    assert after.fds == before.fds and after.maps == before.maps
    assert after.epoll[t.epfds[1]] == before.epoll[t.epfds[1]]
    assert after.epoll[t.epfds[0]] == []  # the one step that failed
    assert_running(t.pid)
    c.close()
