"""The router's sans-I/O core: overlay listeners, connections and the two-phase swap.

Events in (`Engine.handle(event)`), actions out; no sockets, syscalls or clocks inside.

Roles: the **client** side (the daemon that traced the overlay `connect`) coordinates; the
**server** side (the daemon that traced the `accept`) follows. Per attempt, "first" is the side
frozen first (the writer, so the reader can drain). Every queue check requires the send queue
of the overlay socket to be empty (all our app wrote is acknowledged, so it sits in the peer's
receive queue), and a side's check only counts after the other side is frozen with an empty
send queue. The unread receive queues are then final and are carried over instead of waited
for: R_c (client side's unread bytes) and R_s (server side's). Each side's final check reports
its length; the lengths travel as `migrate_len`::

    client-first:  C freeze, C check -> prepare(check) -> S freeze, S check[R_s]
                   -> ready(checked, |R_s|) -> C check[R_c] -> prepare(migrate, |R_c|)
                   -> C bounce || S bounce -> S replace -> ready(replaced)
                   -> C (bounce done) replace -> commit; C thaw -> S thaw -> done
    server-first:  prepare(freeze) -> S freeze, S check -> ready(frozen) -> C freeze, C check
                   -> prepare(check) -> S check[R_s] -> ready(checked, |R_s|) -> (as above)

`Bounce` carries the bytes over the new host connection before either side hands it over:
each daemon writes its own R (peeked, so the overlay socket is untouched), reads exactly the
peer's |R| and writes it back, so the client host socket reads [R_s to bounce][R_c echo]
[server app's data] and the server host socket [R_c to bounce][R_s echo][client app's data];
each app reads its old unread bytes first. A side replaces only after its bounce completed. An
attempt that bounced bytes cannot be retried on that host connection: an abort after it
leaves the connection on the overlay (the bounced bytes never reach an app). With
`migrate=False` any unread byte makes the side busy (the old strict check) and nothing is
bounced. Freezes per process are capped (`max_freezes_per_second`) so a busy app is not
stopped over and over.

The commit point is the client's successful replace. Before it, any failure, timeout, busy
queue or lost peer thaws both sides unchanged (the server puts the overlay socket back if it
had replaced it) and the client retries with backoff up to `max_attempts`, then leaves the
connection on the overlay. If the control channel breaks while the server waits for the
commit, the server asks the data path: the client closes its overlay copy only after
committing and its host socket only when giving up, so `ProbeConn` tells which way it went.

Peers name connections only by connection id and overlay 4-tuple; a message can only advance
a connection this daemon traced itself and bound to that same peer. Anything else is counted
and ignored.

Open end for the later features of DESIGN.md: `ConnectTraced/AcceptTraced(stopped=True)` (the
caller already stopped at connect/accept return) lets the freeze step be skipped.

Timing assumption: the server's last probe (`probe_limit * probe_interval`) comes well after
the client's message timeouts, so the client has decided by then.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
from collections.abc import Callable
from typing import Any

from .actions import (
    Action,
    Bounce,
    CancelTimer,
    CheckQueues,
    CloseSocket,
    Freeze,
    HostConnect,
    NoteSwapped,
    OpenHostListener,
    ProbeConn,
    ReplaceFd,
    SendPeer,
    StartTimer,
    Thaw,
)
from .events import (
    AcceptTraced,
    ActionFailed,
    BounceDone,
    CloseTraced,
    ConnectTraced,
    ConnProbed,
    Event,
    FdMoved,
    FourTuple,
    FreezeDone,
    HostAccepted,
    HostClosed,
    HostConnected,
    HostListenerOpened,
    ListenTraced,
    PeerLost,
    PeerMessage,
    PeerUp,
    ProcessExited,
    QueuesChecked,
    ReplaceDone,
    SockRef,
    TimerFired,
)

log = logging.getLogger(__name__)

NOT_READY, PROCESS_BUSY, APP_UNREAD = "not ready", "process busy", "app has not read yet"
SHARED = "socket held by several processes"
WAIT_REASONS = (NOT_READY, PROCESS_BUSY, APP_UNREAD, SHARED)  # server-side: do not use up
# an attempt


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

    def announcement(self) -> dict[str, Any]:
        """The `listener_add` body."""
        return {"overlay_addr": self.addr, "overlay_port": self.port,
                "host_addr": self.host_addr, "host_port": self.host_port}


@dataclasses.dataclass
class Conn:
    """One overlay connection being (or already) moved to the host network."""

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
    attempt: int = 0  # strictly increasing per connection (the peer checks it)
    waits: int = 0  # attempts that did not run: process busy, server side not ready
    first: Role = Role.CLIENT
    prepared: bool = False  # client: a prepare went out in this attempt
    checks: int = 0  # client: queue checks done in this attempt
    frozen: bool = False
    replaced: bool = False
    outstanding: int | None = None
    pending_abort: tuple[str, bool, bool] | None = None  # (reason, retry, notify)
    timer: int = 0
    probes: int = 0
    close_after: bool = False  # server: the app closed the fd while the outcome was open
    told_final: bool = False  # a final swap_abort or conn_closed went to the peer
    recv_len: int = 0  # our unread overlay bytes at the final check (we bounce them)
    peer_len: int = 0  # the peer's unread overlay bytes (we echo them)
    bounced: bool = False  # a Bounce with bytes ran: this host connection is single-use
    peer_replaced: bool = False  # client: ready(replaced) came while still bouncing
    peer_waiting: bool = False  # client: the server said "wait"; next attempt freezes it first

    def __setattr__(self, name: str, value: Any) -> None:
        """Log every state change at DEBUG (`conn <cid> <tuple>: <old> -> <new>`)."""
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


class Engine:
    """The state machines of one daemon. `handle(event)` returns the actions to run."""

    def __init__(
        self,
        config: EngineConfig,
        peer_of: Callable[[str], str | None],
        allow: Callable[[Role, int, FourTuple], bool] | None = None,
        new_cid: Callable[[], bytes] | None = None,
        server_ready: Callable[[Conn], bool] | None = None,
        shared: Callable[[Conn], bool] | None = None,
    ) -> None:
        """`peer_of(overlay_ip)` names the node owning an overlay address (None: not overlay);
        `allow(role, pid, conn)` applies the rules; `new_cid` makes 16-byte connection ids;
        `server_ready(conn)` says whether an accepted connection may be swapped now (the
        daemon's policy: its app has read from it once, so an app that checks `getpeername()`
        after its first message has done so on the overlay); False makes the client wait.
        `shared(conn)` says whether more than one process holds the connection's socket now
        (just after a fork): replacing one fd would leave the other process on the overlay
        socket, so such a connection waits (both sides) until one holder is left."""
        self.config = config
        self.node = config.node
        self.peer_of = peer_of
        self.allow = allow or (lambda role, pid, conn: True)
        self.new_cid = new_cid or (lambda: os.urandom(16))
        self.server_ready = server_ready or (lambda conn: True)
        self.shared = shared or (lambda conn: False)
        self.stats: collections.Counter[str] = collections.Counter()
        self.listeners: dict[tuple[int, int], Listener] = {}
        self.remote_listeners: dict[tuple[str, int], tuple[str, str, int]] = {}
        self.conns: dict[bytes, Conn] = {}
        self.by_fd: dict[tuple[int, int], bytes] = {}
        self.accepts: dict[FourTuple, AcceptTraced] = {}  # server: traced, not yet bound
        self.accepts_by_fd: dict[tuple[int, int], FourTuple] = {}  # index of `accepts`
        self.unbound: dict[FourTuple, bytes] = {}  # server: binds still waiting for the accept
        self.young: collections.OrderedDict[tuple[int, int], ConnectTraced] = (
            collections.OrderedDict())  # client: traced connects younger than `min_age`
        self.waiting: collections.OrderedDict[tuple[int, int], ConnectTraced] = (
            collections.OrderedDict())
        self.busy_pids: dict[int, set[bytes]] = {}  # pid -> swaps holding it now
        self.batch: collections.Counter[int] = collections.Counter()  # pid -> swaps that
        # joined since it was last free (at most max_swaps_per_process)
        self.pid_waiters: dict[int, collections.deque[bytes]] = {}  # clients queued per pid
        self.freezes: collections.Counter[int] = collections.Counter()  # per pid, last second
        self._refs: dict[int, tuple[str, Any]] = {}
        self._next_ref = 1
        self._out: list[Action] = []

    # -- plumbing ----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Process one event; return the actions it causes, in order."""
        self._out = []
        method = getattr(self, "_on_" + type(event).__name__, None)
        if method is None:
            self.stats["unknown_event"] += 1
        else:
            method(event)
        out, self._out = self._out, []
        return out

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _ref(self, kind: str, subject: Any) -> int:
        ref = self._next_ref
        self._next_ref += 1
        self._refs[ref] = (kind, subject)
        return ref

    def _take_ref(self, ref: int) -> tuple[str, Any] | None:
        entry = self._refs.pop(ref, None)
        if entry is None:
            self.stats["stale_result"] += 1
        return entry

    def _timer(self, conn: Conn, delay: float) -> None:
        conn.timer += 1
        self._emit(StartTimer(("conn", conn.cid, conn.timer), delay))

    def _send(self, conn: Conn, msg_type: str, **body: Any) -> None:
        self._emit(SendPeer(conn.peer, msg_type, {"cid": conn.cid, **body}))

    def summary(self) -> dict[str, Any]:
        """Counts for `ebpf-router status`."""
        states = collections.Counter(c.state.value for c in self.conns.values())
        return {
            "seen": self.stats["connects_traced"] + self.stats["accepts_traced"],
            "bypassed": self.stats["swapped"],
            "pending": sum(n for state, n in states.items() if state != State.SWAPPED.value),
            "failed": self.stats["left_on_overlay"],
            "short": self.stats["traced_short"],  # closed before anything was tried
            "skipped": self.stats["traced_skipped"],  # left alone by decision (see `_let_go`)
            "listeners": len(self.listeners),
            "remote_listeners": len(self.remote_listeners),
            "connections": len(self.conns),
            "young": len(self.young),
            "waiting_listener": len(self.waiting),
            "waiting_bind": len(self.accepts),
            "states": dict(states),
            "frozen_pids": sorted(self.busy_pids),
            "stats": dict(self.stats),
        }

    # -- queries for the runners (read-only; the engine's tables stay inside) ------------------

    def swaps_in_flight(self) -> bool:
        """A swap holds a process or waits for a step (shutdown waits for these to settle)."""
        return bool(self.busy_pids) or any(
            c.outstanding is not None or c.state not in (State.IDLE, State.SWAPPED,
                                                         State.CONNECTING)
            for c in self.conns.values())

    def overlay_sock_of(self, pid: int, fd: int) -> SockRef | None:
        """The daemon's copy of the overlay socket the engine tracks at `pid`/`fd`."""
        cid = self.by_fd.get((pid, fd))
        conn = self.conns.get(cid) if cid is not None else None
        return conn.overlay_sock if conn is not None else None

    def tracks_fd(self, pid: int, fd: int) -> bool:
        """Whether a connection is known at `pid`/`fd`."""
        return (pid, fd) in self.by_fd

    def awaiting_accept(self, cid: bytes) -> bool:
        """A bind `cid` came and its accept has not been traced yet."""
        conn = self.conns.get(cid)
        return conn is not None and conn.role is Role.SERVER and not conn.matched

    def listener_pids(self, host_listener: SockRef) -> set[int]:
        """The processes holding the overlay listener behind host listener `host_listener`."""
        return {lst.pid for lst in self.listeners.values() if lst.sock == host_listener}

    def held_socks(self) -> set[SockRef]:
        """Every socket handle the engine holds (the daemon may close the rest)."""
        refs = {r for c in self.conns.values() for r in (c.overlay_sock, c.host_sock)
                if r is not None}
        refs.update(lst.sock for lst in self.listeners.values() if lst.sock is not None)
        refs.update(w.sock for w in self.waiting.values())
        refs.update(y.sock for y in self.young.values())
        refs.update(a.sock for a in self.accepts.values())
        return refs

    def connections(self) -> list[dict[str, Any]]:
        """One line per connection, for `status`."""
        return [{"state": c.state.value, "role": c.role.value, "pid": c.pid, "fd": c.fd,
                 "tuple": str(c.tuple), "peer": c.peer, "attempt": c.attempt}
                for c in self.conns.values()]

    def listener_table(self) -> list[dict[str, Any]]:
        """One line per overlay listener and its host listener, for `status`."""
        return [{"overlay": f"{lst.addr}:{lst.port}", "host": f"{lst.host_addr}:{lst.host_port}",
                 "pid": lst.pid, "sock": lst.sock} for lst in self.listeners.values()]

    # -- listeners (server side) -------------------------------------------------------------

    def _on_ListenTraced(self, ev: ListenTraced) -> None:
        if self.peer_of(ev.addr) != self.node:
            self.stats["listen_not_local_overlay"] += 1
            return
        if any((lst.addr, lst.port) == (ev.addr, ev.port) for lst in self.listeners.values()):
            self.stats["listen_duplicate"] += 1
            return
        listener = Listener(ev.pid, ev.fd, ev.addr, ev.port, ref=0)
        listener.ref = self._ref("listener", (ev.pid, ev.fd))
        self.listeners[(ev.pid, ev.fd)] = listener
        self._emit(OpenHostListener(listener.ref, ev.addr, ev.port, port_hint=ev.port,
                                    pid=ev.pid, fd=ev.fd))

    def _on_HostListenerOpened(self, ev: HostListenerOpened) -> None:
        entry = self._take_ref(ev.ref)
        listener = self.listeners.get(entry[1]) if entry else None
        if listener is None or listener.ref != ev.ref:
            self._emit(CloseSocket(ev.sock))  # the listener went away meanwhile
            return
        listener.sock, listener.host_addr, listener.host_port = ev.sock, ev.host_addr, ev.host_port
        self.stats["listeners_announced"] += 1
        self._emit(SendPeer(None, "listener_add", listener.announcement()))

    def _drop_listener(self, key: tuple[int, int]) -> None:
        listener = self.listeners.pop(key)
        self._refs.pop(listener.ref, None)
        if listener.sock is not None:
            self._emit(CloseSocket(listener.sock))
            self._emit(SendPeer(None, "listener_remove",
                                {"overlay_addr": listener.addr, "overlay_port": listener.port}))

    def _on_PeerUp(self, ev: PeerUp) -> None:
        for listener in self.listeners.values():
            if listener.sock is not None:
                self._emit(SendPeer(ev.peer, "listener_add", listener.announcement()))

    # -- tracing -----------------------------------------------------------------------------

    def _on_ConnectTraced(self, ev: ConnectTraced) -> None:
        self.stats["connects_traced"] += 1
        peer = self.peer_of(ev.conn.server_addr)
        if peer is None or peer == self.node:
            self._let_go(ev, None, "connect_not_remote")
            return
        self._forget_fd(ev.pid, ev.fd)  # a reused fd number: the old state is stale
        self._drop_unstarted(ev.pid, ev.fd)
        if self.config.min_age > 0:  # short connections are not worth a host connection
            # (nor a look at the rules: they are applied when the connection has grown up)
            self.young[(ev.pid, ev.fd)] = ev
            self._emit(StartTimer(("young", ev.pid, ev.fd, ev.inode), self.config.min_age))
            while len(self.young) > self.config.max_waiting:
                _, evicted = self.young.popitem(last=False)
                self._let_go(evicted, "young", "young_evicted")
            return
        self._route_client(ev, peer)

    def _let_go(self, ev: ConnectTraced | AcceptTraced, timer: str | None, why: str,
                short: bool = False) -> None:
        """Leave a traced connection alone before any attempt: cancel its `timer` (the table
        it waited in), close our copy, count `why` and the outcome: short (closed before
        anything was tried) or skipped (a decision: not remote, ruled out, expired, full)."""
        if timer is not None:
            self._emit(CancelTimer((timer, ev.pid, ev.fd, ev.inode)))
        self._emit(CloseSocket(ev.sock))
        self.stats[why] += 1
        self.stats["traced_short" if short else "traced_skipped"] += 1

    def _grown_up(self, pid: int, fd: int, inode: int) -> None:
        """A traced connect lived `min_age`: bypass it now."""
        ev = self.young.get((pid, fd))
        if ev is None or ev.inode != inode:
            self.stats["stale_timer"] += 1
            return
        del self.young[(pid, fd)]
        peer = self.peer_of(ev.conn.server_addr)
        if peer is None or peer == self.node:  # the peer map changed meanwhile
            self._let_go(ev, None, "connect_not_remote")
            return
        self._route_client(ev, peer)

    def _route_client(self, ev: ConnectTraced, peer: str) -> None:
        """Apply the rules; start the bypass if the server's listener is announced, else wait
        for it."""
        if not self.allow(Role.CLIENT, ev.pid, ev.conn):
            self._let_go(ev, None, "connect_ruled_out")
            return
        target = self.remote_listeners.get((ev.conn.server_addr, ev.conn.server_port))
        if target is None or target[0] != peer:
            self.stats["connect_waiting_listener"] += 1
            self.waiting[(ev.pid, ev.fd)] = ev
            self._emit(StartTimer(("waiting", ev.pid, ev.fd, ev.inode), self.config.listener_wait))
            while len(self.waiting) > self.config.max_waiting:
                _, evicted = self.waiting.popitem(last=False)
                self._let_go(evicted, "waiting", "waiting_evicted")
            return
        self._start_client(ev, peer, target[1], target[2])

    def _drop_unstarted(self, pid: int, fd: int) -> None:
        """Forget a traced connect of `pid`/`fd` that has no host connection yet."""
        ev = self.young.pop((pid, fd), None)
        if ev is not None:
            self._let_go(ev, "young", "closed_young", short=True)
        ev = self.waiting.pop((pid, fd), None)
        if ev is not None:
            self._let_go(ev, "waiting", "closed_waiting_listener")
        tup = self.accepts_by_fd.get((pid, fd))
        if tup is not None:
            acc = self._pop_accept(tup)
            assert acc is not None
            self._let_go(acc, "accept", "closed_before_bind", short=True)

    def holds_traced(self, pid: int, fd: int, sock: SockRef) -> bool:
        """Whether the engine kept `sock`, the copy that came with a traced connect/accept."""
        for table in (self.young, self.waiting):
            ev = table.get((pid, fd))
            if ev is not None and ev.sock == sock:
                return True
        tup = self.accepts_by_fd.get((pid, fd))
        if tup is not None and self.accepts[tup].sock == sock:
            return True
        cid = self.by_fd.get((pid, fd))
        conn = self.conns.get(cid) if cid is not None else None
        return conn is not None and conn.overlay_sock == sock

    def _start_client(self, ev: ConnectTraced, peer: str, host_addr: str, host_port: int) -> None:
        if len(self.conns) >= self.config.max_connections:
            self._let_go(ev, None, "too_many_connections")
            return
        cid = self.new_cid()
        conn = Conn(cid, Role.CLIENT, peer, ev.conn, State.CONNECTING, pid=ev.pid, fd=ev.fd,
                    inode=ev.inode, overlay_sock=ev.sock)
        self.conns[cid] = conn
        self.by_fd[(ev.pid, ev.fd)] = cid
        conn.outstanding = self._ref("conn", cid)
        self.stats["bypass_started"] += 1
        self._emit(HostConnect(conn.outstanding, cid, host_addr, host_port,
                               {"cid": cid, **ev.conn.to_body()}, overlay_sock=ev.sock))

    def _on_AcceptTraced(self, ev: AcceptTraced) -> None:
        self.stats["accepts_traced"] += 1
        self._forget_fd(ev.pid, ev.fd)
        self._drop_unstarted(ev.pid, ev.fd)
        if self.peer_of(ev.conn.server_addr) != self.node:
            self._let_go(ev, None, "accept_not_local")
            return
        peer = self.peer_of(ev.conn.client_addr)
        if peer is None or peer == self.node:
            self._let_go(ev, None, "accept_not_remote")
            return
        cid = self.unbound.get(ev.conn)  # the bind may have come first
        conn = self.conns.get(cid) if cid is not None else None
        if conn is not None and conn.role is Role.SERVER and not conn.matched:
            if conn.peer != peer:
                self._let_go(ev, None, "bind_peer_mismatch")
                return
            self._emit(CancelTimer(("bind", conn.cid)))
            self._match(conn, ev)
            return
        old = self._pop_accept(ev.conn)
        if old is not None:
            self._let_go(old, "accept", "accept_duplicate")
        self.accepts[ev.conn] = ev
        self.accepts_by_fd[(ev.pid, ev.fd)] = ev.conn
        self._emit(StartTimer(("accept", ev.pid, ev.fd, ev.inode), self.config.bind_wait))
        if len(self.accepts) > self.config.max_waiting:
            evicted = self._pop_accept(next(iter(self.accepts)))
            assert evicted is not None
            self._let_go(evicted, "accept", "accepts_evicted")

    def _pop_accept(self, tup: FourTuple) -> AcceptTraced | None:
        """Take a traced accept that waits for its bind out of `accepts` (and its index)."""
        acc = self.accepts.pop(tup, None)
        if acc is not None and self.accepts_by_fd.get((acc.pid, acc.fd)) == tup:
            del self.accepts_by_fd[(acc.pid, acc.fd)]
        return acc

    def _match(self, conn: Conn, ev: AcceptTraced) -> None:
        if self.unbound.get(conn.tuple) == conn.cid:
            del self.unbound[conn.tuple]
        conn.pid, conn.fd, conn.inode, conn.overlay_sock = ev.pid, ev.fd, ev.inode, ev.sock
        self.by_fd[(ev.pid, ev.fd)] = conn.cid
        self.stats["bound"] += 1

    def _on_HostAccepted(self, ev: HostAccepted) -> None:
        bind = ev.bind
        try:
            cid, tup = bind["cid"], FourTuple.from_body(bind)
        except (KeyError, TypeError):
            self.stats["bad_bind"] += 1
            self._emit(CloseSocket(ev.sock))
            return
        listener = next((lst for lst in self.listeners.values() if lst.sock == ev.listener), None)
        if (listener is None or (listener.addr, listener.port) != (tup.server_addr, tup.server_port)
                or self.peer_of(tup.client_addr) != ev.peer or ev.peer == self.node
                or cid in self.conns or len(self.conns) >= self.config.max_connections):
            self.stats["bind_rejected"] += 1
            self._emit(CloseSocket(ev.sock))
            return
        conn = Conn(cid, Role.SERVER, ev.peer, tup, State.IDLE, host_sock=ev.sock,
                    host_inode=ev.inode)
        self.conns[cid] = conn
        accepted = self._pop_accept(tup)
        if accepted is not None:
            self._emit(CancelTimer(("accept", accepted.pid, accepted.fd, accepted.inode)))
            self._match(conn, accepted)
        else:  # the client may forget it (app closed during its host connect): expire it
            self.unbound[tup] = cid
            self._emit(StartTimer(("bind", cid), self.config.bind_wait))

    def _on_HostClosed(self, ev: HostClosed) -> None:
        conn = next((c for c in self.conns.values() if c.host_sock == ev.sock), None)
        if conn is None or conn.state is State.SWAPPED:
            return
        self.stats["host_closed_by_peer"] += 1
        if conn.state in (State.AWAIT_COMMIT, State.PROBING):
            if conn.outstanding is None:
                self._probe(conn)  # the client gave up; the probe confirms and rolls back
            return
        self._abort(conn, "host connection closed", retry=False, notify=True)

    def _on_CloseTraced(self, ev: CloseTraced) -> None:
        self._drop_unstarted(ev.pid, ev.fd)
        if (ev.pid, ev.fd) in self.listeners:
            self._drop_listener((ev.pid, ev.fd))
        self._forget_fd(ev.pid, ev.fd)

    def _on_FdMoved(self, ev: FdMoved) -> None:
        """Carry whatever the engine knows under (pid, fd) over to (new_pid, new_fd)."""
        old, new = (ev.pid, ev.fd), (ev.new_pid, ev.new_fd)
        moved = False
        for name, table in (("young", self.young), ("waiting", self.waiting)):
            traced = table.pop(old, None)
            if traced is not None:  # restart its wait under the new key (a full one)
                self._emit(CancelTimer((name, ev.pid, ev.fd, traced.inode)))
                table[new] = dataclasses.replace(traced, pid=ev.new_pid, fd=ev.new_fd)
                delay = self.config.min_age if name == "young" else self.config.listener_wait
                self._emit(StartTimer((name, ev.new_pid, ev.new_fd, traced.inode), delay))
                moved = True
        tup = self.accepts_by_fd.pop(old, None)
        if tup is not None:
            acc = self.accepts[tup]
            self._emit(CancelTimer(("accept", acc.pid, acc.fd, acc.inode)))
            self.accepts[tup] = dataclasses.replace(acc, pid=ev.new_pid, fd=ev.new_fd)
            self.accepts_by_fd[new] = tup
            self._emit(StartTimer(("accept", ev.new_pid, ev.new_fd, acc.inode),
                                  self.config.bind_wait))
            moved = True
        listener = self.listeners.pop(old, None)
        if listener is not None:
            listener.pid, listener.fd = new
            self.listeners[new] = listener
            if listener.ref in self._refs:
                self._refs[listener.ref] = ("listener", new)
            moved = True
        cid = self.by_fd.get(old)
        conn = self.conns.get(cid) if cid is not None else None
        if conn is not None:
            if conn.state in (State.IDLE, State.CONNECTING, State.SWAPPED):
                del self.by_fd[old]
                conn.pid, conn.fd = new
                self.by_fd[new] = conn.cid
                moved = True
            else:  # mid-swap (the old holder was not frozen yet): this attempt is void
                self.stats["moved_during_swap"] += 1
                self._forget_fd(ev.pid, ev.fd)
        if moved:
            self.stats["fd_moved"] += 1

    def _on_ProcessExited(self, ev: ProcessExited) -> None:
        self.pid_waiters.pop(ev.pid, None)
        for key in [k for k in self.listeners if k[0] == ev.pid]:
            self._drop_listener(key)
        fds = {k for k in self.young if k[0] == ev.pid} | {k for k in self.waiting
                                                             if k[0] == ev.pid}
        fds |= {k for k in self.accepts_by_fd if k[0] == ev.pid}
        for key in fds:
            self._drop_unstarted(*key)
        for key in [k for k in self.by_fd if k[0] == ev.pid]:
            self._forget_fd(*key, exited=True)

    def _forget_fd(self, pid: int, fd: int, exited: bool = False) -> None:
        cid = self.by_fd.get((pid, fd))
        conn = self.conns.get(cid) if cid is not None else None
        if conn is None:
            return
        self.stats["closed_by_app"] += 1
        if conn.state is State.SWAPPED:
            self._finish(conn, notify=False)
            return
        if not exited and conn.state in (State.AWAIT_COMMIT, State.PROBING):
            conn.close_after = True  # settle the swap first (a stale event: the app is frozen)
            return
        self._abort(conn, "exited" if exited else "closed", retry=False, notify=True)

    # -- peer messages -----------------------------------------------------------------------

    def _on_PeerMessage(self, ev: PeerMessage) -> None:
        handler = getattr(self, "_msg_" + ev.type, None)
        if handler is None:
            self.stats["unexpected_message"] += 1
            return
        if "cid" in ev.body:
            conn = self.conns.get(ev.body["cid"])
            if conn is None or conn.peer != ev.peer:
                self.stats["message_unknown_connection"] += 1
                return
            handler(ev, conn)
        else:
            handler(ev)

    def _unexpected(self, ev: PeerMessage, conn: Conn) -> None:
        self.stats["unexpected_message"] += 1
        log.debug("%s from %s for %s in %s", ev.type, ev.peer, conn.tuple, conn.state)

    def _msg_hello(self, ev: PeerMessage) -> None:
        self.stats["hellos"] += 1

    def _msg_error(self, ev: PeerMessage) -> None:
        self.stats["peer_errors"] += 1
        log.warning("peer %s reports %s: %s", ev.peer, ev.body["code"], ev.body["detail"])

    def _msg_listener_add(self, ev: PeerMessage) -> None:
        key = (ev.body["overlay_addr"], ev.body["overlay_port"])
        if self.peer_of(key[0]) != ev.peer or ev.peer == self.node:
            self.stats["foreign_listener_rejected"] += 1
            return
        if (key not in self.remote_listeners
                and len(self.remote_listeners) >= self.config.max_remote_listeners):
            # An authenticated peer can still flood announcements: keep what we have, refuse
            # the new one (its connections simply stay on the overlay) and count it.
            self.stats["remote_listeners_full"] += 1
            return
        self.remote_listeners[key] = (ev.peer, ev.body["host_addr"], ev.body["host_port"])
        for fd_key, waiting in list(self.waiting.items()):  # clients that connected early
            if (waiting.conn.server_addr, waiting.conn.server_port) == key:
                del self.waiting[fd_key]
                self._emit(CancelTimer(("waiting", waiting.pid, waiting.fd, waiting.inode)))
                self._start_client(waiting, ev.peer, ev.body["host_addr"], ev.body["host_port"])

    def _msg_listener_remove(self, ev: PeerMessage) -> None:
        key = (ev.body["overlay_addr"], ev.body["overlay_port"])
        entry = self.remote_listeners.get(key)
        if entry is None or entry[0] != ev.peer:
            self.stats["foreign_listener_rejected"] += 1
            return
        del self.remote_listeners[key]

    def _msg_bind(self, ev: PeerMessage, conn: Conn) -> None:
        self._unexpected(ev, conn)  # binds travel on host connections only

    def _msg_conn_closed(self, ev: PeerMessage, conn: Conn) -> None:
        self.stats["closed_by_peer"] += 1
        if conn.state is State.SWAPPED:
            return  # the swapped connection lives on in the applications
        self._abort(conn, "peer closed", retry=False, notify=False)

    # -- the swap: client side (coordinator) ------------------------------------------------

    def _on_HostConnected(self, ev: HostConnected) -> None:
        conn = self._result_conn(ev.ref)
        if conn is None:
            self._emit(CloseSocket(ev.sock))
            return
        conn.host_sock, conn.host_inode = ev.sock, ev.inode
        if conn.pending_abort:
            self._resolve_pending(conn)
            return
        conn.state = State.IDLE
        self._next_attempt(conn)

    def _next_attempt(self, conn: Conn) -> None:
        if (conn.attempt - conn.waits >= self.config.max_attempts
                or conn.waits >= self.config.max_waits):
            self.stats["gave_up"] += 1
            self._send(conn, "swap_abort", attempt=conn.attempt, reason="gave up", final=True)
            conn.told_final = True
            self._finish(conn, notify=False)
            return
        if self._pid_full(conn.pid):  # enough swaps hold this process: queue up
            self.stats["pid_busy"] += 1
            conn.attempt += 1
            conn.waits += 1
            waiters = self.pid_waiters.setdefault(conn.pid, collections.deque())
            if conn.cid not in waiters:
                waiters.append(conn.cid)
            self._timer(conn, self.config.backoff_max)  # woken sooner when the process is free
            return
        if self._rate_limited(conn.pid) and not self._held_frozen(conn.pid):
            # frozen often enough lately: let it run a while (unless it is stopped anyway)
            conn.attempt += 1
            conn.waits += 1
            self._timer(conn, self.config.rate_wait)
            return
        if self.shared(conn):  # just forked: wait until one process holds the socket
            self.stats["socket_shared"] += 1
            conn.attempt += 1
            conn.waits += 1
            self._timer(conn, self.config.rate_wait)
            return
        conn.attempt += 1
        # after a "wait" the server goes first: if it still is not ready, nothing froze
        conn.first = (Role.SERVER if conn.peer_waiting or not conn.attempt % 2 else Role.CLIENT)
        conn.peer_waiting = False
        conn.prepared, conn.checks = False, 0
        self._new_attempt(conn)
        assert conn.pid is not None
        self._hold_pid(conn.pid, conn.cid)
        self.stats["attempts"] += 1
        if conn.first is Role.CLIENT:
            self._freeze(conn)
        else:
            self._prepare(conn, "freeze", State.AWAIT_FROZEN)

    def _new_attempt(self, conn: Conn) -> None:
        conn.recv_len = conn.peer_len = 0
        conn.peer_replaced = False

    def _rate_limited(self, pid: int | None) -> bool:
        if pid is None or self.freezes[pid] < self.config.max_freezes_per_second:
            return False
        self.stats["freeze_rate_limited"] += 1
        return True

    def _backoff(self, conn: Conn) -> float:
        if conn.peer_waiting:  # the server is not ready: ask again soon, a little slower
            return min(self.config.backoff_max,
                       self.config.backoff_base * (1 + min(conn.waits, 3)))
        tries = min(conn.attempt - conn.waits, 16)
        return min(self.config.backoff_max, self.config.backoff_base * 2 ** max(0, tries))

    def _prepare(self, conn: Conn, stage: str, state: State) -> None:
        conn.prepared = True
        conn.state = state
        self._send(conn, "swap_prepare", attempt=conn.attempt, stage=stage,
                   migrate_len=conn.recv_len if stage == "migrate" else 0, **conn.tuple.to_body())
        if state is not State.MIGRATING:
            self._timer(conn, self.config.message_timeout)

    def _freeze(self, conn: Conn) -> None:
        assert conn.pid is not None
        new_stop = not self._held_frozen(conn.pid)  # else it shares a stop already there
        conn.state = State.FREEZING
        conn.outstanding = self._ref("conn", conn.cid)
        self._emit(Freeze(conn.outstanding, conn.pid))
        if new_stop:
            self.freezes[conn.pid] += 1  # one second later the window forgets this freeze
            self._emit(StartTimer(("rate", conn.pid), 1.0))

    def _check(self, conn: Conn) -> None:
        assert conn.pid is not None and conn.fd is not None and conn.overlay_sock is not None
        conn.state = State.CHECKING
        conn.outstanding = self._ref("conn", conn.cid)
        self._emit(CheckQueues(conn.outstanding, conn.pid, conn.fd, conn.overlay_sock))

    def _migrate(self, conn: Conn) -> None:
        """Bounce both sides' unread bytes over the host connection (nothing to do: go on)."""
        conn.state = State.MIGRATING
        if not conn.recv_len and not conn.peer_len:
            self._migrated(conn)
            return
        assert conn.overlay_sock is not None and conn.host_sock is not None
        conn.bounced = True
        conn.outstanding = self._ref("conn", conn.cid)
        self.stats["bounces"] += 1
        self._emit(Bounce(conn.outstanding, conn.overlay_sock, conn.host_sock, conn.recv_len,
                          conn.peer_len))

    def _migrated(self, conn: Conn) -> None:
        assert conn.host_sock is not None and conn.inode is not None
        if conn.role is Role.SERVER or conn.peer_replaced:
            self._replace(conn, conn.host_sock, conn.inode, State.REPLACING)
            return
        conn.state = State.AWAIT_REPLACED
        self._timer(conn, self.config.message_timeout)

    def _on_BounceDone(self, ev: BounceDone) -> None:
        conn = self._result_conn(ev.ref)
        if conn is None:
            return
        if (conn.role is Role.CLIENT and conn.pending_abort
                and conn.pending_abort[0] == "peer lost"):
            conn.pending_abort = None  # the server may have replaced: ask the data path
            self._probe(conn)
            return
        if conn.pending_abort:
            self._resolve_pending(conn)
            return
        self._migrated(conn)

    def _replace(self, conn: Conn, sock: SockRef, expected: int, state: State) -> None:
        assert conn.pid is not None and conn.fd is not None
        conn.state = state
        conn.outstanding = self._ref("conn", conn.cid)
        self._emit(ReplaceFd(conn.outstanding, conn.pid, conn.fd, sock, expected))

    def _result_conn(self, ref: int) -> Conn | None:
        entry = self._take_ref(ref)
        if entry is None:
            return None
        conn = self.conns.get(entry[1])
        if conn is None or conn.outstanding != ref:
            self.stats["stale_result"] += 1
            return None
        conn.outstanding = None
        return conn

    def _on_FreezeDone(self, ev: FreezeDone) -> None:
        entry = self._refs.get(ev.ref)
        conn = self._result_conn(ev.ref)
        if conn is None:
            if entry is not None and entry[0] == "pid":  # freeze of a forgotten connection
                self._release_pid(*entry[1])
                self._emit(Thaw(entry[1][0]))
            return
        conn.frozen = True
        if conn.pending_abort:
            self._resolve_pending(conn)
            return
        self._check(conn)

    def _on_QueuesChecked(self, ev: QueuesChecked) -> None:
        conn = self._result_conn(ev.ref)
        if conn is None:
            return
        if conn.pending_abort:
            self._resolve_pending(conn)
            return
        unread_ok = self.config.migrate and ev.recv_queue <= self.config.max_migrate
        if ev.send_queue or (ev.recv_queue and not unread_ok):
            self.stats["busy"] += 1
            self._abort(conn, f"busy (send {ev.send_queue}, recv {ev.recv_queue})",
                        retry=True, notify=True)
            return
        if conn.role is Role.SERVER:
            self._server_checked(conn, ev.recv_queue)
            return
        conn.checks += 1
        if not conn.prepared or (conn.first is Role.SERVER and conn.checks == 1):
            self._prepare(conn, "check", State.AWAIT_CHECKED)
        else:  # the final check: our unread bytes are final, and so are the server's
            conn.recv_len = ev.recv_queue
            self._prepare(conn, "migrate", State.MIGRATING)
            self._migrate(conn)

    def _msg_swap_ready(self, ev: PeerMessage, conn: Conn) -> None:
        if conn.role is not Role.CLIENT or ev.body["attempt"] != conn.attempt:
            self._unexpected(ev, conn)
            return
        stage = ev.body["stage"]
        if stage == "frozen" and conn.state is State.AWAIT_FROZEN:
            self._freeze(conn)
        elif stage == "checked" and conn.state is State.AWAIT_CHECKED:
            conn.peer_len = ev.body["migrate_len"]
            self._check(conn)
        elif stage == "replaced" and conn.state is State.AWAIT_REPLACED:
            assert conn.host_sock is not None and conn.inode is not None
            self._replace(conn, conn.host_sock, conn.inode, State.REPLACING)
        elif (stage == "replaced" and conn.state is State.MIGRATING and not conn.peer_replaced
              and conn.outstanding is not None):
            conn.peer_replaced = True  # acted on when our bounce is done
        else:
            self._unexpected(ev, conn)

    def _on_ReplaceDone(self, ev: ReplaceDone) -> None:
        conn = self._result_conn(ev.ref)
        if conn is None:
            return
        if conn.state is State.ROLLING_BACK:
            conn.replaced = False
            self._abort_done(conn)
            return
        conn.replaced = True
        if conn.role is Role.CLIENT:
            # the commit point: from here on the connection is swapped, whatever happens
            pending, conn.pending_abort = conn.pending_abort, None
            self._send(conn, "swap_commit", attempt=conn.attempt)
            self._complete(conn)
            if pending and pending[0] in ("closed", "exited"):
                self._finish(conn, notify=False)
            return
        if conn.pending_abort:
            self._resolve_pending(conn)
            return
        conn.state = State.AWAIT_COMMIT
        self._send(conn, "swap_ready", attempt=conn.attempt, stage="replaced", migrate_len=0)
        self._timer(conn, self.config.message_timeout)

    def _complete(self, conn: Conn) -> None:
        """Both sides have the host socket: thaw and drop our copies (the overlay one last)."""
        assert conn.pid is not None
        conn.state = State.SWAPPED
        self._thaw(conn)
        if conn.overlay_sock is not None:
            self._emit(CloseSocket(conn.overlay_sock))
        if conn.host_sock is not None:
            self._emit(CloseSocket(conn.host_sock))
        conn.overlay_sock = conn.host_sock = None
        conn.inode = conn.host_inode
        self.stats["swapped"] += 1
        self._emit(NoteSwapped(conn.cid, conn.role.value, conn.pid, conn.fd or -1,
                               str(conn.tuple)))

    def _msg_swap_done(self, ev: PeerMessage, conn: Conn) -> None:
        if conn.role is not Role.CLIENT or conn.state is not State.SWAPPED:
            self._unexpected(ev, conn)
            return
        self.stats["swap_done_received"] += 1

    def _msg_swap_abort(self, ev: PeerMessage, conn: Conn) -> None:
        if ev.body["attempt"] != conn.attempt or conn.state in (State.SWAPPED, State.IDLE):
            if ev.body["final"] and conn.state is State.IDLE:
                self._abort(conn, "peer gave up", retry=False, notify=False)
                return
            self._unexpected(ev, conn)
            return
        self.stats["aborted_by_peer"] += 1
        if ev.body["reason"] in WAIT_REASONS:
            conn.waits += 1
            conn.peer_waiting = True
        self._abort(conn, "peer: " + ev.body["reason"], retry=not ev.body["final"], notify=False)

    # -- the swap: server side --------------------------------------------------------------

    def _msg_swap_prepare(self, ev: PeerMessage, conn: Conn) -> None:
        body = ev.body
        if conn.role is not Role.SERVER or FourTuple.from_body(body) != conn.tuple:
            self._unexpected(ev, conn)
            return
        stage, attempt = body["stage"], body["attempt"]
        if stage == "check" and conn.state is State.AWAIT_CHECK and attempt == conn.attempt:
            self._check(conn)
            return
        if stage == "migrate" and conn.state is State.AWAIT_MIGRATE and attempt == conn.attempt:
            conn.peer_len = body["migrate_len"]
            self._migrate(conn)
            return
        if conn.state is not State.IDLE or attempt <= conn.attempt or stage == "migrate":
            self._unexpected(ev, conn)
            return
        conn.attempt = attempt
        conn.first = Role.SERVER if stage == "freeze" else Role.CLIENT
        self._new_attempt(conn)
        if not conn.matched:
            self.stats["prepare_not_ready"] += 1
            self._send(conn, "swap_abort", attempt=attempt, reason=NOT_READY, final=False)
            return
        assert conn.pid is not None
        if not self.allow(Role.SERVER, conn.pid, conn.tuple):
            self.stats["accept_ruled_out"] += 1
            self._send(conn, "swap_abort", attempt=attempt, reason="ruled out", final=True)
            self._finish(conn, notify=False)
            return
        if self._pid_full(conn.pid) or (self._rate_limited(conn.pid)
                                        and not self._held_frozen(conn.pid)):
            self.stats["pid_busy"] += 1
            self._send(conn, "swap_abort", attempt=attempt, reason=PROCESS_BUSY, final=False)
            return
        if self.shared(conn):
            self.stats["socket_shared"] += 1
            self._send(conn, "swap_abort", attempt=attempt, reason=SHARED, final=False)
            return
        if not self.server_ready(conn):
            self.stats["app_not_read"] += 1
            self._send(conn, "swap_abort", attempt=attempt, reason=APP_UNREAD, final=False)
            return
        self._hold_pid(conn.pid, conn.cid)
        conn.checks = 0
        self._freeze(conn)

    def _server_checked(self, conn: Conn, recv_queue: int) -> None:
        conn.checks += 1
        if conn.first is Role.SERVER and conn.checks == 1:
            conn.state = State.AWAIT_CHECK
            self._send(conn, "swap_ready", attempt=conn.attempt, stage="frozen", migrate_len=0)
        else:  # the final check: the client's check and the bounce come next
            conn.recv_len = recv_queue
            conn.state = State.AWAIT_MIGRATE
            self._send(conn, "swap_ready", attempt=conn.attempt, stage="checked",
                       migrate_len=recv_queue)
        self._timer(conn, self.config.message_timeout)

    def _msg_swap_commit(self, ev: PeerMessage, conn: Conn) -> None:
        if (conn.role is not Role.SERVER or ev.body["attempt"] != conn.attempt
                or conn.state not in (State.AWAIT_COMMIT, State.PROBING)):
            self._unexpected(ev, conn)
            return
        self._server_commit(conn)

    def _server_commit(self, conn: Conn) -> None:
        if conn.outstanding is not None:  # an orphaned probe result will be ignored
            self._refs.pop(conn.outstanding, None)
            conn.outstanding = None
        conn.pending_abort = None
        self._complete(conn)
        self._send(conn, "swap_done", attempt=conn.attempt)
        if conn.close_after:
            self._finish(conn, notify=False)

    def _on_ConnProbed(self, ev: ConnProbed) -> None:
        conn = self._result_conn(ev.ref)
        if conn is None:
            return
        if conn.role is Role.CLIENT:
            if conn.pending_abort and conn.pending_abort[0] in ("closed", "exited"):
                self._resolve_pending(conn)
            elif ev.overlay_closed and not ev.host_closed:
                # the server replaced and its daemon is gone: only going forward is consistent
                self.stats["probe_forward"] += 1
                assert conn.host_sock is not None and conn.inode is not None
                conn.pending_abort = ("peer lost", False, False)
                self._replace(conn, conn.host_sock, conn.inode, State.REPLACING)
            else:
                self._abort(conn, "peer lost", retry=False, notify=False)
            return
        if conn.pending_abort:
            self._resolve_pending(conn)
        elif ev.host_closed:  # the client gave up: put the overlay socket back
            self.stats["probe_rollback"] += 1
            self._rollback(conn)
        elif ev.overlay_closed:  # the client committed and dropped the overlay
            self.stats["probe_commit"] += 1
            self._server_commit(conn)
        else:
            self._probe_later(conn)

    def _probe_later(self, conn: Conn) -> None:
        conn.state = State.PROBING
        if conn.probes >= self.config.probe_limit:
            self.stats["probe_gave_up"] += 1
            self._rollback(conn)
            return
        self._timer(conn, self.config.probe_interval)

    def _probe(self, conn: Conn) -> None:
        assert conn.overlay_sock is not None and conn.host_sock is not None
        conn.state = State.PROBING
        conn.probes += 1
        conn.outstanding = self._ref("conn", conn.cid)
        self._emit(ProbeConn(conn.outstanding, conn.overlay_sock, conn.host_sock))

    def _rollback(self, conn: Conn) -> None:
        assert conn.overlay_sock is not None and conn.host_inode is not None
        conn.pending_abort = conn.pending_abort or ("rolled back", False, False)
        self._replace(conn, conn.overlay_sock, conn.host_inode, State.ROLLING_BACK)

    # -- timers, failures, peer loss ----------------------------------------------------------

    def _on_TimerFired(self, ev: TimerFired) -> None:
        key = ev.key
        if len(key) == 4 and key[0] in ("waiting", "accept"):
            self._unmatched_expired(key)
            return
        if len(key) == 4 and key[0] == "young":
            self._grown_up(key[1], key[2], key[3])
            return
        if len(key) == 2 and key[0] == "bind":
            self._bind_expired(key[1])
            return
        if len(key) == 2 and key[0] == "rate":
            self.freezes[key[1]] -= 1
            if self.freezes[key[1]] <= 0:
                del self.freezes[key[1]]
            return
        if len(key) != 3 or key[0] != "conn":
            self.stats["stale_timer"] += 1
            return
        conn = self.conns.get(key[1])
        if conn is None or key[2] != conn.timer or conn.outstanding is not None:
            self.stats["stale_timer"] += 1
            return
        if conn.state is State.IDLE and conn.role is Role.CLIENT:
            self._next_attempt(conn)
        elif conn.state in (State.AWAIT_FROZEN, State.AWAIT_CHECKED, State.AWAIT_REPLACED,
                            State.AWAIT_CHECK, State.AWAIT_MIGRATE):
            self.stats["timeouts"] += 1
            self._abort(conn, "timeout", retry=True, notify=True)
        elif conn.state in (State.AWAIT_COMMIT, State.PROBING):
            self.stats["commit_uncertain"] += 1
            self._probe(conn)
        else:
            self.stats["stale_timer"] += 1

    def _unmatched_expired(self, key: tuple[Any, ...]) -> None:
        """A traced connect never saw its listener announced, or an accept its bind: let go."""
        kind, pid, fd, inode = key
        if kind == "waiting":
            waiting = self.waiting.get((pid, fd))
            if waiting is not None and waiting.inode == inode:
                del self.waiting[(pid, fd)]
                self._let_go(waiting, None, "waiting_expired")
                return
        else:
            tup = self.accepts_by_fd.get((pid, fd))
            if tup is not None and self.accepts[tup].inode == inode:
                acc = self._pop_accept(tup)
                assert acc is not None
                self._let_go(acc, None, "accepts_expired")
                return
        self.stats["stale_timer"] += 1

    def _bind_expired(self, cid: bytes) -> None:
        """A bind never met its accept within `bind_wait`: close the host socket, forget it."""
        conn = self.conns.get(cid)
        if (conn is None or conn.role is not Role.SERVER or conn.matched
                or conn.state is not State.IDLE or conn.outstanding is not None):
            return  # matched (or gone) meanwhile: nothing to do
        self.stats["binds_expired"] += 1
        log.info("connection %s: no accept within %.1f s of its bind; dropped", conn.tuple,
                 self.config.bind_wait)
        self._finish(conn, notify=True)  # conn_closed: a client still waiting stops retrying

    def _on_ActionFailed(self, ev: ActionFailed) -> None:
        entry = self._refs.get(ev.ref)
        if entry is not None and entry[0] == "pid":
            self._take_ref(ev.ref)
            self._release_pid(*entry[1])
            return
        if entry is not None and entry[0] == "listener":
            self._take_ref(ev.ref)
            listener = self.listeners.get(entry[1])
            if listener is not None and listener.ref == ev.ref:
                del self.listeners[entry[1]]
                self.stats["host_listener_failed"] += 1
                log.warning("host listener for %s:%d: %s", listener.addr, listener.port, ev.reason)
            return
        conn = self._result_conn(ev.ref)
        if conn is None:
            return
        self.stats["action_failed"] += 1
        log.info("connection %s: %s failed: %s", conn.tuple, conn.state.value, ev.reason)
        if conn.state is State.ROLLING_BACK:
            self.stats["rollback_failed"] += 1  # nothing left to try: thaw, drop the connection
            log.error("connection %s: cannot put the overlay socket back: %s", conn.tuple,
                      ev.reason)
            self._thaw(conn)
            self._finish(conn, notify=True)
            return
        if conn.state is State.CONNECTING:
            self._finish(conn, notify=False)
            return
        if conn.state is State.PROBING:
            self._probe_later(conn)
            return
        pending, conn.pending_abort = conn.pending_abort, None
        if pending is None:  # a failed step: undo it, tell the peer, try again later
            self._abort(conn, ev.reason, retry=True, notify=True)
        else:  # an abort was already decided while the action ran: it wins
            self._abort(conn, pending[0], retry=pending[1], notify=pending[2])

    def _on_PeerLost(self, ev: PeerLost) -> None:
        for conn in [c for c in self.conns.values() if c.peer == ev.peer]:
            if conn.state is State.SWAPPED:
                continue
            if conn.role is Role.SERVER and conn.state in (State.AWAIT_COMMIT, State.PROBING):
                if conn.outstanding is None:
                    self._probe(conn)
                continue
            if conn.role is Role.CLIENT and conn.state is State.AWAIT_REPLACED:
                # the server may have replaced, and may be gone: ask the data path
                self._probe(conn)
                continue
            self._abort(conn, "peer lost", retry=False, notify=False)

    def _abort(self, conn: Conn, reason: str, retry: bool, notify: bool) -> None:
        """Abandon the current attempt: undo locally, tell the peer, maybe retry later."""
        retry = retry and not conn.bounced  # bounced bytes sit in the host connection
        if conn.outstanding is not None:
            if conn.pending_abort is None or not retry:
                conn.pending_abort = (reason, retry, notify)
            return
        conn.pending_abort = (reason, retry, notify)
        self._resolve_pending(conn)

    def _resolve_pending(self, conn: Conn) -> None:
        assert conn.pending_abort is not None and conn.outstanding is None
        reason, retry, notify = conn.pending_abort
        if conn.state is State.SWAPPED:
            conn.pending_abort = None
            return
        if conn.role is Role.SERVER and conn.replaced:
            if reason in ("exited",):
                conn.replaced = False  # the process is gone; nothing to put back
            else:
                if notify and conn.state is not State.ROLLING_BACK:
                    self._send(conn, "swap_abort", attempt=conn.attempt, reason=reason[:200],
                               final=not retry)
                    conn.told_final = not retry
                    conn.pending_abort = (reason, retry, False)
                self._rollback(conn)
                return
        if notify and (conn.role is Role.SERVER or conn.prepared):
            self._send(conn, "swap_abort", attempt=conn.attempt, reason=reason[:200],
                       final=not retry)
            conn.told_final = not retry
        self._abort_done(conn)

    def _abort_done(self, conn: Conn) -> None:
        reason, retry, _ = conn.pending_abort or ("aborted", True, False)
        conn.pending_abort = None
        self._thaw(conn)
        conn.probes = 0
        self.stats["attempts_aborted"] += 1
        log.info("connection %s: attempt %d aborted: %s", conn.tuple, conn.attempt, reason)
        if (not retry or conn.close_after or conn.state is State.CONNECTING
                or conn.host_sock is None):
            self._finish(conn, notify=reason in ("closed", "exited") or conn.bounced)
            return
        conn.state = State.IDLE
        if conn.role is Role.CLIENT:
            self._timer(conn, self._backoff(conn))

    def _thaw(self, conn: Conn) -> None:
        if conn.pid is not None and conn.cid in self.busy_pids.get(conn.pid, ()):
            self._release_pid(conn.pid, conn.cid)
        if conn.frozen:
            assert conn.pid is not None
            conn.frozen = False
            self._emit(Thaw(conn.pid))

    def _pid_full(self, pid: int | None) -> bool:
        return self.batch[pid or 0] >= self.config.max_swaps_per_process

    def _held_frozen(self, pid: int | None) -> bool:
        """Another swap holds `pid` frozen (or is freezing it): a new freeze adds no stop."""
        for cid in self.busy_pids.get(pid or 0, ()):
            conn = self.conns.get(cid)
            if conn is None or conn.frozen or conn.state is State.FREEZING:
                return True  # (an orphaned freeze, without a connection, counts too)
        return False

    def _hold_pid(self, pid: int, token: bytes) -> None:
        holders = self.busy_pids.setdefault(pid, set())
        if token not in holders:
            holders.add(token)
            self.batch[pid] += 1

    def _release_pid(self, pid: int, token: bytes) -> None:
        """A swap lets go of the process: wake a client connection queued for it."""
        holders = self.busy_pids.get(pid)
        if holders is not None:
            holders.discard(token)
            if not holders:  # free again: the next batch may start
                del self.busy_pids[pid]
                self.batch.pop(pid, None)
        waiters = self.pid_waiters.get(pid)
        while waiters:
            conn = self.conns.get(waiters.popleft())
            if (conn is not None and conn.state is State.IDLE and conn.role is Role.CLIENT
                    and conn.outstanding is None and conn.pid == pid):
                self._timer(conn, 0.0)
                break
        if not waiters:
            self.pid_waiters.pop(pid, None)

    def _finish(self, conn: Conn, notify: bool) -> None:
        """Forget a connection; close the daemon's sockets; it stays where it is."""
        orphan_freeze = None
        if conn.outstanding is not None:  # a result will arrive: undo a freeze if need be
            if conn.outstanding in self._refs and conn.state is State.FREEZING:
                self._refs[conn.outstanding] = ("pid", (conn.pid, b"orphan" + conn.cid))
                orphan_freeze = conn.pid
            else:
                self._refs.pop(conn.outstanding, None)
            conn.outstanding = None
        self._thaw(conn)
        if orphan_freeze is not None:
            # held until the late freeze result arrives
            self._hold_pid(orphan_freeze, b"orphan" + conn.cid)
        if (notify and not conn.told_final and conn.state is not State.SWAPPED
                and conn.host_sock is not None):
            self._send(conn, "conn_closed")
        for sock in (conn.overlay_sock, conn.host_sock):
            if sock is not None:
                self._emit(CloseSocket(sock))
        conn.overlay_sock = conn.host_sock = None
        self.conns.pop(conn.cid, None)
        if self.unbound.get(conn.tuple) == conn.cid:
            del self.unbound[conn.tuple]
            self._emit(CancelTimer(("bind", conn.cid)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %s %s: %s -> forgotten", conn.cid.hex()[:8], conn.tuple,
                      conn.state.value)
        if conn.pid is not None and self.by_fd.get((conn.pid, conn.fd or -1)) == conn.cid:
            del self.by_fd[(conn.pid, conn.fd or -1)]
        if conn.state is not State.SWAPPED:
            # a bind whose accept never came is no traced connection of ours
            self.stats["left_on_overlay" if conn.role is Role.CLIENT or conn.matched
                       else "binds_dropped"] += 1
