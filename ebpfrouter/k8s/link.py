"""The daemon's Kubernetes link: when to use the cluster, and the sources once started.

    link = ClusterLink.from_options(kubeconfig, node_name, rule_kinds)   # None: no cluster
    link.start(timeout)          # after the daemon's capability drop: it starts threads
    pod = link.pod_for(pid, local_ip); host = link.peer_for(overlay_ip)
    link.stop()

Used when the daemon runs in a pod (`cluster.in_cluster()`), or when asked with a kubeconfig
(`--kubeconfig` or `$KUBECONFIG`). An API that cannot be reached at start-up is logged,
naming its address, and retried in the background by the watchers; until the pods are known,
label rules match nothing (nothing is bypassed because of them).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

from ebpfrouter.k8s.apiclient import KubeConfigError, api_client_from_environment
from ebpfrouter.k8s.cluster import ClusterSources, cluster_sources, in_cluster
from ebpfrouter.k8s.containers import ContainerRuntimeUnavailable
from ebpfrouter.k8s.pods import NodeNameMissing
from ebpfrouter.podmeta import PodInfo

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClusterLinkError(RuntimeError):
    """The Kubernetes sources cannot be built; the message names what is missing."""


def wanted(kubeconfig: str | None, env: Mapping[str, str] | None = None,
           disabled: bool = False) -> bool:
    """True when the daemon should use the Kubernetes API: in a pod, or asked by kubeconfig."""
    env = os.environ if env is None else env
    if disabled:
        return False
    return bool(kubeconfig) or bool(env.get("KUBECONFIG")) or in_cluster(env)


class ClusterLink:
    """This node's pods and the cluster's nodes, for the daemon (built, then started)."""

    def __init__(self, sources: ClusterSources, node_name: str) -> None:
        self.sources = sources
        self.node_name = node_name
        self.api_host = str(sources.api_client.configuration.host)
        self.synced = False
        self.error: str | None = None

    @classmethod
    def build(cls, rule_kinds: Iterable[str], kubeconfig: str | None = None,
              node_name: str | None = None, env: Mapping[str, str] | None = None,
              proc: str = "/proc") -> ClusterLink:
        """Build (not start) the sources; raise `ClusterLinkError` naming what is missing.

        The node name is `node_name`, else `$NODE_NAME`. A containerLabel rule without a
        reachable container runtime raises (`ContainerRuntimeUnavailable`'s message).
        """
        env = dict(os.environ if env is None else env)
        if node_name:
            env["NODE_NAME"] = node_name
        try:
            api_client = api_client_from_environment(kubeconfig)
        except KubeConfigError as exc:
            raise ClusterLinkError(f"Kubernetes: {exc}") from None
        try:
            sources = cluster_sources(rule_kinds, env=env, api_client=api_client, proc=proc)
        except NodeNameMissing as exc:
            api_client.close()
            raise ClusterLinkError(f"Kubernetes: {exc} (or give --node-name)") from None
        except ContainerRuntimeUnavailable as exc:
            api_client.close()
            raise ClusterLinkError(str(exc)) from None
        return cls(sources, env["NODE_NAME"].strip())

    def start(self, timeout: float) -> bool:
        """Start watching; wait up to `timeout` s for the first lists. False (logged) if not."""
        self.sources.start()
        self.synced = self.sources.wait_synced(timeout)
        if not self.synced:
            reason = self.sources.pods.last_error or self.sources.peers.watcher.last_error
            self.error = (f"Kubernetes API {self.api_host} not reachable within {timeout:g}s "
                          f"({reason or 'no answer'}); retrying in the background, label "
                          "rules match nothing until the pods are known")
            log.error("%s", self.error)
        else:
            log.info("Kubernetes API %s: %d pod(s) on node %s, %d node(s)", self.api_host,
                     len(self.sources.pods.pods()), self.node_name,
                     len(self.sources.peers.nodes()))
        return self.synced

    def stop(self) -> None:
        """Stop the watchers and close the API connections."""
        self.sources.stop()

    # -- what the daemon asks ----------------------------------------------------------------

    def pod_for(self, pid: int, local_ip: str | None = None) -> PodInfo | None:
        """The pod of `pid` (by its cgroup), else the pod of this node owning `local_ip`."""
        pod = self.sources.pods.pod_for_pid(pid)
        if pod is None and local_ip:
            pod = self.sources.pods.pod_for_ip(local_ip)
        return pod

    def peer_for(self, overlay_ip: str) -> str | None:
        """Host address of the node whose podCIDR holds `overlay_ip` (None if unknown)."""
        return self.sources.peers.peer_for(overlay_ip)

    def local_pod_cidrs(self) -> list[IPNetwork]:
        """This node's podCIDRs from its Node object (empty for CNIs that set none)."""
        return list(self.sources.peers.local_pod_cidrs())

    def peer_hosts(self) -> set[str]:
        """Host addresses of the other nodes that have podCIDRs (to open peer links to)."""
        hosts = set()
        for route in self.sources.peers.nodes():
            if route.name == self.node_name or not route.pod_cidrs:
                continue
            for version in {net.version for net in route.pod_cidrs}:
                host = route.host_ip_for(version)
                if host:
                    hosts.add(host)
        return hosts

    def status(self) -> dict[str, Any]:
        """For `ebpf-router status`: API address, sync state, what is known."""
        pods, peers = self.sources.pods, self.sources.peers
        self.synced = self.synced or self.sources.wait_synced(0)
        return {
            "api": self.api_host,
            "node": self.node_name,
            "synced": self.synced,
            "error": (pods.last_error or peers.watcher.last_error) if self.synced
            else self.error,
            "pods": len(pods.pods()),
            "nodes": {r.name: {"pod_cidrs": [str(n) for n in r.pod_cidrs],
                               "host": r.host_ip_for(4) or r.host_ip_for(6)}
                      for r in peers.nodes()},
        }
