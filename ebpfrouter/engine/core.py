"""What every part of the engine shares: settings, counters, the outbox, pending results and
the table of connections."""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from .actions import Action, SendPeer, StartTimer
from .conn import Conn, Role
from .events import FourTuple
from .keys import ConnStep, ConnTimer, Ref


@dataclasses.dataclass
class EngineConfig:
    """Tunables (seconds)."""

    node: str
    max_attempts: int = 5  # real attempts (freeze + check); busy queues count
    max_waits: int = 50  # retries because the process or the peer's side was not ready
    backoff_base: float = 0.05
    backoff_max: float = 2.0
    message_timeout: float = 0.5  # waiting for the peer's next swap message (our app is
    # usually frozen meanwhile: a lost peer costs the app this pause, then a retry)
    probe_interval: float = 0.5
    probe_limit: int = 20
    max_waiting: int = 10000  # traced connects waiting for a listener announcement
    listener_wait: float = 60.0  # how long a traced connect waits for that announcement
    bind_wait: float = 10.0  # how long a traced accept waits for the client's bind, and a bind
    # for its accept (then the bound connection is dropped: the client may have forgotten it)
    max_connections: int = 100000
    max_remote_listeners: int = 10000  # peers' announced listeners kept; new ones refused past it
    migrate: bool = True  # carry unread overlay bytes over (False: unread bytes mean busy)
    # More unread bytes than this on one side: busy. The echo must fit the receive queue of a
    # fresh host socket whose app is frozen (no autotuning yet: about 10 MSS of initial window
    # growing to ~64 KiB as data arrives); the schema allows up to 64 MiB.
    max_migrate: int = 48 << 10
    max_freezes_per_second: int = 50  # per process; past it the attempt waits (process busy)
    # Swaps of one process that may share one freeze (the injector counts holds): a server
    # with many new connections is stopped once for a batch of them instead of once per
    # connection. A batch closes when it has this many; later ones wait for the thaw, so one
    # stop lasts at most a batch. 1: one swap per stop.
    max_swaps_per_process: int = 4
    rate_wait: float = 0.2  # how long a client waits when its process hit that cap
    # A traced connect is bypassed only once it is this old: a connection that closes sooner
    # costs no host connection and no freeze (0: start at once). The daemon sets 0.2 s.
    min_age: float = 0.0
    # Eager swap: connections the tracer stopped at connect()/accept() return are swapped
    # before their first byte. `eager_wait` bounds how long a stopped app waits for the other
    # side (its accept, the peer's replace) before it resumes on the overlay.
    eager: bool = True
    eager_wait: float = 0.1
    # Which of our listeners are eager: "auto" learns it per listener from the lifetimes of
    # its connections (`ListenerBook.outcome`): eager once `eager_after` connections lived
    # past `min_age` and at most a quarter of the last `eager_window` closed younger;
    # "always" makes every listener eager from its first connection.
    eager_mode: str = "auto"
    eager_after: int = 3
    eager_window: int = 32


@dataclasses.dataclass
class Policy:
    """The daemon's answers the engine asks for (defaults: yes to everything)."""

    peer_of: Callable[[str], str | None]  # overlay IP -> node owning it (None: not overlay)
    allow: Callable[[Role, int, FourTuple], bool] = lambda role, pid, conn: True  # the rules
    new_cid: Callable[[], bytes] = lambda: os.urandom(16)
    server_ready: Callable[[Conn], bool] = lambda conn: True  # its app has read once
    shared: Callable[[Conn], bool] = lambda conn: False  # another process holds the socket
    # a rule's choice for our listener at (addr, port): "eager", "late" or None (learn it)
    listener_mode: Callable[[str, int], str | None] = lambda addr, port: None


class Core:
    """Counters, outbox, pending results and the connection table, shared by the parts."""

    def __init__(self, config: EngineConfig, policy: Policy) -> None:
        self.config = config
        self.node = config.node
        self.policy = policy
        self.stats: collections.Counter[str] = collections.Counter()
        self.conns: dict[bytes, Conn] = {}
        self.by_fd: dict[tuple[int, int], bytes] = {}  # the holder of each connection
        self.unbound: dict[FourTuple, bytes] = {}  # server: binds still waiting for the accept
        self.refs: dict[int, Ref] = {}
        self._next_ref = 1
        self.out: list[Action] = []
        # our listener's connection `tup` lived past min_age (True) or closed younger
        self.lifetime: Callable[[FourTuple, bool], None] = lambda tup, long: None

    def emit(self, action: Action) -> None:
        """Ask for `action` (returned by `Engine.handle`, in order)."""
        self.out.append(action)

    def ref(self, subject: Ref) -> int:
        """A new result reference for `subject`."""
        ref = self._next_ref
        self._next_ref += 1
        self.refs[ref] = subject
        return ref

    def take_ref(self, ref: int) -> Ref | None:
        """The subject of result `ref`, forgotten now (None, counted, if it is stale)."""
        subject = self.refs.pop(ref, None)
        if subject is None:
            self.stats["stale_result"] += 1
        return subject

    def step(self, conn: Conn) -> int:
        """Start a step of `conn` whose result will come back: its ref, now outstanding."""
        conn.outstanding = self.ref(ConnStep(conn.cid))
        return conn.outstanding

    def result_conn(self, ref: int) -> Conn | None:
        """The connection whose outstanding step `ref` finished (None if stale)."""
        subject = self.take_ref(ref)
        if not isinstance(subject, ConnStep):
            if subject is not None:
                self.stats["stale_result"] += 1
            return None
        conn = self.conns.get(subject.cid)
        if conn is None or conn.outstanding != ref:
            self.stats["stale_result"] += 1
            return None
        conn.outstanding = None
        return conn

    def timer(self, conn: Conn, delay: float) -> None:
        """(Re)start `conn`'s step timer; only the newest one counts when it fires."""
        conn.timer += 1
        self.emit(StartTimer(ConnTimer(conn.cid, conn.timer), delay))

    def send(self, conn: Conn, msg_type: str, **body: Any) -> None:
        """A swap message about `conn` to its peer."""
        self.emit(SendPeer(conn.peer, msg_type, {"cid": conn.cid, **body}))

    def conn_at(self, pid: int, fd: int) -> Conn | None:
        """The connection held at `pid`/`fd`, if any."""
        cid = self.by_fd.get((pid, fd))
        return self.conns.get(cid) if cid is not None else None
