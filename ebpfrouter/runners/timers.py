"""Timers: the engine's `StartTimer` / `CancelTimer` on the event loop.

Several timers may share one key; `CancelTimer` drops them all. A fired timer is fed back as
`TimerFired(key)` (the engine ignores stale keys).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from ..engine.actions import Action, CancelTimer, StartTimer
from ..engine.events import TimerFired
from ..wiring import Wiring
from . import UnknownAction


class Timers:
    """Runs `StartTimer` and `CancelTimer`."""

    def __init__(self, wiring: Wiring) -> None:
        self.wiring = wiring
        self.pending: dict[Any, dict[int, asyncio.TimerHandle]] = {}  # key -> handles
        self._tokens = itertools.count()

    def run(self, action: Action) -> None:
        """Start a timer, or cancel every timer of a key."""
        match action:
            case StartTimer():
                token = next(self._tokens)
                self.pending.setdefault(action.key, {})[token] = (
                    self.wiring.running_loop.call_later(action.delay, self._fired, action.key,
                                                        token))
            case CancelTimer():
                for handle in self.pending.pop(action.key, {}).values():
                    handle.cancel()
            case _:
                raise UnknownAction(self, action)

    def __len__(self) -> int:
        """Timers pending now."""
        return sum(len(h) for h in self.pending.values())

    def _fired(self, key: Any, token: int) -> None:
        handles = self.pending.get(key)
        if handles is not None:
            handles.pop(token, None)
            if not handles:
                del self.pending[key]
        self.wiring.feed(TimerFired(key))
