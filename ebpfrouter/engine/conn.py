"""A connection: its fixed identity and where it lives, apart from its current attempt."""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

from .events import FourTuple, SockRef
from .keys import PendingAbort

log = logging.getLogger("ebpfrouter.engine.machine")


class Role(enum.Enum):
    """Which end of the overlay connection this daemon serves."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection states (client and server share the enum)."""

    CONNECTING = "connecting"  # client: host connect in progress
    IDLE = "idle"  # bound; between attempts (client waits for its backoff timer)
    AWAIT_FROZEN = "await_frozen"  # client, server-first: prepare(freeze) sent
    FREEZING = "freezing"
    CHECKING = "checking"  # quiescence check of the local overlay socket
    AWAIT_CHECKED = "await_checked"  # client: prepare(check) sent
    AWAIT_REPLACED = "await_replaced"  # client: bounced, waiting for ready(replaced)
    AWAIT_CHECK = "await_check"  # server, server-first: frozen, ready(frozen) sent
    AWAIT_MIGRATE = "await_migrate"  # server: final check done, ready(checked) sent
    MIGRATING = "migrating"  # both: bouncing unread bytes over the host connection
    REPLACING = "replacing"
    AWAIT_COMMIT = "await_commit"  # server: replaced, frozen, ready(replaced) sent
    PROBING = "probing"  # server: commit uncertain, asking the data path
    ROLLING_BACK = "rolling_back"  # server: putting the overlay socket back
    SWAPPED = "swapped"


@dataclasses.dataclass
class Attempt:
    """One try at the swap; a fresh one each time an attempt really starts."""

    first: Role = Role.CLIENT  # the side frozen first
    prepared: bool = False  # client: a prepare went out in this attempt
    checks: int = 0  # queue checks done in this attempt
    frozen: bool = False
    replaced: bool = False
    recv_len: int = 0  # our unread overlay bytes at the final check (we bounce them)
    peer_len: int = 0  # the peer's unread overlay bytes (we echo them)
    peer_replaced: bool = False  # client: ready(replaced) came while still bouncing
    probes: int = 0
    pending_abort: PendingAbort | None = None
    eager: bool = False  # the eager attempt: both apps stopped at connect()/accept() return


@dataclasses.dataclass
class Conn:
    """One overlay connection being (or already) moved to the host network.

    Identity (`cid`, `role`, `peer`, `tuple`) never changes; `pid`/`fd` follow the socket's
    holder (a fork hands it on), the sockets are the daemon's handles; `now` is the current
    attempt, `attempt` the number of the latest one (the peer checks it; waits count too).
    """

    cid: bytes
    role: Role
    peer: str
    tuple: FourTuple
    state: State
    pid: int | None = None
    fd: int | None = None
    inode: int | None = None
    overlay_sock: SockRef | None = None
    host_sock: SockRef | None = None
    host_inode: int | None = None
    attempt: int = 0
    waits: int = 0  # attempts that did not run: process busy, server side not ready
    outstanding: int | None = None  # the ref of the step whose result is awaited
    timer: int = 0
    close_after: bool = False  # server: the app closed the fd while the outcome was open
    told_final: bool = False  # a final swap_abort or conn_closed went to the peer
    bounced: bool = False  # a Bounce with bytes ran: this host connection is single-use
    peer_waiting: bool = False  # client: the server said "wait"; next attempt freezes it first
    eager: bool = False  # an eager swap is under way or still possible (the bind said so)
    path: str = ""  # how it was swapped: "eager" or "late" (status)
    aging: bool = False  # server, swapped eagerly: min_age not reached yet (its AgeTimer runs)
    now: Attempt = dataclasses.field(default_factory=Attempt)

    def __setattr__(self, name: str, value: Any) -> None:
        """Log every state change at DEBUG (`conn <cid> <tuple>: <old> -> <new>`): the one
        place a connection's state changes are seen."""
        if name == "state" and log.isEnabledFor(logging.DEBUG):
            old = self.__dict__.get("state")
            if old is not value:
                log.debug("conn %s %s: %s -> %s", self.cid.hex()[:8], self.tuple,
                          old.value if old is not None else "new", value.value)
        object.__setattr__(self, name, value)

    @property
    def matched(self) -> bool:
        """Server: the traced accept has been paired with the peer's bind."""
        return self.pid is not None

    @property
    def pending_abort(self) -> PendingAbort | None:
        """The abort decided while the current step runs (in the current attempt)."""
        return self.now.pending_abort

    @pending_abort.setter
    def pending_abort(self, value: PendingAbort | None) -> None:
        self.now.pending_abort = value

    def summary(self) -> dict[str, Any]:
        """One line for `status`."""
        return {"state": self.state.value, "role": self.role.value, "pid": self.pid,
                "fd": self.fd, "tuple": str(self.tuple), "peer": self.peer,
                "attempt": self.attempt,
                "path": self.path or ("eager" if self.eager else "overlay")}


@dataclasses.dataclass
class Listener:
    """A local overlay listener and its host-side counterpart."""

    pid: int
    fd: int
    addr: str
    port: int
    ref: int
    sock: SockRef | None = None
    host_addr: str = ""
    host_port: int = 0
    eager: bool = False  # its new connections are stopped and swapped at accept() return

    def announcement(self) -> dict[str, Any]:
        """The `listener_add` body."""
        return {"overlay_addr": self.addr, "overlay_port": self.port,
                "host_addr": self.host_addr, "host_port": self.host_port,
                "eager": self.eager}
