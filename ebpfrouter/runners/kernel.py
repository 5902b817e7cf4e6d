"""The tracer's maps that the daemon keeps equal to what it knows.

`EagerListener` puts an overlay listener's address into the kernel map that makes the tracer
stop a `connect()` to it (a peer's listener) or an `accept()` on it (ours) at the syscall's
return; `EagerPeer` enters a live peer's pod CIDRs, the only sources whose accepts are stopped.
`sync_remote_pods` keeps ``remote_pods``, the in-kernel filter: only connections to or from
another node's pods reach user space at all.
A kernel that refuses an update leaves that connection to the late swap: counted, logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from bpf_asm.syscall import BPFError

from ..engine.actions import Action, EagerListener, EagerPeer
from ..hostnet import IPNetwork
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)


class TracerMaps:
    """Runs `EagerListener` and `EagerPeer` against the tracer's maps; keeps its remote pod
    CIDRs."""

    def __init__(self, wiring: Wiring, cidrs_of: Callable[[str], list[IPNetwork]]) -> None:
        self.wiring = wiring
        self.cidrs_of = cidrs_of
        self.peers: dict[str, set[IPNetwork]] = {}  # live peer -> the CIDRs entered for it
        self.remote: set[IPNetwork] = set()  # what ``remote_pods`` holds
        self._warned = False

    def run(self, action: Action) -> None:
        """Update the kernel map the action names."""
        tracer = self.wiring.tracer
        if tracer is None:
            return
        try:
            match action:
                case EagerListener():
                    tracer.eager_listener(action.addr, action.port, action.on,
                                          remote=action.remote)
                case EagerPeer(on=True):
                    self._eager_peer(action.peer, set(self.cidrs_of(action.peer)))
                case EagerPeer(on=False):
                    self._eager_peer(action.peer, set())
                case _:
                    raise UnknownAction(self, action)
        except (BPFError, OSError, ValueError) as exc:
            self._refused("eager swap", exc, "those connections are swapped late")

    def _eager_peer(self, peer: str, nets: set[IPNetwork]) -> None:
        """Make `nets` the CIDRs entered for `peer` (none: the peer is gone); a CIDR another
        live peer still serves stays."""
        tracer = self.wiring.tracer
        assert tracer is not None
        old = self.peers.pop(peer, set())
        others = set().union(*self.peers.values())
        for net in sorted(old - nets - others, key=str):
            tracer.eager_peer(str(net), on=False)
        for net in sorted(nets - old - others, key=str):
            tracer.eager_peer(str(net))
        if nets:
            self.peers[peer] = nets

    def refresh(self) -> None:
        """Re-read each live peer's CIDRs (Nodes and routes change); only changes are
        written."""
        for peer in list(self.peers):
            try:
                self._eager_peer(peer, set(self.cidrs_of(peer)))
            except (BPFError, OSError, ValueError) as exc:
                self._refused("eager swap", exc, "those connections are swapped late")

    def sync_remote_pods(self, hosts: Iterable[str]) -> tuple[int, int]:
        """Make ``remote_pods`` the pod CIDRs of the peer nodes `hosts`; (added, removed)."""
        tracer = self.wiring.tracer
        if tracer is None or not tracer.filter_remote:
            return 0, 0
        want: set[IPNetwork] = set()
        for host in hosts:
            want.update(self.cidrs_of(host))
        added, removed = want - self.remote, self.remote - want
        try:
            for net in sorted(removed, key=str):
                tracer.remote_pods(str(net), on=False)
                self.remote.discard(net)
            for net in sorted(added, key=str):
                tracer.remote_pods(str(net))
                self.remote.add(net)
        except (BPFError, OSError, ValueError) as exc:
            self._refused("remote pod CIDR", exc,
                          "connections to pods of those CIDRs are not seen")
        if added or removed:
            log.info("remote pod CIDRs traced: %s", ", ".join(map(str, sorted(self.remote,
                                                                              key=str))) or "none")
        return len(added), len(removed)

    def _refused(self, what: str, exc: Exception, consequence: str) -> None:
        self.wiring.counters["tracer_map_errors"] += 1
        if not self._warned:
            self._warned = True
            log.warning("%s map update refused (%s): %s", what, exc, consequence)
