"""The tracer's in-kernel filtering and aging, against the real kernel.

With ``filter_remote`` a connect or accept whose peer is not in ``remote_pods`` produces no
record and is not tracked; with ``age`` a connection waits in the kernel until it is that old,
and one closed younger is never reported at all (only counted). Loopback addresses stand for
pods: 127.0.0.0/8 has room for "remote" and "local" ones.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ebpfrouter.tracer import SocketEvent, Tracer
from ebpfrouter.tracer_layout import EventKind

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

AGE = 0.3
SOCKET_KINDS = (EventKind.CONNECT, EventKind.ACCEPT, EventKind.CLOSE)


@contextlib.contextmanager
def _tracer(**kw: object) -> Iterator[Tracer]:
    t = Tracer(host_netns_inode=0, **kw)  # type: ignore[arg-type]
    t.open()
    try:
        yield t
    finally:
        t.close()


@contextlib.contextmanager
def _child(code: str, netns: str | None = None) -> Iterator[subprocess.Popen[str]]:
    argv = [sys.executable, "-c", code]
    if netns is not None:
        argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _events(tracer: Tracer, pids: set[int], seconds: float) -> list[SocketEvent]:
    out: list[SocketEvent] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out += [ev for ev in tracer.read(timeout=0.05) if ev.pid in pids]
    return out


def _listener(addr: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    lst = socket.socket(family)
    lst.bind((addr, 0))
    lst.listen(512)
    lst.settimeout(10)  # a test that goes wrong fails instead of hanging in accept()
    return lst


# ------------------------------------------------------------------------ filter_remote


def test_only_connections_with_a_remote_pod_peer_are_reported_and_tracked() -> None:
    with _tracer(filter_remote=True) as tracer, _listener("0.0.0.0") as lst:
        port = lst.getsockname()[1]
        tracer.remote_pods("127.0.0.1/32")
        code = ("import socket,time\n"
                f"a=socket.create_connection(('127.0.0.1',{port}),"  # remote pod: reported
                "source_address=('127.0.0.5',0))\n"
                f"b=socket.create_connection(('127.0.0.2',{port}))\n"  # not a remote pod
                "print(a.fileno(),b.fileno(),flush=True)\ntime.sleep(30)\n")
        with _child(code) as proc:
            assert proc.stdout is not None
            fa, _ = map(int, proc.stdout.readline().split())
            accepted = [lst.accept()[0] for _ in range(2)]
            evs = _events(tracer, {proc.pid}, 0.6)
            assert [ev.fd for ev in evs if ev.kind == EventKind.CONNECT] == [fa]
            assert {fd for (pid, fd) in tracer.tracked() if pid == proc.pid} == {fa}
            for conn in accepted:
                conn.close()
        assert tracer.remote_pod_entries() == 1
        tracer.remote_pods("127.0.0.1/32", on=False)
        assert tracer.remote_pod_entries() == 0


def test_accepts_are_filtered_by_their_client() -> None:
    with _tracer(filter_remote=True) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        tracer.remote_pods("127.0.0.9/32")
        code = ("import socket,time\n"
                f"a=socket.create_connection(('127.0.0.1',{port}),source_address=('127.0.0.9',0))\n"
                f"b=socket.create_connection(('127.0.0.1',{port}),source_address=('127.0.0.8',0))\n"
                "print(a.getsockname()[1],flush=True)\ntime.sleep(30)\n")
        with _child(code) as proc:
            assert proc.stdout is not None
            remote_port = int(proc.stdout.readline())
            accepted = [lst.accept()[0] for _ in range(2)]
            evs = _events(tracer, {os.getpid()}, 0.6)
            accepts = [ev for ev in evs if ev.kind == EventKind.ACCEPT]
            assert [(ev.raddr, ev.rport) for ev in accepts] == [("127.0.0.9", remote_port)]
            for conn in accepted:
                conn.close()


@pytest.mark.parametrize(("target", "source", "cidr"), [
    ("fd00:e1::1", "fd00:e1::2", "fd00:e1::1/128"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.5", "127.0.0.1/32"),
])
def test_ipv6_and_v4_mapped_peers_match_their_cidrs(netns_name: str, target: str, source: str,
                                                     cidr: str) -> None:
    """An AF_INET6 connect to a remote pod (IPv6, or IPv4 as v4-mapped) is reported; its accept,
    whose client is no remote pod, is not. In a netns of its own, which has room for two IPv6
    addresses on loopback."""
    from pyroute2 import NetNS

    with NetNS(netns_name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        for addr in ("fd00:e1::1", "fd00:e1::2"):
            ns.addr("add", index=lo, address=addr, prefixlen=128, flags=0x02)  # IFA_F_NODAD
    code = ("import socket,time\n"
            "l=socket.socket(socket.AF_INET6);"
            "l.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n"
            "l.bind(('::',0));l.listen()\n"
            f"s=socket.socket(socket.AF_INET6);s.bind(({source!r},0))\n"
            f"s.connect(({target!r},l.getsockname()[1]));c=l.accept()[0]\n"
            "print(s.fileno(),flush=True)\ntime.sleep(30)\n")
    with _tracer(filter_remote=True) as tracer:
        tracer.remote_pods(cidr)
        with _child(code, netns=netns_name) as proc:
            assert proc.stdout is not None
            fd = int(proc.stdout.readline())
            evs = _events(tracer, {proc.pid}, 0.6)
            assert [ev.fd for ev in evs if ev.kind == EventKind.CONNECT] == [fd]
            assert [ev for ev in evs if ev.kind == EventKind.ACCEPT] == []


def test_a_connection_whose_own_address_is_a_remote_pod_is_not_reported() -> None:
    """Where nodes share a kernel (the testbed), one node's connections between its own pods
    look remote to the other's router from the peer's side only: its own address is a remote
    pod too, so neither the connect nor the accept is reported."""
    with _tracer(filter_remote=True) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        tracer.remote_pods("127.0.0.0/8")
        code = ("import socket,time\n"
                f"a=socket.create_connection(('127.0.0.1',{port}),source_address=('127.0.0.5',0))\n"
                "print(a.fileno(),flush=True)\ntime.sleep(30)\n")
        with _child(code) as proc:
            assert proc.stdout is not None
            proc.stdout.readline()
            conn, _ = lst.accept()
            evs = _events(tracer, {proc.pid, os.getpid()}, 0.6)
            assert [ev for ev in evs if ev.kind in (EventKind.CONNECT, EventKind.ACCEPT)] == []
            assert not any(pid == proc.pid for (pid, _) in tracer.tracked())
            conn.close()


def test_without_filter_every_connection_is_reported() -> None:
    with _tracer() as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        code = (f"import socket\nsocket.create_connection(('127.0.0.1',{port})).close()\n")
        with _child(code) as proc:
            proc.wait(timeout=5)
            lst.accept()[0].close()
            evs = _events(tracer, {proc.pid}, 0.5)
            assert [ev.kind for ev in evs if ev.kind in SOCKET_KINDS] == [
                EventKind.CONNECT, EventKind.CLOSE]


# ------------------------------------------------------------------------------ aging


@pytest.mark.parametrize("buffer", ["ringbuf", "perf"])
def test_a_connection_closed_young_is_never_reported(buffer: str) -> None:
    with _tracer(age=AGE, buffer=buffer) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        code = ("import socket\n"
                f"for _ in range(20): socket.create_connection(('127.0.0.1',{port})).close()\n")
        with _child(code) as proc:
            for _ in range(20):
                lst.accept()[0].close()
            proc.wait(timeout=5)
            evs = _events(tracer, {proc.pid, os.getpid()}, AGE + 0.4)
        assert [ev.kind for ev in evs if ev.kind in SOCKET_KINDS] == []
        assert tracer.young_closed == 40  # 20 connects and 20 accepts
        assert tracer.young_closes() == {("127.0.0.1", port): 20}
        assert tracer.young_closes() == {}  # taken out: counted once
        assert tracer.young_entries() == 0


def test_a_connection_that_grows_up_is_reported_once_old_with_its_time() -> None:
    with _tracer(age=AGE) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        code = ("import socket,sys,time\n"
                f"s=socket.create_connection(('127.0.0.1',{port}))\n"
                "print(s.fileno(),time.monotonic_ns(),flush=True)\nsys.stdin.readline()\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            fd, connected_ns = map(int, proc.stdout.readline().split())
            conn, _ = lst.accept()
            early = _events(tracer, {proc.pid, os.getpid()}, AGE / 3)
            assert [ev for ev in early if ev.kind == EventKind.CONNECT] == []
            assert tracer.young_entries() == 2
            later = _events(tracer, {proc.pid, os.getpid()}, AGE)
            connects = [ev for ev in later if ev.kind == EventKind.CONNECT]
            accepts = [ev for ev in later if ev.kind == EventKind.ACCEPT]
            assert [ev.fd for ev in connects] == [fd] and len(accepts) == 1
            ev = connects[0]
            assert ev.aged and not ev.stopped and not ev.forked and ev.rport == port
            assert abs(ev.ts_ns - connected_ns) < 50_000_000  # when it happened, not now
            assert tracer.young_entries() == 0
            proc.stdin.write("\n")
            proc.stdin.flush()
            proc.wait(timeout=5)
            conn.close()
            tail = _events(tracer, {proc.pid}, 0.3)
            assert EventKind.CLOSE in {e.kind for e in tail if e.fd == fd}
        finally:
            proc.kill()
            proc.wait()
        assert tracer.young_closed == 0


def test_every_connection_is_either_reported_with_its_close_or_not_at_all() -> None:
    """Lifetimes around the age boundary race the close against user space taking the
    record out: exactly one of them wins, for each of 120 connections."""
    n = 120
    rnd = random.Random(7)
    lifetimes = [rnd.uniform(0, 2 * AGE) for _ in range(n)]
    with _tracer(age=AGE) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        code = ("import socket,threading,time\n"
                f"lifetimes={lifetimes!r}\n"
                "def one(t):\n"
                f"    s=socket.create_connection(('127.0.0.1',{port}))\n"
                "    time.sleep(t); s.close()\n"
                "ts=[threading.Thread(target=one,args=(t,)) for t in lifetimes]\n"
                "[t.start() or time.sleep(0.003) for t in ts]\n[t.join() for t in ts]\n")
        lst.settimeout(10)
        with _child(code) as proc:
            held = [lst.accept()[0] for _ in range(n)]
            proc.wait(timeout=15)
            evs = _events(tracer, {proc.pid}, AGE + 0.5)
            for conn in held:
                conn.close()
        connects = {ev.fd: ev for ev in evs if ev.kind == EventKind.CONNECT}
        opened: dict[int, int] = {}
        reported = 0
        for ev in evs:  # replay: fds are reused, so pair each connect with the next close
            if ev.kind == EventKind.CONNECT:
                opened[ev.fd] = opened.get(ev.fd, 0) + 1
                reported += 1
            elif ev.kind == EventKind.CLOSE:
                assert opened.get(ev.fd, 0) > 0, f"close of fd {ev.fd} without its connect"
                opened[ev.fd] -= 1
        assert not any(opened.values()), "a reported connect without its close"
        assert reported + tracer.young_closed == n  # (the server side is untraced: own netns)
        assert 0 < reported < n and connects  # both outcomes really happened


def test_a_young_connection_of_a_process_that_forked_is_reported_at_its_close() -> None:
    """Fork after accept (a PostgreSQL postmaster): the parent closes its copy at once, the
    child holds the connection on. The close must not forget it."""
    with _tracer(age=AGE) as tracer:
        code = ("import os,socket,time\n"
                "lst=socket.socket(); lst.bind(('127.0.0.1',0)); lst.listen()\n"
                "print(lst.getsockname()[1],flush=True)\n"
                "c,_=lst.accept()\n"
                "pid=os.fork()\n"
                "if pid==0:\n    time.sleep(30); os._exit(0)\n"
                "print(c.fileno(),pid,flush=True); c.close(); time.sleep(30)\n")
        with _child(code) as proc:
            assert proc.stdout is not None
            server_port = int(proc.stdout.readline())
            cli = socket.create_connection(("127.0.0.1", server_port))
            fd, child = map(int, proc.stdout.readline().split())
            try:
                evs = _events(tracer, {proc.pid}, 0.2)  # before AGE: reported by the close
                accepts = [ev for ev in evs if ev.kind == EventKind.ACCEPT]
                assert len(accepts) == 1 and accepts[0].fd == fd
                assert accepts[0].forked and not accepts[0].aged
                closes = [ev for ev in evs if ev.kind == EventKind.CLOSE and ev.fd == fd]
                assert len(closes) == 1 and closes[0].forked
                assert evs.index(accepts[0]) < evs.index(closes[0])
                assert os.readlink(f"/proc/{child}/fd/{fd}").startswith("socket:")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                cli.close()


def test_a_stopped_connection_is_reported_at_once() -> None:
    """The eager swap cannot wait: a connect the program stops skips ``young``."""
    with _tracer(age=AGE) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        tracer.eager_listener("127.0.0.1", port, remote=True)
        code = f"import socket,time\ns=socket.create_connection(('127.0.0.1',{port}))\n" \
               "time.sleep(30)\n"
        with _child(code) as proc:
            evs = _events(tracer, {proc.pid}, AGE / 3)
            connects = [ev for ev in evs if ev.kind == EventKind.CONNECT]
            assert len(connects) == 1 and connects[0].stopped and not connects[0].aged
            os.kill(proc.pid, signal.SIGCONT)
            tracer.stop_settled(proc.pid)
            lst.accept()[0].close()


def test_an_exited_process_leaves_nothing_young() -> None:
    with _tracer(age=5.0) as tracer, _listener() as lst:
        port = lst.getsockname()[1]
        code = (f"import socket,os\ns=socket.create_connection(('127.0.0.1',{port}))\n"
                "os._exit(0)\n")
        with _child(code) as proc:
            proc.wait(timeout=5)
            lst.accept()[0].close()
            evs = _events(tracer, {proc.pid}, 0.5)
        assert [ev.kind for ev in evs if ev.kind != EventKind.EXEC] == [EventKind.EXIT]
        assert tracer.young_entries() == 0
        assert not any(pid == proc.pid for pid, _ in tracer.tracked())


def test_bad_age_is_refused() -> None:
    with pytest.raises(ValueError, match="age"):
        Tracer(age=-1)
