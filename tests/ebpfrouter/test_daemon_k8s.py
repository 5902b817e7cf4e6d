"""The daemon with its Kubernetes sources, on the testbed (root).

The API server is the test STAND-IN of tests/k8s (no real API server can run here), serving
Pod objects for the testbed's pods and Node objects for its nodes. It listens on the
underlay, so the routers (in the nodes' network namespaces) reach it through a kubeconfig,
as a router outside a pod would.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml

from ebpfrouter.testbed import NETNS_DIR, UNDERLAY_NET, netns_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))
import test_daemon as td  # noqa: E402 - the daemon tests' testbed, routers and helpers
from apiserver_standin import StandInApiServer, make_node, make_pod  # noqa: E402
from test_daemon import (  # noqa: E402
    PORT,
    Stream,
    counters,
    stream_server,
    wait_for,
    wait_listener_announced,  # noqa: E402
)

bed = td.bed  # fixtures, shared by name
_shared_holder = td._shared_holder
routers = td.routers

API_ADDR = f"{UNDERLAY_NET}.250"
NOWHERE = f"{UNDERLAY_NET}.200"  # no node has it: a --peer pointing there leads nowhere


def pod_objects(bed, labels: dict[str, dict[str, str]]) -> list[dict]:
    return [make_pod(p.name, p.node, p.ip, labels.get(p.name, {})) for p in bed.pods]


@pytest.fixture
def api(bed):
    """The stand-in on the underlay bridge, with the testbed's Nodes and Pods."""
    res = bed.run("underlay", ["ip", "addr", "replace", f"{API_ADDR}/24", "dev", "br0"])
    assert res.returncode == 0, res.stderr
    standin = StandInApiServer(host=API_ADDR)
    with netns_context(bed.underlay_netns):  # the listening socket lives on the underlay
        standin.start()
    try:
        for node in bed.nodes:
            standin.put("nodes", make_node(node.name, node.underlay_ip, [node.pod_cidr]))
        yield standin
    finally:
        standin.stop()


def kubeconfig(path: Path, url: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "s", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "not-checked-by-the-stand-in"}}],
        "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}],
    }))
    return path


def k8s_args(bed, cfg: Path) -> dict[str, list[str]]:
    """Per node: the kubeconfig, its Node name, and a --peer for every other node's pods that
    leads nowhere (static peers beat the overlay routes, so only the Node objects can help).

    `--scope-netns` keeps each router to its own pods' network namespaces: other testbeds on
    this kernel use the same pod addresses (a real node has only its own pods).
    """
    args = {}
    for node in bed.nodes:
        bogus = [f"--peer={n.pod_cidr}={NOWHERE}" for n in bed.nodes if n is not node]
        scope = [f"--scope-netns={NETNS_DIR / p.netns}" for p in bed.pods if p.node == node.name]
        args[node.name] = ["--kubeconfig", str(cfg), "--node-name", node.name,
                           "--kubernetes-sync-timeout", "10", *scope, *bogus]
    return args


def overlay_or_host(stream: Stream, bed, server_ip: str, port: int, swapped: bool):
    if swapped:
        return wait_for(lambda: (p := stream.peer()) and p[0].startswith(f"{UNDERLAY_NET}.")
                        and p, 10, "swapped socket")
    wait_for(stream.peer, 5, "connection")
    time.sleep(1.5)  # time enough for a swap that should not happen
    return stream.peer()


@pytest.mark.root
def test_pod_labels_and_peers_from_the_api(bed, api, routers, tmp_path):
    server, client = bed.pod("n1p0"), bed.pod("n2p0")
    labels = {server.name: {"bypass": "yes"}, client.name: {"bypass": "yes"}}
    for obj in pod_objects(bed, labels):
        api.put("pods", obj)
    (routers.workdir / "rules" / "labelled").write_text("type=podLabel\nname=bypass\nvalue=yes\n")
    routers.start(extra_args=k8s_args(bed, kubeconfig(tmp_path / "kubeconfig", api.url)),
                  pod_metadata=False)
    status1 = routers.status("node1")
    k8s = status1["kubernetes"]
    assert k8s["synced"] and k8s["api"] == api.url and k8s["pods"] == 2, k8s
    assert k8s["nodes"]["node2"] == {"pod_cidrs": [bed.node("node2").pod_cidr],
                                     "host": bed.node("node2").underlay_ip}
    assert status1["pod_cidrs"] == [bed.node("node1").pod_cidr]
    assert status1["peers"] == [bed.node("node2").underlay_ip]  # the Node's, not NOWHERE
    assert any("spec.nodeName=node1" in unquote(r) for r in api.requests)

    port = PORT + 20
    with stream_server(bed, server.name, port, clients=2):  # one after the other
        wait_listener_announced(routers, "node1", port)
        # labelled on both sides: bypassed, to the peer the Node object names
        first = Stream(bed, client.name, server.ip, port)
        peer = overlay_or_host(first, bed, server.ip, port, swapped=True)
        assert peer[0] == bed.node("node1").underlay_ip
        assert first.result()["ok"]
        assert counters(routers, "node2")["bypassed_client"] == 1
        assert routers.status("node2")["daemon"]["peer_from_nodes"] >= 1

        # the server pod's label changes in the API while the routers run
        ruled_out = counters(routers, "node1")["ruled_out"]
        api.put("pods", make_pod(server.name, server.node, server.ip, {"bypass": "no"}))
        time.sleep(1.0)  # the watch delivers it in milliseconds
        second = Stream(bed, client.name, server.ip, port)
        assert overlay_or_host(second, bed, server.ip, port, swapped=False) == (server.ip, port)
        assert second.result()["ok"]
    assert counters(routers, "node2")["bypassed_client"] == 1
    assert counters(routers, "node1")["ruled_out"] > ruled_out


@pytest.mark.root
def test_unreachable_api_at_start_is_named_and_retried(bed, api, routers, tmp_path):
    for obj in pod_objects(bed, {"n1p0": {"bypass": "yes"}, "n2p0": {"bypass": "yes"}}):
        api.put("pods", obj)
    url = api.url
    api.stop()  # unreachable while the routers start
    args = k8s_args(bed, kubeconfig(tmp_path / "kubeconfig", url))
    for node in bed.nodes:
        args[node.name][args[node.name].index("10")] = "1"  # sync timeout: 1 s
        args[node.name] = [a for a in args[node.name] if not a.startswith("--peer")]
    routers.start(extra_args=args, pod_metadata=False)
    status = routers.status("node1")
    assert not status["kubernetes"]["synced"]
    assert url.split("//")[1] in status["kubernetes"]["error"]
    assert url.split("//")[1] in routers.log_of("node1").read_text()
    with netns_context(bed.underlay_netns):
        api.start()  # the watchers keep retrying: the pods arrive without a restart
    wait_for(lambda: routers.status("node1")["kubernetes"]["synced"], 20, "API back")
    assert routers.status("node1")["kubernetes"]["pods"] == 2
    assert os.path.exists(routers.socket_of("node1"))
