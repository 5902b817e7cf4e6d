"""Status: `NoteSwapped`, counted per role with the time from traced to swapped."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from ..engine.actions import Action, NoteSwapped
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)


class SwapNotes:
    """Runs `NoteSwapped`; `take_traced_at(pid, fd)` gives (and forgets) when it was traced."""

    def __init__(self, wiring: Wiring, take_traced_at: Callable[[int, int], int | None]) -> None:
        self.wiring = wiring
        self.take_traced_at = take_traced_at
        self.latency_ns: collections.deque[int] = collections.deque(maxlen=1000)

    def run(self, action: Action) -> None:
        """Count a swapped connection per role; time from connect()/accept() to swapped."""
        if not isinstance(action, NoteSwapped):
            raise UnknownAction(self, action)
        self.wiring.counters[f"swapped_{action.role}"] += 1
        started = self.take_traced_at(action.pid, action.fd)
        if started is not None:
            self.latency_ns.append(time.monotonic_ns() - started)
        log.info("swapped %s %s (pid %s fd %s)", action.role, action.tuple, action.pid,
                 action.fd)
