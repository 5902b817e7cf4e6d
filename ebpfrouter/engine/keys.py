"""Typed names the engine gives its timers, pending results and abort reasons.

Timer keys are tuples underneath (``("accept", pid, fd, inode)``), so they hash and compare as
before and the runners treat them as opaque; the engine tells them apart by class, never by
length or first element. A `Ref` names the result an action will bring back.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import ClassVar


class TimerKey(tuple):  # type: ignore[type-arg]  # a tuple of mixed fields, by design
    """Base of the engine's timer keys: `StartTimer(key)` comes back as `TimerFired(key)`."""

    kind: ClassVar[str] = ""


class FdTimer(TimerKey):
    """A traced connect or accept waiting in one of the admission tables."""

    def __new__(cls, pid: int, fd: int, inode: int) -> FdTimer:
        return tuple.__new__(cls, (cls.kind, pid, fd, inode))

    @property
    def pid(self) -> int:
        """The process that holds the socket."""
        return int(self[1])

    @property
    def fd(self) -> int:
        """Its fd there."""
        return int(self[2])

    @property
    def inode(self) -> int:
        """The socket's inode (a reused fd number makes the timer stale)."""
        return int(self[3])


class YoungTimer(FdTimer):
    """A traced connect reaches `min_age`."""

    kind = "young"


class WaitingTimer(FdTimer):
    """A traced connect gives up waiting for its listener's announcement."""

    kind = "waiting"


class AcceptTimer(FdTimer):
    """A traced accept gives up waiting for its client's bind."""

    kind = "accept"


class EagerTimer(FdTimer):
    """An accept the tracer stopped gives up waiting for its client's eager bind: resume it."""

    kind = "eager"


class StoppedAccept(FdTimer):
    """A stop hold of a traced accept that no connection owns yet (not a timer)."""

    kind = "stopped_accept"


class AgeTimer(TimerKey):
    """A connection swapped eagerly on the server side has lived `min_age`: a long one."""

    kind = "age"

    def __new__(cls, cid: bytes) -> AgeTimer:
        return tuple.__new__(cls, (cls.kind, cid))

    @property
    def cid(self) -> bytes:
        """The connection's id."""
        return bytes(self[1])


class BindTimer(TimerKey):
    """A bind gives up waiting for its accept."""

    kind = "bind"

    def __new__(cls, cid: bytes) -> BindTimer:
        return tuple.__new__(cls, (cls.kind, cid))

    @property
    def cid(self) -> bytes:
        """The connection id of the bind."""
        return bytes(self[1])


class RateTimer(TimerKey):
    """One second after a freeze of `pid`: the rate window forgets it."""

    kind = "rate"

    def __new__(cls, pid: int) -> RateTimer:
        return tuple.__new__(cls, (cls.kind, pid))

    @property
    def pid(self) -> int:
        """The process frozen a second ago."""
        return int(self[1])


class ConnTimer(TimerKey):
    """A connection's step timer; only the newest (`n`) counts."""

    kind = "conn"

    def __new__(cls, cid: bytes, n: int) -> ConnTimer:
        return tuple.__new__(cls, (cls.kind, cid, n))

    @property
    def cid(self) -> bytes:
        """The connection."""
        return bytes(self[1])

    @property
    def n(self) -> int:
        """Its timer generation."""
        return int(self[2])


@dataclasses.dataclass(frozen=True)
class ConnStep:
    """The result of a connection's outstanding step."""

    cid: bytes


@dataclasses.dataclass(frozen=True)
class ListenerOpening:
    """The result of opening the host listener for overlay listener (pid, fd)."""

    key: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class OrphanFreeze:
    """A freeze whose connection was forgotten while it ran: its result must thaw `pid`.

    Also the token that holds `pid` in the process gate meanwhile."""

    pid: int
    cid: bytes


Ref = ConnStep | ListenerOpening | OrphanFreeze


class WaitReason(enum.Enum):
    """Why the server side answers a prepare with "wait" (not an attempt); the value is the
    text on the wire."""

    NOT_READY = "not ready"
    PROCESS_BUSY = "process busy"
    APP_UNREAD = "app has not read yet"
    SHARED = "socket held by several processes"
    NOT_STOPPED = "app not stopped at accept"  # eager: no stopped accept (yet): go late

    @classmethod
    def of(cls, text: str) -> WaitReason | None:
        """The wait reason a peer's `swap_abort` text names, if it is one."""
        try:
            return cls(text)
        except ValueError:
            return None


class Abort(enum.Enum):
    """Why an attempt (or a connection) is abandoned; behaviour keys on these, never on text."""

    CLOSED = "closed"  # the app closed the fd (or handed it on mid-swap)
    EXITED = "exited"  # the app's process exited
    PEER_LOST = "peer lost"  # the control channel broke
    PEER_CLOSED = "peer closed"  # the peer says its side closed
    PEER_GAVE_UP = "peer gave up"
    PEER_ABORTED = "peer"  # the peer aborted its side (detail: its reason)
    HOST_CLOSED = "host connection closed"
    TIMEOUT = "timeout"
    BUSY = "busy"  # queues not quiet (detail: sizes)
    FAILED = "failed"  # an action failed (detail: why)
    ROLLED_BACK = "rolled back"  # the server put the overlay socket back
    NOT_PRISTINE = "payload crossed the overlay"  # eager: an app ran after its stop


@dataclasses.dataclass(frozen=True)
class PendingAbort:
    """An abort decided while a step was running: applied when its result arrives."""

    reason: Abort
    retry: bool
    notify: bool
    detail: str = ""

    def text(self) -> str:
        """What the logs and the peer are told (at most 200 characters)."""
        if self.reason is Abort.PEER_ABORTED:
            return f"peer: {self.detail}"[:200]
        if self.reason in (Abort.BUSY, Abort.FAILED, Abort.NOT_PRISTINE) and self.detail:
            return self.detail[:200]
        return str(self.reason.value)
