"""Sockets: `CloseSocket`, the engine letting go of one of the daemon's copies."""

from __future__ import annotations

from ..engine.actions import Action, CloseSocket
from ..socktable import SocketTable
from . import UnknownAction


class SocketCloser:
    """Runs `CloseSocket` against the socket table."""

    def __init__(self, sockets: SocketTable) -> None:
        self.sockets = sockets

    def run(self, action: Action) -> None:
        """Close the daemon's handle (fire and forget)."""
        if not isinstance(action, CloseSocket):
            raise UnknownAction(self, action)
        self.sockets.close(action.sock)
