"""The tracer's eager stop, against the real kernel: a connect to an eager listener, or an
accept on one from an eager peer CIDR, stops the caller (SIGSTOP from the program) before it
runs another instruction of its own; anything else runs on. Every stopped process is resumed
(SIGCONT) by the tests themselves, even when they fail."""

from __future__ import annotations

import contextlib
import os
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


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    t = Tracer(host_netns_inode=0)
    t.open()
    try:
        yield t
    finally:
        t.close()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_event(tracer: Tracer, kind: EventKind, pid: int, timeout: float = 3.0
                ) -> SocketEvent | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in tracer.read(timeout=0.1):
            if ev.kind == kind and ev.pid == pid:
                return ev
    return None


@contextlib.contextmanager
def _child(code: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_connect_to_an_eager_listener_stops_the_caller_before_its_first_write(
        tracer: Tracer, host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as lst:
        lst.bind((host, 0))
        lst.listen()
        port = lst.getsockname()[1]
        tracer.eager_listener(host, port)
        code = (f"import socket,time\ns=socket.create_connection(({host!r},{port}))\n"
                "s.sendall(b'first bytes')\ntime.sleep(30)\n")
        with _child(code) as proc:
            ev = _wait_event(tracer, EventKind.CONNECT, proc.pid)
            assert ev is not None and ev.stopped and ev.ret == 0
            assert ev.rport == port
            time.sleep(0.1)
            assert _state(proc.pid) == "T"
            assert int.from_bytes(next(iter(tracer.stops_map.keys())), "little") == proc.pid
            conn, _ = lst.accept()
            with conn:
                conn.setblocking(False)
                with pytest.raises(BlockingIOError):
                    conn.recv(100)  # the app wrote nothing: it never ran after connect()
                os.kill(proc.pid, signal.SIGCONT)
                tracer.stop_settled(proc.pid)
                conn.settimeout(5)
                assert conn.recv(100) == b"first bytes"
        assert not list(tracer.stops_map.keys())


def test_nonblocking_connect_is_stopped_at_einprogress(tracer: Tracer) -> None:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        port = lst.getsockname()[1]
        tracer.eager_listener("127.0.0.1", port)
        code = (f"import socket,time\ns=socket.socket()\ns.setblocking(False)\n"
                f"s.connect_ex(('127.0.0.1',{port}))\ntime.sleep(30)\n")
        with _child(code) as proc:
            ev = _wait_event(tracer, EventKind.CONNECT, proc.pid)
            assert ev is not None and ev.stopped
            assert ev.ret in (0, -115)  # EINPROGRESS (loopback may finish at once)
            time.sleep(0.1)
            assert _state(proc.pid) == "T"


def test_other_connections_are_not_stopped(tracer: Tracer) -> None:
    with socket.socket() as lst, socket.socket() as other:
        lst.bind(("127.0.0.1", 0))
        lst.listen()
        other.bind(("127.0.0.1", 0))
        other.listen()
        tracer.eager_listener("127.0.0.1", lst.getsockname()[1])
        port = other.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1',{port})).sendall(b'x')\n"
        with _child(code) as proc:
            ev = _wait_event(tracer, EventKind.CONNECT, proc.pid)
            assert ev is not None and not ev.stopped
            assert proc.wait(timeout=5) == 0


@pytest.mark.parametrize("host, cidr", [("127.0.0.1", "127.0.0.0/8"), ("::1", "::1/128")])
@pytest.mark.parametrize("peer_on", [False, True])
def test_accept_is_stopped_only_from_an_eager_peer_cidr(tracer: Tracer, host: str, cidr: str,
                                                        peer_on: bool) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as lst:
        lst.bind((host, 0))
        lst.listen(8)
        port = lst.getsockname()[1]
        tracer.eager_listener(host, port)
        if peer_on:
            tracer.eager_peer(cidr)
        client = (f"import socket,time\ns=socket.create_connection(({host!r},{port}))\n"
                  "time.sleep(30)\n")
        # The client's connect matches the same key (one machine plays both nodes): it is
        # stopped too, and resumed here.
        with _child(client) as cproc:
            ev = _wait_event(tracer, EventKind.CONNECT, cproc.pid)
            assert ev is not None and ev.stopped
            os.kill(cproc.pid, signal.SIGCONT)
            pid = os.fork()
            if pid == 0:  # the server app: accept, then exit at once
                try:
                    lst.accept()
                finally:
                    os._exit(0)
            try:
                ev = _wait_event(tracer, EventKind.ACCEPT, pid)
                assert ev is not None and ev.stopped is peer_on
                if peer_on:
                    time.sleep(0.1)
                    assert _state(pid) == "T"
                    os.kill(pid, signal.SIGCONT)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
            finally:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


def test_eager_maps_forget_entries(tracer: Tracer) -> None:
    tracer.eager_listener("10.1.2.3", 80)
    tracer.eager_listener("fd00::5", 443)
    tracer.eager_peer("10.2.0.0/16")
    assert tracer.eager_entries() == (3, 1)  # IPv4 twice: plain and v4-mapped
    tracer.eager_listener("10.1.2.3", 80, on=False)
    assert tracer.eager_entries() == (1, 1)
    tracer.eager_clear()
    assert tracer.eager_entries() == (0, 0)
