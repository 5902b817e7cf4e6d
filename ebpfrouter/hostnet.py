"""What the daemon learns from the node's network configuration (pyroute2, no `ip`).

* `interface_ipv4(name)`: the host address of HOST_IF;
* `overlay_peers(overlay_if)`: remote pod CIDR -> remote node host address, from the overlay
  routes, neighbours and FDB (`peers.discovery` reads them);
* `local_pod_cidrs(overlay_if)`: this node's pod subnets (connected routes that hold the
  overlay interface's own address, on another interface: the pod bridge);
* `PeerMap`: overlay address -> peer host address, from static entries and discovered ones.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping

from pyroute2 import IPRoute

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class HostNetError(RuntimeError):
    """A network lookup failed; the message names the interface."""


def _ifindex(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise HostNetError(f"interface {name!r} does not exist")
    return int(found[0])


def interface_ipv4(name: str) -> str:
    """The first IPv4 address of interface `name`."""
    with IPRoute() as ipr:
        index = _ifindex(ipr, name)
        for addr in ipr.get_addr(family=2, index=index):
            value = addr.get_attr("IFA_ADDRESS")
            if value:
                return str(value)
    raise HostNetError(f"interface {name!r} has no IPv4 address")


def overlay_peers(overlay_if: str) -> dict[IPNetwork, str]:
    """Remote pod CIDR -> host address of the node behind it (see `peers.discovery`)."""
    from .peers.discovery import DiscoveryError, overlay_routes

    try:
        return {route.subnet: route.peer for route in overlay_routes(overlay_if)}
    except DiscoveryError as exc:
        raise HostNetError(str(exc)) from None


def local_pod_cidrs(overlay_if: str) -> list[IPNetwork]:
    """This node's pod subnets: connected routes containing `overlay_if`'s own address."""
    with IPRoute() as ipr:
        index = _ifindex(ipr, overlay_if)
        own = [ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
               for a in ipr.get_addr(family=2, index=index) if a.get_attr("IFA_ADDRESS")]
        nets = []
        for route in ipr.get_routes(family=2, table=254):
            dst = route.get_attr("RTA_DST")
            if not dst or route.get_attr("RTA_OIF") == index or route.get_attr("RTA_GATEWAY"):
                continue
            net = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
            if any(addr in net for addr in own):
                nets.append(net)
    return nets


def parse_peer(text: str) -> tuple[IPNetwork, str]:
    """Parse `OVERLAY_CIDR=HOST_ADDR` (a `--peer` flag)."""
    cidr, sep, host = text.partition("=")
    if not sep:
        raise ValueError(f"--peer {text!r}: expected OVERLAY_CIDR=HOST_ADDR")
    try:
        net = ipaddress.ip_network(cidr.strip(), strict=False)
        addr = ipaddress.ip_address(host.strip())
    except ValueError as exc:
        raise ValueError(f"--peer {text!r}: {exc}") from None
    return net, str(addr)


class PeerMap:
    """Overlay address -> peer host address (longest prefix wins; static beats discovered)."""

    def __init__(self, static: Mapping[IPNetwork, str] | None = None,
                 discovered: Mapping[IPNetwork, str] | None = None) -> None:
        self.static = dict(static or {})
        self.discovered = dict(discovered or {})

    def update_discovered(self, entries: Mapping[IPNetwork, str]) -> None:
        """Replace the entries found from the overlay route."""
        self.discovered = dict(entries)

    def lookup(self, addr: str) -> str | None:
        """The host address of the node that holds overlay `addr`, or None."""
        ip = ipaddress.ip_address(addr)
        for table in (self.static, self.discovered):
            best = None
            for net, host in table.items():
                if ip.version == net.version and ip in net and (
                        best is None or net.prefixlen > best[0].prefixlen):
                    best = (net, host)
            if best is not None:
                return best[1]
        return None

    def hosts(self) -> set[str]:
        """Every peer host address."""
        return set(self.static.values()) | set(self.discovered.values())


def in_any(addr: str | None, nets: Iterable[IPNetwork]) -> bool:
    """True if `addr` lies in one of `nets`."""
    if not addr:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in nets)
