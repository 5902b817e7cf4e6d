"""One call for the daemon: the Kubernetes sources of this node, when running in a cluster.

    sources = cluster_sources(rule_kinds=[r.kind for r in rules.filters])
    if sources is not None:
        with sources:
            sources.wait_synced(30)
            pod = sources.pods.pod_for_pid(pid); host = sources.peers.peer_for(ip)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

from kubernetes import client

from ebpfrouter.k8s.apiclient import api_client_from_environment
from ebpfrouter.k8s.containers import container_labels_if_needed
from ebpfrouter.k8s.nodes import NodePeerMap
from ebpfrouter.k8s.pods import KubePodMetadata, node_name_from_env

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


def in_cluster(env: Mapping[str, str] | None = None, token: str = SERVICE_ACCOUNT_TOKEN) -> bool:
    """True inside a pod with a service account (the API's address and a token are there)."""
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(token)


@dataclasses.dataclass
class ClusterSources:
    """This node's pod metadata and the cluster's node peer map, started and stopped together."""

    pods: KubePodMetadata
    peers: NodePeerMap
    api_client: client.ApiClient

    def start(self) -> ClusterSources:
        """Start both watchers (returns at once)."""
        self.pods.start()
        self.peers.start()
        return self

    def stop(self) -> None:
        """Stop both watchers and close the API connections."""
        self.pods.stop()
        self.peers.stop()
        self.api_client.close()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once pods and nodes have both been listed (each within `timeout`)."""
        return self.pods.wait_synced(timeout) and self.peers.wait_synced(timeout)

    def __enter__(self) -> ClusterSources:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_sources(
    rule_kinds: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    api_client: client.ApiClient | None = None,
    proc: str = "/proc",
) -> ClusterSources:
    """Build (not start) the sources for the node named by `NODE_NAME`.

    Raises `NodeNameMissing` without `NODE_NAME`, `KubeConfigError` without API
    configuration, and `ContainerRuntimeUnavailable` when `rule_kinds` has a containerLabel
    rule but no container runtime answers: all before anything is started.
    """
    env = os.environ if env is None else env
    node = node_name_from_env(env)
    containers = container_labels_if_needed(rule_kinds)
    api_client = api_client or api_client_from_environment()
    core = client.CoreV1Api(api_client)
    return ClusterSources(
        pods=KubePodMetadata(core, node, containers=containers, proc=proc),
        peers=NodePeerMap(core, node),
        api_client=api_client,
    )
