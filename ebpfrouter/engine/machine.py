"""The router's sans-I/O core, behind a thin front: events in (`Engine.handle`), actions out.

No sockets, syscalls or clocks inside. The parts, each a small machine of its own:

    listeners.ListenerBook   our overlay listeners (host listener, announcement) and the peers'
    admission.Admission      age, rules, listener waits; pairing binds with accepts
    gate.ProcessGate         per process: who holds it frozen, batches, the freeze-rate cap
    swap.SwapProtocol        the two-phase swap per connection: transition tables per role
                             (swap.py), over the shared steps (steps.py)

`Engine.handle` looks the event's type up in one table and hands it to the part that owns it;
per-connection events become `Trigger`s fired through the swap tables. Peers name connections
only by connection id and overlay 4-tuple; a message can only advance a connection this daemon
traced itself and bound to that same peer. Anything else is counted and ignored.

Timing assumption: the server's last probe (`probe_limit * probe_interval`) comes well after
the client's message timeouts, so the client has decided by then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .actions import Action, CloseSocket, Resume, Thaw
from .admission import Admission
from .conn import Conn, Listener, Role, State
from .core import Core, EngineConfig, Policy
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
    ShortLived,
    SockRef,
    StopUnclaimed,
    TimerFired,
)
from .gate import ProcessGate
from .keys import (
    AcceptTimer,
    AgeTimer,
    BindTimer,
    ConnTimer,
    EagerTimer,
    ListenerOpening,
    OrphanFreeze,
    RateTimer,
    WaitingTimer,
    WaitReason,
    YoungTimer,
)
from .listeners import ListenerBook
from .swap import SwapProtocol
from .transitions import Trigger

__all__ = ["Conn", "Engine", "EngineConfig", "Listener", "Role", "State", "WAIT_REASONS"]

log = logging.getLogger(__name__)

WAIT_REASONS = tuple(w.value for w in WaitReason)  # server-side: do not use up an attempt
NOT_READY, PROCESS_BUSY, APP_UNREAD, SHARED, NOT_STOPPED = WAIT_REASONS

_RESULTS: dict[type[Event], Trigger] = {
    HostConnected: Trigger.HOST_CONNECTED, FreezeDone: Trigger.FROZEN,
    QueuesChecked: Trigger.CHECKED, BounceDone: Trigger.BOUNCED,
    ReplaceDone: Trigger.REPLACED, ConnProbed: Trigger.PROBED,
}
_MESSAGES: dict[tuple[str, str | None], Trigger] = {
    ("swap_prepare", "freeze"): Trigger.PREPARE_FREEZE,
    ("swap_prepare", "check"): Trigger.PREPARE_CHECK,
    ("swap_prepare", "migrate"): Trigger.PREPARE_MIGRATE,
    ("swap_ready", "frozen"): Trigger.READY_FROZEN,
    ("swap_ready", "checked"): Trigger.READY_CHECKED,
    ("swap_ready", "replaced"): Trigger.READY_REPLACED,
    ("swap_commit", None): Trigger.COMMIT, ("swap_done", None): Trigger.DONE,
    ("swap_abort", None): Trigger.ABORT, ("conn_closed", None): Trigger.CONN_CLOSED,
    ("bind", None): Trigger.BIND,
}


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
        listener_mode: Callable[[str, int], str | None] | None = None,
    ) -> None:
        """`peer_of(overlay_ip)` names the node owning an overlay address (None: not overlay);
        `allow(role, pid, conn)` applies the rules; `new_cid` makes 16-byte connection ids;
        `server_ready(conn)` says whether an accepted connection may be swapped now (the
        daemon's policy: its app has read from it once, so an app that checks `getpeername()`
        after its first message has done so on the overlay); False makes the client wait.
        `shared(conn)` says whether more than one process holds the connection's socket now
        (just after a fork): replacing one fd would leave the other process on the overlay
        socket, so such a connection waits (both sides) until one holder is left.
        `listener_mode(addr, port)` is a rule's `swap=` for our listener ("eager", "late",
        None: learn it)."""
        policy = Policy(peer_of)
        for name, fn in (("allow", allow), ("new_cid", new_cid),
                         ("server_ready", server_ready), ("shared", shared),
                         ("listener_mode", listener_mode)):
            if fn is not None:
                setattr(policy, name, fn)
        self.core = Core(config, policy)
        self.config, self.node, self.stats = config, config.node, self.core.stats
        self.gate = ProcessGate(config)
        self.swap = SwapProtocol(self.core, self.gate)
        self.book = ListenerBook(self.core)
        self.admission = Admission(self.core, self.book, self.swap, self._forget_fd)
        self.core.lifetime = lambda tup, long: self.book.outcome(
            (tup.server_addr, tup.server_port), long)
        self._handlers: dict[type[Event], Callable[[Any], None]] = {
            ListenTraced: self.book.traced, HostListenerOpened: self.book.opened,
            PeerUp: lambda ev: self.book.announce_to(ev.peer),
            ConnectTraced: self.admission.connect_traced,
            AcceptTraced: self.admission.accept_traced,
            HostAccepted: self.admission.host_accepted,
            CloseTraced: self._closed, ProcessExited: self._exited, FdMoved: self._moved,
            StopUnclaimed: self._stop_unclaimed, ShortLived: self.book.short_lived,
            HostConnected: self._result, FreezeDone: self._freeze_done,
            QueuesChecked: self._result, BounceDone: self._result, ReplaceDone: self._result,
            ConnProbed: self._result, ActionFailed: self._failed, TimerFired: self._timer,
            HostClosed: self._host_closed, PeerLost: self._peer_lost,
            PeerMessage: self._message,
        }
        self._timers: dict[type, Callable[[Any], None]] = {
            YoungTimer: self.admission.grown_up, WaitingTimer: self.admission.unmatched_expired,
            AcceptTimer: self.admission.unmatched_expired,
            BindTimer: self.admission.bind_expired, RateTimer: self.gate.rate_expired,
            EagerTimer: self.admission.eager_expired, AgeTimer: self._aged,
            ConnTimer: self._conn_timer,
        }

    # -- the front -----------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        """Process one event; return the actions it causes, in order."""
        self.core.out = []
        handler = self._handlers.get(type(event))
        if handler is None:
            self.stats["unknown_event"] += 1
        else:
            handler(event)
        out, self.core.out = self.core.out, []
        return out

    def _result(self, ev: Any) -> None:
        conn = self.core.result_conn(ev.ref)
        if conn is None:
            if isinstance(ev, HostConnected):
                self.core.emit(CloseSocket(ev.sock))
            return
        self.swap.fire(conn, _RESULTS[type(ev)], ev)

    def _freeze_done(self, ev: FreezeDone) -> None:
        subject = self.core.refs.get(ev.ref)
        conn = self.core.result_conn(ev.ref)
        if conn is None:
            if isinstance(subject, OrphanFreeze):  # freeze of a forgotten connection
                self.swap.release_pid(subject.pid, subject)
                self.core.emit(Thaw(subject.pid))
            return
        self.swap.fire(conn, Trigger.FROZEN, ev)

    def _failed(self, ev: ActionFailed) -> None:
        subject = self.core.refs.get(ev.ref)
        if isinstance(subject, OrphanFreeze):
            self.core.take_ref(ev.ref)
            self.swap.release_pid(subject.pid, subject)
            return
        if isinstance(subject, ListenerOpening):
            self.core.take_ref(ev.ref)
            self.book.open_failed(subject, ev.ref, ev.reason)
            return
        conn = self.core.result_conn(ev.ref)
        if conn is None:
            return
        self.stats["action_failed"] += 1
        log.info("connection %s: %s failed: %s", conn.tuple, conn.state.value, ev.reason)
        if conn.state is State.ROLLING_BACK:
            log.error("connection %s: cannot put the overlay socket back: %s", conn.tuple,
                      ev.reason)
        self.swap.fire(conn, Trigger.FAILED, ev)

    def _timer(self, ev: TimerFired) -> None:
        handler = self._timers.get(type(ev.key))
        if handler is None:
            self.stats["stale_timer"] += 1
            return
        handler(ev.key)

    def _conn_timer(self, key: ConnTimer) -> None:
        conn = self.core.conns.get(key.cid)
        if conn is None or key.n != conn.timer or conn.outstanding is not None:
            self.stats["stale_timer"] += 1
            return
        self.swap.fire(conn, Trigger.TIMER)

    def _message(self, ev: PeerMessage) -> None:
        body = ev.body
        if ev.type == "hello":
            self.stats["hellos"] += 1
        elif ev.type == "error":
            self.stats["peer_errors"] += 1
            log.warning("peer %s reports %s: %s", ev.peer, body["code"], body["detail"])
        elif ev.type == "listener_add":
            key = self.book.announced(ev.peer, body)
            if key is not None:
                self.admission.listener_announced(key, ev.peer)
        elif ev.type == "listener_remove":
            self.book.withdrawn(ev.peer, body)
        elif (trigger := _MESSAGES.get((ev.type, body.get("stage")))
              or _MESSAGES.get((ev.type, None))) is not None:
            conn = self.core.conns.get(body["cid"])
            if conn is None or conn.peer != ev.peer:
                self.stats["message_unknown_connection"] += 1
                return
            self.swap.fire(conn, trigger, ev.message)
        else:
            self.stats["unexpected_message"] += 1

    # -- the app and the channels ----------------------------------------------------------------

    def _host_closed(self, ev: HostClosed) -> None:
        conn = next((c for c in self.core.conns.values() if c.host_sock == ev.sock), None)
        if conn is not None:
            self.swap.fire(conn, Trigger.HOST_CLOSED)

    def _peer_lost(self, ev: PeerLost) -> None:
        self.book.peer_lost(ev.peer)
        for conn in [c for c in self.core.conns.values() if c.peer == ev.peer]:
            self.swap.fire(conn, Trigger.PEER_LOST)

    def _aged(self, key: AgeTimer) -> None:
        conn = self.core.conns.get(key.cid)
        if conn is not None and conn.aging:
            conn.aging = False
            self.core.lifetime(conn.tuple, True)

    def rules_changed(self) -> list[Action]:
        """The rules were reloaded: re-decide each listener's swap mode; the actions."""
        self.core.out = []
        self.book.refresh_modes()
        out, self.core.out = self.core.out, []
        return out

    def _stop_unclaimed(self, ev: StopUnclaimed) -> None:
        if not self.gate.stopped(ev.pid):
            self.stats["eager_unclaimed"] += 1
            self.core.emit(Resume(ev.pid))

    def _closed(self, ev: CloseTraced) -> None:
        self.admission.drop_unstarted(ev.pid, ev.fd)
        self.book.closed(ev.pid, ev.fd)
        self._forget_fd(ev.pid, ev.fd)

    def _exited(self, ev: ProcessExited) -> None:
        self.gate.exited(ev.pid)
        self.book.exited(ev.pid)
        for pid, fd in self.admission.unstarted_fds(ev.pid):
            self.admission.drop_unstarted(pid, fd)
        for pid, fd in [k for k in self.core.by_fd if k[0] == ev.pid]:
            self._forget_fd(pid, fd, exited=True)

    def _forget_fd(self, pid: int, fd: int, exited: bool = False) -> None:
        conn = self.core.conn_at(pid, fd)
        if conn is not None:
            self.swap.fire(conn, Trigger.APP_EXITED if exited else Trigger.APP_CLOSED, exited)

    def _moved(self, ev: FdMoved) -> None:
        """Carry whatever the engine knows under (pid, fd) over to (new_pid, new_fd)."""
        old, new = (ev.pid, ev.fd), (ev.new_pid, ev.new_fd)
        moved = self.admission.moved(old, new)
        moved = self.book.moved(old, new) or moved
        conn = self.core.conn_at(*old)
        if conn is not None:
            if conn.state in (State.IDLE, State.CONNECTING, State.SWAPPED):
                del self.core.by_fd[old]
                conn.pid, conn.fd = new
                self.core.by_fd[new] = conn.cid
                moved = True
            else:  # mid-swap (the old holder was not frozen yet): this attempt is void
                self.stats["moved_during_swap"] += 1
                self._forget_fd(*old)
        if moved:
            self.stats["fd_moved"] += 1

    # -- what the engine holds (read-only, for the runners and status) -------------------------

    @property
    def conns(self) -> dict[bytes, Conn]:
        """Connections by id."""
        return self.core.conns

    @property
    def by_fd(self) -> dict[tuple[int, int], bytes]:
        """Connection ids by holder (pid, fd)."""
        return self.core.by_fd

    @property
    def unbound(self) -> dict[FourTuple, bytes]:
        """Server: binds still waiting for their accept."""
        return self.core.unbound

    @property
    def young(self) -> Any:
        """Client: traced connects younger than `min_age`."""
        return self.admission.young

    @property
    def waiting(self) -> Any:
        """Client: traced connects waiting for their listener's announcement."""
        return self.admission.waiting

    @property
    def accepts(self) -> dict[FourTuple, AcceptTraced]:
        """Server: traced accepts waiting for their bind."""
        return self.admission.accepts

    @property
    def accepts_by_fd(self) -> dict[tuple[int, int], FourTuple]:
        """Index of `accepts` by holder."""
        return self.admission.accepts_by_fd

    @property
    def listeners(self) -> dict[tuple[int, int], Listener]:
        """Our overlay listeners by holder."""
        return self.book.local

    @property
    def remote_listeners(self) -> dict[tuple[str, int], tuple[str, str, int]]:
        """Peers' announced listeners: overlay (addr, port) -> (peer, host addr, host port)."""
        return self.book.remote

    @property
    def busy_pids(self) -> dict[int, Any]:
        """Processes held by swaps now."""
        return self.gate.busy

    @property
    def freezes(self) -> Any:
        """Freezes per process in the last second."""
        return self.gate.freezes

    @property
    def pid_waiters(self) -> Any:
        """Client connections queued per process."""
        return self.gate.waiters

    def holds_traced(self, pid: int, fd: int, sock: SockRef) -> bool:
        """Whether the engine kept `sock`, the copy that came with a traced connect/accept."""
        return self.admission.holds_traced(pid, fd, sock)

    def swaps_in_flight(self) -> bool:
        """A swap holds a process or waits for a step (shutdown waits for these to settle)."""
        return bool(self.gate.busy) or any(
            c.outstanding is not None or c.state not in (State.IDLE, State.SWAPPED,
                                                         State.CONNECTING)
            for c in self.core.conns.values())

    def overlay_sock_of(self, pid: int, fd: int) -> SockRef | None:
        """The daemon's copy of the overlay socket the engine tracks at `pid`/`fd`."""
        conn = self.core.conn_at(pid, fd)
        return conn.overlay_sock if conn is not None else None

    def tracks_fd(self, pid: int, fd: int) -> bool:
        """Whether a connection is known at `pid`/`fd`."""
        return (pid, fd) in self.core.by_fd

    def awaiting_accept(self, cid: bytes) -> bool:
        """A bind `cid` came and its accept has not been traced yet."""
        conn = self.core.conns.get(cid)
        return conn is not None and conn.role is Role.SERVER and not conn.matched

    def listener_pids(self, host_listener: SockRef) -> set[int]:
        """The processes holding the overlay listener behind host listener `host_listener`."""
        return self.book.pids_of(host_listener)

    def held_socks(self) -> set[SockRef]:
        """Every socket handle the engine holds (the daemon may close the rest)."""
        refs = {r for c in self.core.conns.values() for r in (c.overlay_sock, c.host_sock)
                if r is not None}
        refs.update(lst.sock for lst in self.book.local.values() if lst.sock is not None)
        return refs | self.admission.held_socks()

    def connections(self) -> list[dict[str, Any]]:
        """One line per connection, for `status`."""
        return [c.summary() for c in self.core.conns.values()]

    def listener_table(self) -> list[dict[str, Any]]:
        """One line per overlay listener and its host listener, for `status`."""
        return self.book.table()

    def summary(self) -> dict[str, Any]:
        """Counts for `ebpf-router status`."""
        states: dict[str, int] = {}
        for c in self.core.conns.values():
            states[c.state.value] = states.get(c.state.value, 0) + 1
        stats = self.stats
        return {
            "seen": stats["connects_traced"] + stats["accepts_traced"],
            "bypassed": stats["swapped"],
            "pending": sum(n for state, n in states.items() if state != State.SWAPPED.value),
            "failed": stats["left_on_overlay"],
            "short": stats["traced_short"],  # closed before anything was tried
            "skipped": stats["traced_skipped"],  # left alone by decision (see `let_go`)
            "listeners": len(self.book.local),
            "remote_listeners": len(self.book.remote),
            "connections": len(self.core.conns),
            "young": len(self.admission.young),
            "waiting_listener": len(self.admission.waiting),
            "waiting_bind": len(self.admission.accepts),
            "states": states,
            "frozen_pids": sorted(self.gate.busy),
            "stats": dict(stats),
        }
