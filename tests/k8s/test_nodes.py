"""NodePeerMap with the real kubernetes client against the API server stand-in."""

from __future__ import annotations

import ipaddress
import threading

import pytest
from apiserver_standin import StandInApiServer, make_node, wait_for
from kubernetes import client

from ebpfrouter.k8s.nodes import NodePeerMap
from ebpfrouter.k8s.watcher import Backoff


@pytest.fixture
def peers(core_api: client.CoreV1Api):
    peer_map = NodePeerMap(core_api, "node-a", request_timeout=2.0,
                           backoff=Backoff(initial=0.05, maximum=0.4))
    yield peer_map
    peer_map.stop()
    assert not any(t.name.startswith("k8s-watch") for t in threading.enumerate())


def test_peer_for_overlay_addresses(standin: StandInApiServer, peers: NodePeerMap) -> None:
    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))
    standin.put("nodes", make_node("node-b", "192.168.10.2", ["10.244.1.0/24", "fd00:1::/64"],
                                   external_ip="203.0.113.9"))
    standin.put("nodes", make_node("node-c", "192.168.10.3", []))  # CNI without podCIDRs
    peers.start()
    assert peers.wait_synced(5)
    assert peers.peer_for("10.244.1.77") == "192.168.10.2"  # InternalIP, never ExternalIP
    assert peers.peer_for("fd00:1::5") == "192.168.10.2"  # only an IPv4 InternalIP: that one
    assert peers.peer_for("10.244.0.3") == "192.168.10.1"
    assert peers.is_local("10.244.0.3") and not peers.is_local("10.244.1.77")
    assert peers.peer_for("10.245.0.1") is None
    assert peers.peer_for("garbage") is None
    assert peers.local_pod_cidrs() == (ipaddress.ip_network("10.244.0.0/24"),)


def test_longest_prefix_and_address_family(standin: StandInApiServer,
                                           peers: NodePeerMap) -> None:
    wide = make_node("node-b", "192.168.10.2", ["10.244.0.0/16"])
    dual = make_node("node-c", "192.168.10.3", ["10.244.7.0/24", "fd00:7::/64"])
    dual["status"]["addresses"].append({"type": "InternalIP", "address": "2001:db8::3"})
    standin.put("nodes", wide)
    standin.put("nodes", dual)
    peers.start()
    assert peers.wait_synced(5)
    assert peers.peer_for("10.244.7.9") == "192.168.10.3"
    assert peers.peer_for("10.244.8.9") == "192.168.10.2"
    assert peers.peer_for("fd00:7::9") == "2001:db8::3"  # same family as the overlay address
    assert peers.local_pod_cidrs() == ()  # this node is not (yet) known


def test_nodes_change_while_running(standin: StandInApiServer, peers: NodePeerMap) -> None:
    standin.put("nodes", make_node("node-a", "192.168.10.1", []))
    peers.start()
    assert peers.wait_synced(5) and standin.wait_watching()
    assert peers.local_pod_cidrs() == ()
    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))  # allocated
    standin.put("nodes", make_node("node-b", "192.168.10.2", ["10.244.1.0/24"]))  # joins
    assert wait_for(lambda: peers.peer_for("10.244.1.5") == "192.168.10.2")
    assert wait_for(lambda: len(peers.local_pod_cidrs()) == 1)
    standin.put("nodes", make_node("node-b", "192.168.10.22", ["10.244.1.0/24"]))  # new address
    assert wait_for(lambda: peers.peer_for("10.244.1.5") == "192.168.10.22")
    standin.delete("nodes", "node-b")
    assert wait_for(lambda: peers.peer_for("10.244.1.5") is None)
    assert peers.watcher.lists == 1


def test_node_watch_expiry_relists(standin: StandInApiServer, peers: NodePeerMap) -> None:
    standin.put("nodes", make_node("node-b", "192.168.10.2", ["10.244.1.0/24"]))
    peers.start()
    assert peers.wait_synced(5) and standin.wait_watching()
    standin.expire_watches()
    standin.delete("nodes", "node-b")
    standin.put("nodes", make_node("node-d", "192.168.10.4", ["10.244.3.0/24"]))
    assert wait_for(lambda: peers.watcher.lists >= 2)
    assert wait_for(lambda: peers.peer_for("10.244.3.1") == "192.168.10.4")
    assert peers.peer_for("10.244.1.5") is None
