"""The eager swap end to end on the testbed (root): connections swapped at connect()/accept()
return, before their first byte, with the overlay addresses still visible to the apps.

Real apps in real pods (tests/ebpfrouter/eager_apps.py: an asyncio and a multi-threaded
accepting server, blocking and non-blocking clients), two real routers, the VXLAN device's
counters as the witness that no payload crossed the overlay.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_daemon as td  # the daemon tests' router helpers

from ebpfrouter.demo import PACKAGE_ROOT, Routers, child_env, wait_line
from ebpfrouter.testbed import Testbed

APPS = str(Path(__file__).with_name("eager_apps.py"))
PORT = 7300

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    testbed = Testbed.up(2, 1)
    try:
        yield testbed
    finally:
        testbed.down()


@contextlib.contextmanager
def routers_on(bed: Testbed, extra: list[str] | None = None) -> Iterator[Routers]:
    """The daemon tests' routers (status and logs shown on failure), every listener eager."""
    with td._routers(bed) as r:
        args = ["--eager", "always", *(extra or [])]  # (auto learns it per listener)
        r.start(extra_args={n.name: args for n in bed.nodes})
        yield r


@pytest.fixture
def routers(bed: Testbed) -> Iterator[Routers]:  # (per test: the fault tests run their own)
    with routers_on(bed) as r:
        yield r


@contextlib.contextmanager
def app_server(bed: Testbed, kind: str, port: int) -> Iterator[subprocess.Popen[str]]:
    proc = bed.popen("n1p0", [sys.executable, APPS, "server", kind, str(port)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                     cwd=str(PACKAGE_ROOT))
    try:
        wait_line(proc, "app server")
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def run_client(bed: Testbed, port: int, nbytes: int, mode: str) -> dict:
    out = bed.run("n2p0", [sys.executable, APPS, "client", bed.pod("n1p0").ip, str(port),
                           str(nbytes), mode], env=child_env(), cwd=str(PACKAGE_ROOT),
                  timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for(cond, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def wait_announced(routers: Routers, port: int) -> None:
    wait_for(lambda: any(lst["overlay"].endswith(f":{port}") and not lst["host"].endswith(":0")
                         for lst in routers.status("node1")["listeners"]), 10, "host listener")
    time.sleep(0.2)  # the announcement reaches node2 over the control channel


def stats(routers: Routers, node: str) -> dict:
    return routers.status(node)["engine"]["stats"]


@pytest.mark.parametrize("server, mode", [("asyncio", "blocking"), ("threaded", "nonblocking"),
                                          ("asyncio", "nonblocking")])
def test_eager_swap_no_payload_on_the_overlay_and_overlay_addresses_visible(
        bed: Testbed, routers: Routers, server: str, mode: str) -> None:
    port = PORT + len(server) + len(mode)
    with app_server(bed, server, port):
        wait_announced(routers, port)
        before = {n: stats(routers, n).get("swapped_eager", 0) for n in ("node1", "node2")}
        vx0 = bed.link_stats("node2", "flannel.1")["tx_bytes"]
        result = run_client(bed, port, 8 << 20, mode)
        vx1 = bed.link_stats("node2", "flannel.1")["tx_bytes"]
    assert result["ok"], result
    client_ip, server_ip = bed.pod("n2p0").ip, bed.pod("n1p0").ip
    # the client saw the overlay addresses at connect() return and at the end ...
    for view in (result["first"], result["last"]):
        assert view["peername"] == [server_ip, port], result
        assert view["sockname"][0] == client_ip, result
    # ... and so did the server, after its first read (Open MPI's check)
    assert result["server"]["peername"] == [client_ip, result["first"]["sockname"][1]]
    assert result["server"]["sockname"] == [server_ip, port]
    for node in ("node1", "node2"):
        assert stats(routers, node).get("swapped_eager", 0) == before[node] + 1, node
    # 8 MiB each way; the overlay carried the handshakes and control traffic only
    assert vx1 - vx0 < 64 * 1024, f"{vx1 - vx0} bytes left node2 on the VXLAN device"


def test_status_shows_each_connection_path(bed: Testbed, routers: Routers) -> None:
    port = PORT + 40
    with app_server(bed, "asyncio", port):
        wait_announced(routers, port)
        run_client(bed, port, 1 << 16, "blocking")
        status = routers.status("node2")
    assert status["engine"]["stats"].get("swapped_eager", 0) >= 1
    assert any(k.startswith("eager") for k in status["engine"]["stats"])


# -- faults: a daemon killed while apps are stopped leaves no process stopped ---------------------

LAZY_SERVER = """
import socket, sys
lst = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
sys.stdin.readline()  # accept only when told: until then the client's eager swap waits
conn, _ = lst.accept()
got = b""
while len(got) < 11:
    got += conn.recv(100)
print(got.decode(), flush=True)
"""
EAGER_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
s.sendall(b"hello world")
print("sent", flush=True)
"""


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("killed", ["client", "server"])
def test_daemon_sigkilled_while_its_app_is_stopped_leaves_it_running(bed: Testbed,
                                                                     killed: str) -> None:
    """The guardian resumes the app; the connection then simply runs over the overlay."""
    port = PORT + 50 + (killed == "server")
    with routers_on(bed, ["--eager-wait", "2"]) as routers:
        server = bed.popen("n1p0", [sys.executable, "-c", LAZY_SERVER, str(port)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        client = None
        try:
            wait_line(server, "lazy server")
            wait_announced(routers, port)
            if killed == "server":  # the client's router is frozen: no bind ever comes
                os.kill(routers.procs["node2"].pid, signal.SIGSTOP)
            client = bed.popen("n2p0", [sys.executable, "-c", EAGER_CLIENT,
                                        bed.pod("n1p0").ip, str(port)],
                               stdout=subprocess.PIPE, text=True)
            if killed == "client":
                wait_for(lambda: proc_state(client.pid) in "Tt", 5, "client stopped at connect")
                victim, app = "node2", client
            else:
                assert server.stdin is not None
                server.stdin.write("go\n")
                server.stdin.flush()
                wait_for(lambda: proc_state(server.pid) in "Tt", 5, "server stopped at accept")
                victim, app = "node1", server
            routers.procs[victim].kill()
            routers.procs[victim].wait()
            t0 = time.monotonic()
            # (T: group-stopped; t: also seized by the daemon, which lets go when it dies)
            wait_for(lambda: proc_state(app.pid) not in "Tt", 2, "the guardian's SIGCONT")
            resumed_ms = (time.monotonic() - t0) * 1000
            print(f"app resumed {resumed_ms:.0f} ms after its daemon was killed")
            if killed == "server":
                os.kill(routers.procs["node2"].pid, signal.SIGCONT)
            else:
                assert server.stdin is not None
                server.stdin.write("go\n")
                server.stdin.flush()
            out, _ = server.communicate(timeout=20)
            assert out.splitlines()[-1] == "hello world"  # every byte, over the overlay
            assert client.wait(timeout=20) == 0
        finally:
            for proc in (server, client):
                if proc is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                    proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.kill(routers.procs["node2"].pid, signal.SIGCONT)
