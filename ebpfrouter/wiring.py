"""The few handles every part of one running daemon shares.

The daemon makes one `Wiring` and hands it to the socket table, node scoping and every
runner: the event loop, the engine and the tracer (set as the daemon starts), the way back
into the engine (`feed`, `later`), the daemon's counters and its background tasks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .engine.events import Event

if TYPE_CHECKING:
    from .engine.machine import Engine
    from .tracer import Tracer


@dataclasses.dataclass(eq=False)
class Wiring:
    """Shared by the parts of one daemon; `loop`, `engine` and `tracer` are set at start."""

    feed: Callable[[Event], None]  # hand an event to the engine and run what it asks for
    counters: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    loop: asyncio.AbstractEventLoop | None = None
    engine: Engine | None = None
    tracer: Tracer | None = None
    draining: bool = False  # shutting down: no new freezes, no new connections
    tasks: set[asyncio.Task[Any]] = dataclasses.field(default_factory=set)

    @property
    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop (the daemon has started)."""
        assert self.loop is not None, "the daemon has not started"
        return self.loop

    @property
    def running_engine(self) -> Engine:
        """The engine (the daemon has started)."""
        assert self.engine is not None, "the daemon has not started"
        return self.engine

    def later(self, event: Event) -> None:
        """Feed `event` on the next turn of the loop (a result of an action being run)."""
        self.running_loop.call_soon(self.feed, event)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` as a background task (cancelled at shutdown)."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task
