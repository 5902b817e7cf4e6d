"""cluster_sources: the daemon's one call, against the API server stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from apiserver_standin import StandInApiServer, make_node, make_pod

from ebpfrouter.k8s.apiclient import KubeConfigError, api_client_for_host
from ebpfrouter.k8s.cluster import cluster_sources, in_cluster
from ebpfrouter.k8s.containers import ContainerRuntimeUnavailable
from ebpfrouter.k8s.pods import NodeNameMissing


def test_sources_for_this_node(standin: StandInApiServer) -> None:
    standin.put("pods", make_pod("web", "node-a", "10.244.0.5", {"app": "web"}))
    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))
    standin.put("nodes", make_node("node-b", "192.168.10.2", ["10.244.1.0/24"]))
    sources = cluster_sources(["podLabel", "cidr"], env={"NODE_NAME": "node-a"},
                              api_client=api_client_for_host(standin.url))
    with sources:
        assert sources.wait_synced(5)
        assert sources.pods.pod_for_ip("10.244.0.5").labels == {"app": "web"}
        assert sources.peers.peer_for("10.244.1.9") == "192.168.10.2"
        assert [str(n) for n in sources.peers.local_pod_cidrs()] == ["10.244.0.0/24"]
    assert sources.pods.containers is None  # no containerLabel rule: runtime never asked


def test_refuses_to_build_without_what_it_needs(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    with pytest.raises(NodeNameMissing):
        cluster_sources(env={})
    monkeypatch.setenv("PATH", str(tmp_path))  # no crictl
    with pytest.raises(ContainerRuntimeUnavailable):
        cluster_sources(["containerLabel"], env={"NODE_NAME": "n"})
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubeConfigError, match="missing"):
        cluster_sources(env={"NODE_NAME": "n"})


def test_in_cluster_detection(tmp_path: Path) -> None:
    token = tmp_path / "token"
    assert not in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, str(token))
    token.write_text("x")
    assert in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, str(token))
    assert not in_cluster({}, str(token))
    assert in_cluster(dict(os.environ)) is False or os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token")


def test_api_client_from_a_kubeconfig(standin: StandInApiServer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from kubernetes import client

    from ebpfrouter.k8s.apiclient import api_client_from_environment

    standin.put("nodes", make_node("node-a", "192.168.10.1", ["10.244.0.0/24"]))
    path = tmp_path / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "s", "cluster": {"server": standin.url}}],
        "users": [{"name": "u", "user": {"token": "not-checked-by-the-stand-in"}}],
        "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u"}}],
    }))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", str(path))
    api_client = api_client_from_environment()
    try:
        assert api_client.configuration.host == standin.url
        nodes = client.CoreV1Api(api_client).list_node()
        assert [n.metadata.name for n in nodes.items] == ["node-a"]
    finally:
        api_client.close()
    assert client.Configuration.get_default_copy().host != standin.url  # global untouched
