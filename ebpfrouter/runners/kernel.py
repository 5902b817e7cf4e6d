"""The tracer's eager-swap maps, kept equal to what the engine knows.

`EagerListener` puts an overlay listener's address into the kernel map that makes the tracer
stop a `connect()` to it (a peer's listener) or an `accept()` on it (ours) at the syscall's
return; `EagerPeer` enters a live peer's pod CIDRs, the only sources whose accepts are stopped.
A kernel that refuses an update leaves that connection to the late swap: counted, logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from bpf_asm.syscall import BPFError

from ..engine.actions import Action, EagerListener, EagerPeer
from ..hostnet import IPNetwork
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)


class EagerMaps:
    """Runs `EagerListener` and `EagerPeer` against the tracer's maps."""

    def __init__(self, wiring: Wiring, cidrs_of: Callable[[str], list[IPNetwork]]) -> None:
        self.wiring = wiring
        self.cidrs_of = cidrs_of
        self.peers: dict[str, list[IPNetwork]] = {}  # peer -> the CIDRs entered for it
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
                    self.peers[action.peer] = nets = self.cidrs_of(action.peer)
                    for net in nets:
                        tracer.eager_peer(str(net))
                case EagerPeer(on=False):
                    for net in self.peers.pop(action.peer, []):
                        if not any(net in nets for nets in self.peers.values()):
                            tracer.eager_peer(str(net), on=False)
                case _:
                    raise UnknownAction(self, action)
        except (BPFError, OSError, ValueError) as exc:
            self.wiring.counters["eager_map_errors"] += 1
            if not self._warned:
                self._warned = True
                log.warning("eager swap map update refused (%s): those connections are "
                            "swapped late", exc)

    def refresh(self) -> None:
        """Re-read each live peer's CIDRs (Nodes and routes change)."""
        for peer in list(self.peers):
            self.run(EagerPeer(peer, False))
            self.run(EagerPeer(peer, True))
