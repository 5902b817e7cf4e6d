"""Node-aware peers: which node (host address) owns an overlay address, from Node objects.

Each Node's `spec.podCIDRs` (or the older single `spec.podCIDR`) says which pod addresses
live there; its `status.addresses` of type InternalIP say where its daemon listens. CNIs
that allocate pod addresses themselves (Calico IPAM blocks, some cloud CNIs) leave podCIDR
empty: `peer_for` then answers None and the caller falls back to the overlay routes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import threading
from typing import Any

from kubernetes import client

from ebpfrouter.k8s.watcher import Backoff, ListWatcher, WatchedCache, first_attr

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class NodeRoute:
    """One node's pod networks and its InternalIP addresses (in API order)."""

    name: str
    pod_cidrs: tuple[IPNetwork, ...]
    internal_ips: tuple[str, ...]

    def host_ip_for(self, version: int) -> str | None:
        """The InternalIP of IP version `version`, else the first InternalIP."""
        for text in self.internal_ips:
            if ipaddress.ip_address(text).version == version:
                return text
        return self.internal_ips[0] if self.internal_ips else None


def node_route_from_api(node: Any) -> NodeRoute:
    """A `NodeRoute` from a kubernetes `V1Node`; malformed CIDRs and addresses are skipped."""
    spec, status = node.spec, node.status
    texts = list((first_attr(spec, "pod_cidrs", "pod_cid_rs") if spec else None) or [])
    if spec is not None and spec.pod_cidr and spec.pod_cidr not in texts:
        texts.insert(0, spec.pod_cidr)
    cidrs = []
    for text in texts:
        try:
            cidrs.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            log.warning("node %s: ignoring bad podCIDR %r", node.metadata.name, text)
    ips = []
    for address in (status.addresses if status else None) or []:
        if address.type != "InternalIP":
            continue
        try:
            ips.append(str(ipaddress.ip_address(address.address)))
        except ValueError:
            log.warning("node %s: ignoring bad InternalIP %r", node.metadata.name,
                        address.address)
    return NodeRoute(node.metadata.name, tuple(cidrs), tuple(ips))


class NodePeerMap(WatchedCache):
    """Watched Node objects: overlay address → peer node's host address.

    `start`/`stop`/`wait_synced` and `with` come from `WatchedCache`; synced means the first
    list of nodes has arrived.
    """

    def __init__(
        self,
        api: client.CoreV1Api,
        node_name: str,
        *,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        self.node_name = node_name
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeRoute] = {}
        self.watcher = ListWatcher(
            "nodes", api.list_node, self._replace, self._event,
            watch_timeout=watch_timeout, request_timeout=request_timeout, backoff=backoff,
        )

    def _replace(self, nodes: list[Any]) -> None:
        routes = {r.name: r for r in (node_route_from_api(n) for n in nodes)}
        with self._lock:
            self._nodes = routes

    def _event(self, kind: str, node: Any) -> None:
        with self._lock:
            if kind == "DELETED":
                self._nodes.pop(node.metadata.name, None)
            else:
                route = node_route_from_api(node)
                self._nodes[route.name] = route

    def nodes(self) -> list[NodeRoute]:
        """Every known node."""
        with self._lock:
            return list(self._nodes.values())

    def node_for(self, overlay_ip: str) -> NodeRoute | None:
        """The node whose pod CIDR holds `overlay_ip` (longest prefix wins)."""
        try:
            addr = ipaddress.ip_address(overlay_ip)
        except ValueError:
            return None
        best: tuple[int, NodeRoute] | None = None
        with self._lock:
            for route in self._nodes.values():
                for net in route.pod_cidrs:
                    if addr.version == net.version and addr in net and (
                            best is None or net.prefixlen > best[0]):
                        best = (net.prefixlen, route)
        return best[1] if best else None

    def peer_for(self, overlay_ip: str) -> str | None:
        """Host address (InternalIP) of the node owning `overlay_ip`, or None if unknown."""
        route = self.node_for(overlay_ip)
        if route is None:
            return None
        return route.host_ip_for(ipaddress.ip_address(overlay_ip).version)

    def is_local(self, overlay_ip: str) -> bool:
        """True if `overlay_ip` is in this node's pod CIDRs."""
        route = self.node_for(overlay_ip)
        return route is not None and route.name == self.node_name

    def local_pod_cidrs(self) -> tuple[IPNetwork, ...]:
        """This node's pod CIDRs (empty until known, or when the CNI sets none)."""
        with self._lock:
            route = self._nodes.get(self.node_name)
            return route.pod_cidrs if route else ()
