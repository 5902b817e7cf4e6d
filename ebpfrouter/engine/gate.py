"""The per-process gate: the one place that counts who holds a process and how often it froze.

Swaps of one process may share one stop (up to `max_swaps_per_process` per batch); later ones
queue until it is free. Freezes per process are capped per second (`max_freezes_per_second`),
so a busy app is not stopped over and over.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

from .keys import OrphanFreeze, RateTimer, StoppedAccept

if TYPE_CHECKING:
    from .core import EngineConfig

Token = bytes | OrphanFreeze  # a connection id, or a freeze whose connection was forgotten
StopToken = bytes | StoppedAccept  # a connection id, or a stopped accept not yet bound


class ProcessGate:
    """Holds, batches, waiters and the freeze-rate window, per pid."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config  # max_swaps_per_process, max_freezes_per_second (read live)
        self.busy: dict[int, set[Token]] = {}  # pid -> swaps holding it now
        self.batch: collections.Counter[int] = collections.Counter()  # pid -> swaps that
        # joined since it was last free (at most max_swaps)
        self.waiters: dict[int, collections.deque[bytes]] = {}  # clients queued per pid
        self.freezes: collections.Counter[int] = collections.Counter()  # per pid, last second
        # pid -> what keeps it stopped since the tracer stopped it at connect()/accept()
        # return: it resumes only when none is left (one SIGCONT resumes the whole process,
        # so one connection's resume must not let another's stopped app run too early)
        self.stops: dict[int, set[StopToken]] = {}

    def stop_hold(self, pid: int, token: StopToken) -> None:
        """`token` (an eager swap, or a stopped accept) keeps `pid` stopped."""
        self.stops.setdefault(pid, set()).add(token)

    def stop_release(self, pid: int, token: StopToken) -> bool:
        """`token` no longer needs `pid` stopped; True if nothing else does (resume it)."""
        holders = self.stops.get(pid)
        if holders is None or token not in holders:
            return False
        holders.discard(token)
        if holders:
            return False
        del self.stops[pid]
        return True

    def stop_move(self, pid: int, old: StopToken, new: StopToken) -> None:
        """The hold of `old` passes to `new` (a stopped accept is bound to its connection)."""
        holders = self.stops.get(pid)
        if holders is not None and old in holders:
            holders.discard(old)
            holders.add(new)

    def stopped(self, pid: int | None) -> bool:
        """The tracer's stop of `pid` is still held."""
        return pid is not None and pid in self.stops

    def full(self, pid: int | None) -> bool:
        """Enough swaps joined this process's current stop: a new one must wait."""
        return self.batch[pid or 0] >= self.config.max_swaps_per_process

    def over_rate(self, pid: int | None) -> bool:
        """Frozen `max_freezes_per_second` times in the last second."""
        return pid is not None and self.freezes[pid] >= self.config.max_freezes_per_second

    def holders(self, pid: int | None) -> set[Token]:
        """The swaps holding `pid` now (a copy)."""
        return set(self.busy.get(pid or 0, ()))

    def hold(self, pid: int, token: Token) -> None:
        """`token` (a swap) holds `pid` from now on."""
        holders = self.busy.setdefault(pid, set())
        if token not in holders:
            holders.add(token)
            self.batch[pid] += 1

    def release(self, pid: int, token: Token) -> None:
        """`token` lets go of `pid`; once nobody holds it the next batch may start (the caller
        then wakes a queued client with `next_waiter`)."""
        holders = self.busy.get(pid)
        if holders is not None:
            holders.discard(token)
            if not holders:
                del self.busy[pid]
                self.batch.pop(pid, None)

    def next_waiter(self, pid: int, still_waits: Callable[[bytes], bool]) -> bytes | None:
        """The first queued connection of `pid` that `still_waits` (the others are dropped)."""
        waiters = self.waiters.get(pid)
        while waiters:
            cid = waiters.popleft()
            if still_waits(cid):
                if not waiters:
                    self.waiters.pop(pid, None)
                return cid
        self.waiters.pop(pid, None)
        return None

    def queue(self, pid: int, cid: bytes) -> None:
        """Client connection `cid` waits for `pid` to be free."""
        waiters = self.waiters.setdefault(pid, collections.deque())
        if cid not in waiters:
            waiters.append(cid)

    def froze(self, pid: int) -> RateTimer:
        """A new stop of `pid` began: count it; the returned timer forgets it a second later."""
        self.freezes[pid] += 1
        return RateTimer(pid)

    def rate_expired(self, timer: RateTimer) -> None:
        """A second has passed since one of `pid`'s freezes."""
        self.freezes[timer.pid] -= 1
        if self.freezes[timer.pid] <= 0:
            del self.freezes[timer.pid]

    def exited(self, pid: int) -> None:
        """`pid` is gone: nobody waits for it any more, and nothing needs resuming."""
        self.waiters.pop(pid, None)
        self.stops.pop(pid, None)
