"""ClusterLink: what the daemon asks of the Kubernetes sources, against the API stand-in."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from apiserver_standin import StandInApiServer, make_node, make_pod

from ebpfrouter.k8s.link import ClusterLink, ClusterLinkError, wanted


def kubeconfig(path: Path, url: str) -> str:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "s", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}],
    }))
    return str(path)


def test_wanted_in_a_pod_or_with_a_kubeconfig(tmp_path: Path) -> None:
    assert not wanted(None, {})
    assert wanted("/some/kubeconfig", {})
    assert wanted(None, {"KUBECONFIG": "/x"})
    assert not wanted("/some/kubeconfig", {"KUBECONFIG": "/x"}, disabled=True)


def test_link_answers_from_pods_and_nodes(standin: StandInApiServer, tmp_path: Path) -> None:
    standin.put("pods", make_pod("web", "node-a", "10.244.0.5", {"app": "web"}))
    standin.put("pods", make_pod("other", "node-b", "10.244.1.5", {"app": "other"}))
    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))
    standin.put("nodes", make_node("node-b", "192.168.10.2", ["10.244.1.0/24"]))
    standin.put("nodes", make_node("node-c", "192.168.10.3", []))  # CNI without podCIDRs
    link = ClusterLink.build(["podLabel"], kubeconfig(tmp_path / "kc", standin.url), "node-a",
                             env={})
    try:
        assert link.start(5)
        # no pod cgroup for our own pid: found by the local end's pod IP instead
        assert link.pod_for(1) is None
        assert link.pod_for(1, "10.244.0.5").labels == {"app": "web"}
        assert link.pod_for(1, "10.244.1.5") is None  # another node's pod
        assert link.peer_for("10.244.1.9") == "192.168.10.2"
        assert link.peer_for("10.99.0.1") is None  # unknown: the daemon falls back to routes
        assert [str(n) for n in link.local_pod_cidrs()] == ["10.244.0.0/24"]
        assert link.peer_hosts() == {"192.168.10.2"}
        status = link.status()
        assert status["synced"] and status["pods"] == 1 and status["error"] is None
        assert status["nodes"]["node-b"] == {"pod_cidrs": ["10.244.1.0/24"],
                                             "host": "192.168.10.2"}
    finally:
        link.stop()


def test_unreachable_api_is_named_and_retried(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    standin = StandInApiServer(port)
    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))
    link = ClusterLink.build([], kubeconfig(tmp_path / "kc", standin.url), "node-a", env={})
    try:
        assert not link.start(0.5)
        assert f"127.0.0.1:{port}" in link.status()["error"]
        standin.start()  # the watchers keep retrying in the background
        try:
            assert link.sources.wait_synced(10)
            assert link.status()["synced"] and link.peer_hosts() == set()
        finally:
            standin.stop()
    finally:
        link.stop()


def test_build_errors_name_what_is_missing(standin: StandInApiServer, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    config = kubeconfig(tmp_path / "kc", standin.url)
    with pytest.raises(ClusterLinkError, match="NODE_NAME.*--node-name"):
        ClusterLink.build([], config, None, env={})
    monkeypatch.setenv("PATH", str(tmp_path))  # no crictl
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT", raising=False)
    with pytest.raises(ClusterLinkError, match="containerLabel rules need the container runtime"):
        ClusterLink.build(["containerLabel"], config, "node-a", env={})
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ClusterLinkError, match="missing-config"):
        ClusterLink.build([], str(tmp_path / "missing-config"), "node-a", env={})
