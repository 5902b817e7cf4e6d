"""Transitions as data: for each role, (state, trigger) -> (guard, handler).

`Table.fire` is the one place that looks a transition up: a miss, or a guard that says no, is
the only path to "unexpected" (counted per kind of trigger and logged at DEBUG). Handlers change
`conn.state` (logged by `Conn`) and emit actions. `rows()` renders a table for docs/swap.md.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .conn import Conn, Role, State

log = logging.getLogger("ebpfrouter.engine.machine")


class Trigger(enum.Enum):
    """What can happen to a connection: a step's result, its timer, a peer message, or a
    change in its app, host connection or control channel."""

    HOST_CONNECTED = "HostConnected"
    FROZEN = "FreezeDone"
    CHECKED = "QueuesChecked"
    BOUNCED = "BounceDone"
    REPLACED = "ReplaceDone"
    PROBED = "ConnProbed"
    FAILED = "ActionFailed"
    TIMER = "timer"
    PREPARE_FREEZE = "swap_prepare(freeze)"
    PREPARE_CHECK = "swap_prepare(check)"
    PREPARE_MIGRATE = "swap_prepare(migrate)"
    READY_FROZEN = "swap_ready(frozen)"
    READY_CHECKED = "swap_ready(checked)"
    READY_REPLACED = "swap_ready(replaced)"
    COMMIT = "swap_commit"
    DONE = "swap_done"
    ABORT = "swap_abort"
    CONN_CLOSED = "conn_closed"
    BIND = "bind"  # never valid on the control channel (binds travel on host connections)
    HOST_CLOSED = "HostClosed"
    APP_CLOSED = "CloseTraced"
    APP_EXITED = "ProcessExited"
    APP_MOVED = "FdMoved"
    PEER_LOST = "PeerLost"



RESULTS = frozenset({Trigger.HOST_CONNECTED, Trigger.FROZEN, Trigger.CHECKED, Trigger.BOUNCED,
                     Trigger.REPLACED, Trigger.PROBED, Trigger.FAILED})
MESSAGES = frozenset({Trigger.PREPARE_FREEZE, Trigger.PREPARE_CHECK, Trigger.PREPARE_MIGRATE,
                      Trigger.READY_FROZEN, Trigger.READY_CHECKED, Trigger.READY_REPLACED,
                      Trigger.COMMIT, Trigger.DONE, Trigger.ABORT, Trigger.CONN_CLOSED,
                      Trigger.BIND})

Handler = Callable[[Conn, Any], None]
Guard = Callable[[Conn, Any], bool]


@dataclasses.dataclass(frozen=True)
class Transition:
    """What a trigger does in a state: `handler`, if `guard` (when given) allows it."""

    handler: Handler
    guard: Guard | None = None


ANY = None  # a table row for every state without a row of its own


class Table:
    """One role's transitions."""

    def __init__(self, role: Role, rows: Mapping[tuple[State | None, Trigger], Transition],
                 stats: Any) -> None:
        self.role = role
        self.rows = dict(rows)
        self.stats = stats

    def lookup(self, state: State, trigger: Trigger) -> Transition | None:
        """The row for `state`, else the any-state row."""
        return self.rows.get((state, trigger)) or self.rows.get((ANY, trigger))

    def fire(self, conn: Conn, trigger: Trigger, payload: Any = None) -> bool:
        """Run the transition of (conn.state, trigger); False (counted) if there is none."""
        row = self.lookup(conn.state, trigger)
        if row is None or (row.guard is not None and not row.guard(conn, payload)):
            self.unexpected(conn, trigger)
            return False
        row.handler(conn, payload)
        return True

    def unexpected(self, conn: Conn, trigger: Trigger) -> None:
        """The one place a trigger that fits no transition ends."""
        if trigger in MESSAGES:
            self.stats["unexpected_message"] += 1
        elif trigger is Trigger.TIMER:
            self.stats["stale_timer"] += 1
        elif trigger in RESULTS:
            self.stats["stale_result"] += 1
        log.debug("%s %s: %s in %s ignored", self.role.value, conn.tuple, trigger.value,
                  conn.state.value)

    def describe(self) -> list[tuple[str, str, str, str]]:
        """(state, trigger, guard, what happens) per row, in table order (for docs)."""
        out = []
        for (state, trigger), row in self.rows.items():
            doc = (row.handler.__doc__ or row.handler.__name__).strip().splitlines()[0]
            guard = ((row.guard.__doc__ or row.guard.__name__).strip().splitlines()[0]
                     if row.guard is not None else "")
            out.append((state.value if state is not None else "any", trigger.value, guard, doc))
        return out


def markdown(tables: list[Table]) -> str:
    """The transition tables as Markdown (docs/swap.md holds this text; a test checks it)."""
    lines = []
    for table in tables:
        lines += [f"**{table.role.value}**", "",
                  "| state | trigger | only if | then |", "|---|---|---|---|"]
        lines += [f"| {s} | `{t}` | {g} | {d} |" for s, t, g, d in table.describe()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
