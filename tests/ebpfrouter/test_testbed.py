"""The local testbed: real namespaces, veth, bridges and VXLAN (root)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from pyroute2 import netns

from ebpfrouter.podmeta import StaticPodMetadata
from ebpfrouter.testbed import (
    PREFIX,
    Testbed,
    TestbedError,
    down_all,
    main_testbed,
    netns_context,
    netns_inode,
)

pytestmark = pytest.mark.root


def run_id() -> str:
    return PREFIX + uuid.uuid4().hex[:6]


def ours(rid: str) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(rid)]


def tcp_roundtrip(bed: Testbed, server_ns: str, server_ip: str, client_ns: str,
                  payload: bytes) -> bytes:
    """Echo `payload` through a TCP server in one namespace from a client in another."""
    with netns_context(server_ns):
        srv = socket.create_server((server_ip, 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while len(data) < len(payload):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(data)

    thread = threading.Thread(target=serve)
    thread.start()
    with netns_context(client_ns):
        cli = socket.create_connection((server_ip, port), timeout=5)
    with cli:
        cli.sendall(payload)
        echoed = b""
        while len(echoed) < len(payload):
            chunk = cli.recv(65536)
            if not chunk:
                break
            echoed += chunk
    thread.join(5)
    srv.close()
    return echoed


@pytest.fixture
def bed():
    testbed = Testbed.up(nodes=2, pods_per_node=2, run_id=run_id())
    try:
        yield testbed
    finally:
        testbed.down()
        assert ours(testbed.run_id) == []


def test_overlay_and_underlay_paths(bed: Testbed) -> None:
    assert set(ours(bed.run_id)) == set(bed.all_netns())
    assert len(bed.all_netns()) == 1 + 2 + 4
    src, dst = bed.pod("n1p0"), bed.pod("n2p1")
    payload = bytes(range(256)) * 400  # 100 KiB: many full-size segments
    before = bed.link_stats("node1", "flannel.1")
    assert tcp_roundtrip(bed, dst.netns, dst.ip, src.netns, payload) == payload
    after = bed.link_stats("node1", "flannel.1")
    assert after["tx_bytes"] - before["tx_bytes"] >= len(payload)  # really over the VXLAN
    assert after["rx_bytes"] - before["rx_bytes"] >= len(payload)
    # node to node over the underlay, not the vxlan device
    n1, n2 = bed.node("node1"), bed.node("node2")
    before = bed.link_stats("node1", "flannel.1")
    assert tcp_roundtrip(bed, n2.netns, n2.underlay_ip, n1.netns, payload) == payload
    assert bed.link_stats("node1", "flannel.1")["tx_bytes"] - before["tx_bytes"] < 10_000
    # same-node pods talk over the bridge
    assert tcp_roundtrip(bed, bed.pod("n1p1").netns, bed.pod("n1p1").ip, src.netns, b"x") == b"x"


def test_mtu_state_and_metadata(bed: Testbed) -> None:
    state = json.loads(bed.state_path.read_text())
    assert state["complete"] and set(state["netns"]) == set(bed.all_netns())
    meta = StaticPodMetadata.from_file(bed.metadata_path)
    pod = meta.pod_for_ip("10.244.2.3")
    assert pod is not None and pod.name == "n2p1" and pod.labels["app"] == "app1"
    proc = bed.popen("n2p1", ["sleep", "30"])
    try:
        assert meta.pod_for_pid(proc.pid) == pod
        assert netns_inode(bed.pod("n2p1").netns) == pod.netns_inode
    finally:
        proc.kill()
        proc.wait()
    assert meta.pod_for_pid(1) is None  # host process
    out = bed.run("node1", [sys.executable, "-c",
                            "import socket;print(socket.if_nametoindex('flannel.1'))"])
    assert out.returncode == 0 and int(out.stdout) > 0
    with pytest.raises(TestbedError, match="no pod or node 'n9p9'"):
        bed.netns_of("n9p9")


def test_down_kills_processes_left_inside() -> None:
    testbed = Testbed.up(nodes=2, pods_per_node=1, run_id=run_id())
    proc = testbed.popen("n1p0", ["sleep", "60"])
    try:
        testbed.down()
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert ours(testbed.run_id) == []
    assert not testbed.state_path.exists()


def test_crash_mid_up_then_down_all_cleans() -> None:
    rid = run_id()
    child = subprocess.Popen([sys.executable, "-m", "ebpfrouter.testbed", "up", "--nodes", "4",
                              "--pods-per-node", "3", "--id", rid],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while len(ours(rid)) < 4 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert ours(rid), "the builder should have created something before it was killed"
        down_all(include_detached=False)  # spare other people's CLI testbeds on this machine
        assert ours(rid) == []
        assert not list(Testbed(rid, [], []).state_dir.glob(f"testbed-{rid}*"))
    finally:
        if child.poll() is None:
            child.kill()
        for name in ours(rid):
            netns.remove(name)


def test_cli_up_exec_down(capsys) -> None:
    rid = run_id()
    try:
        assert main_testbed(["up", "--id", rid, "--json"]) == 0
        state = json.loads(capsys.readouterr().out)
        assert state["id"] == rid and len(state["pods"]) == 2
        assert main_testbed(["exec", "--id", rid, "n2p0", "--", "true"]) == 0
        assert main_testbed(["exec", "--id", rid, "n2p0", "--", "false"]) == 1
        assert main_testbed(["exec", "--id", rid, "n2p0", "--", "no-such-cmd-xyz"]) == 1
        assert "command not found" in capsys.readouterr().err
    finally:
        assert main_testbed(["down", "--id", rid]) == 0
    assert ours(rid) == []


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_iperf3_overlay_vs_underlay(bed: Testbed) -> None:
    """Measured and printed, not asserted beyond: both runs produced a figure."""
    results = {}
    for name, server, client, addr in (("overlay pod-to-pod", "n2p0", "n1p0", "10.244.2.2"),
                                       ("underlay node-to-node", "node2", "node1", "192.168.77.2")):
        srv = bed.popen(server, ["iperf3", "-s", "-1"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        try:
            out = None
            for _ in range(50):  # until the server listens
                out = bed.run(client, ["iperf3", "-c", addr, "-t", "2", "-J"], timeout=30)
                bps = _iperf_bps(out.stdout) if out.returncode == 0 else None
                if bps is not None:
                    results[name] = bps
                    break
                time.sleep(0.1)
            assert name in results, out and (out.stdout[-500:], out.stderr[-500:])
        finally:
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
    for name, bps in results.items():
        print(f"iperf3 {name}: {bps / 1e9:.2f} Gbit/s")


def _iperf_bps(text: str) -> float | None:
    try:
        return float(json.loads(text)["end"]["sum_received"]["bits_per_second"])
    except (ValueError, KeyError, TypeError):
        return None
