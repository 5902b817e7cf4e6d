"""Peers: the control connection to every other node's daemon (`SendPeer`).

One `PeerClient` per peer host, started on first need (a peer we did not know talks to us:
we talk back); its state changes reach the engine as `PeerUp` / `PeerLost`. Messages that
come in on the peer server are handed to the engine as `PeerMessage`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..engine.actions import Action, SendPeer
from ..engine.events import PeerLost, PeerMessage, PeerUp
from ..peers import Codec, ProtocolError
from ..peers.transport import PeerClient, PeerInfo
from ..scoping import NodeScope
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)


class PeerLinks:
    """Runs `SendPeer`; `codec` is set at start."""

    def __init__(self, wiring: Wiring, scope: NodeScope, port: int) -> None:
        self.wiring = wiring
        self.scope = scope
        self.port = port
        self.codec: Codec | None = None
        self.clients: dict[str, PeerClient] = {}

    def run(self, action: Action) -> None:
        """Send a control message to one peer, or to all (fire and forget)."""
        if not isinstance(action, SendPeer):
            raise UnknownAction(self, action)
        targets = list(self.clients.values()) if action.peer is None else [
            self.clients[action.peer]] if action.peer in self.clients else []
        if not targets:
            self.wiring.counters["peer_send_unknown"] += 1
            log.info("no peer connection for %s (%s)", action.peer, action.type)
            return
        for client in targets:
            try:
                client.send(action.type, action.body)
            except (asyncio.QueueFull, ProtocolError, ValueError) as exc:
                self.wiring.counters["peer_send_failed"] += 1
                log.warning("peer %s: cannot send %s: %s", client.host, action.type, exc)

    def ensure(self, host: str) -> None:
        """A control connection to `host` (started once; never to ourselves)."""
        if host in self.clients or host == self.scope.host_addr:
            return
        assert self.codec is not None

        def on_state(up: bool) -> None:
            self.wiring.later(PeerUp(host) if up else PeerLost(host))

        client = PeerClient(self.codec, host, self.port,
                            {"node": self.scope.node, "host_addr": self.scope.host_addr},
                            on_state=on_state)
        self.clients[host] = client
        client.start()

    def on_message(self, peer: PeerInfo, msg: Any) -> None:
        """A message from the peer server: to the engine (and talk back to its sender)."""
        if peer.host_addr != peer.address[0]:
            log.info("peer %s says it is %s", peer.address[0], peer.host_addr)
        self.ensure(peer.host_addr)  # a peer we did not know: talk back
        self.wiring.feed(PeerMessage(peer.host_addr, msg.type, msg.body))

    def connected(self) -> list[str]:
        """Hosts whose control connection is up."""
        return sorted(h for h, c in self.clients.items() if c.connected.is_set())

    async def close(self) -> None:
        """Close every control connection."""
        for client in self.clients.values():
            await client.close()
