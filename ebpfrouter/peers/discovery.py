"""Which peer node owns an overlay address: read from the overlay routes with pyroute2.

flannel / Calico VXLAN: `10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink`, the gateway's
neighbour entry gives the remote VTEP MAC and the FDB entry of that MAC gives the remote node's
host address. IPIP: the gateway *is* the remote node's host address. Peers are named by that
host address.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import socket
from typing import Any

from pyroute2 import IPRoute

AF_BRIDGE = 7
MAIN_TABLE = 254

IPv4Net = ipaddress.IPv4Network


@dataclasses.dataclass(frozen=True)
class OverlayRoute:
    """Pods in `subnet` live on the node whose host address is `peer`."""

    subnet: IPv4Net
    peer: str
    gateway: str


class DiscoveryError(RuntimeError):
    """The overlay interface is missing or its routes cannot be read."""


def overlay_routes(overlay_if: str, ipr: Any | None = None) -> list[OverlayRoute]:
    """Remote pod subnets reachable over `overlay_if` and the host address of their node."""
    own = ipr is None
    ipr = IPRoute() if ipr is None else ipr
    try:
        indexes = ipr.link_lookup(ifname=overlay_if)
        if not indexes:
            raise DiscoveryError(f"overlay interface {overlay_if!r} does not exist")
        index = indexes[0]
        macs = {n.get_attr("NDA_DST"): n.get_attr("NDA_LLADDR")
                for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index)}
        fdb = {n.get_attr("NDA_LLADDR"): n.get_attr("NDA_DST")
               for n in ipr.get_neighbours(family=AF_BRIDGE, ifindex=index)
               if n.get_attr("NDA_DST")}
        routes = []
        for route in ipr.get_routes(family=socket.AF_INET, oif=index):
            gateway = route.get_attr("RTA_GATEWAY")
            dst = route.get_attr("RTA_DST")
            table = route.get_attr("RTA_TABLE") or route.get("table")
            if gateway is None or dst is None or table != MAIN_TABLE:
                continue
            subnet = IPv4Net(f"{dst}/{route.get('dst_len')}", strict=False)  # AF_INET routes
            mac = macs.get(gateway)
            peer = fdb.get(mac, gateway) if mac is not None else gateway
            routes.append(OverlayRoute(subnet, peer, gateway))
        return routes
    finally:
        if own:
            ipr.close()


def local_pod_cidrs(overlay_if: str, routes: list[OverlayRoute],
                    ipr: Any | None = None) -> list[IPv4Net]:
    """This node's pod subnet(s): the overlay device's address widened to the remote subnets'
    usual prefix length (flannel gives `flannel.1` the .0 address of the node's /24)."""
    own = ipr is None
    ipr = IPRoute() if ipr is None else ipr
    try:
        indexes = ipr.link_lookup(ifname=overlay_if)
        if not indexes:
            raise DiscoveryError(f"overlay interface {overlay_if!r} does not exist")
        lengths = collections.Counter(r.subnet.prefixlen for r in routes)
        prefix = lengths.most_common(1)[0][0] if lengths else 24
        return [IPv4Net(f"{a.get_attr('IFA_ADDRESS')}/{prefix}", strict=False)
                for a in ipr.get_addr(family=socket.AF_INET, index=indexes[0])]
    finally:
        if own:
            ipr.close()


class PeerMap:
    """`peer_of(ip)` for the engine: the owning node's name, `local_node` for our own pods."""

    def __init__(self, routes: list[OverlayRoute], local_node: str,
                 local_cidrs: list[IPv4Net]) -> None:
        self.routes = sorted(routes, key=lambda r: r.subnet.prefixlen, reverse=True)
        self.local_node = local_node
        self.local_cidrs = list(local_cidrs)

    @classmethod
    def from_interface(cls, overlay_if: str, local_node: str, ipr: Any | None = None) -> PeerMap:
        """Read the routes of `overlay_if` (in the current or the given netns)."""
        routes = overlay_routes(overlay_if, ipr)
        return cls(routes, local_node, local_pod_cidrs(overlay_if, routes, ipr))

    def peer_of(self, ip: str) -> str | None:
        """The node owning overlay address `ip`, or None if it is not an overlay address."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is None:
                return None
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.local_cidrs):
            return self.local_node
        for route in self.routes:
            if addr in route.subnet:
                return route.peer
        return None

    def peers(self) -> list[str]:
        """Every remote node's host address."""
        return sorted({r.peer for r in self.routes})
