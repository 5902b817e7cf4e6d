"""The steps of the two-phase swap that both roles share: freeze, check, bounce, replace,
commit, probe, roll back, abort, thaw and forget. `SwapProtocol` (swap.py) decides which step
comes next from its transition tables; these only do one step each."""

from __future__ import annotations

import logging

from .actions import (
    Bounce,
    CancelTimer,
    CheckQueues,
    CloseSocket,
    Freeze,
    NoteForgotten,
    NoteSwapped,
    ProbeConn,
    ReplaceFd,
    Resume,
    StartTimer,
    Thaw,
)
from .conn import Attempt, Conn, Role, State
from .core import Core
from .events import SockRef
from .gate import ProcessGate, StopToken, Token
from .keys import Abort, AgeTimer, BindTimer, OrphanFreeze, PendingAbort

log = logging.getLogger("ebpfrouter.engine.machine")


class SwapSteps:
    """One step each; `core` holds the connections, `gate` the processes."""

    def __init__(self, core: Core, gate: ProcessGate) -> None:
        self.core = core
        self.gate = gate
        self.config = core.config
        self.stats = core.stats

    # -- attempts ------------------------------------------------------------------------------

    def new_attempt(self, conn: Conn, first: Role) -> None:
        """A fresh attempt object: nothing of the last try carries over."""
        conn.now = Attempt(first=first)

    def backoff(self, conn: Conn) -> float:
        """How long the client waits before its next attempt."""
        if conn.peer_waiting:  # the server is not ready: ask again soon, a little slower
            return min(self.config.backoff_max,
                       self.config.backoff_base * (1 + min(conn.waits, 3)))
        tries = min(conn.attempt - conn.waits, 16)
        return min(self.config.backoff_max, self.config.backoff_base * 2.0 ** max(0, tries))

    def prepare(self, conn: Conn, stage: str, state: State) -> None:
        """Client: ask the server to do its part of `stage`."""
        conn.now.prepared = True
        conn.state = state
        self.core.send(conn, "swap_prepare", attempt=conn.attempt, stage=stage,
                       migrate_len=conn.now.recv_len if stage == "migrate" else 0,
                       **conn.tuple.to_body())
        if state is not State.MIGRATING:
            self.core.timer(conn, self.config.message_timeout)

    def freeze(self, conn: Conn) -> None:
        """Stop the app (a stop that is there already is shared: no new one is counted)."""
        assert conn.pid is not None
        new_stop = not self.held_frozen(conn.pid)
        conn.state = State.FREEZING
        self.core.emit(Freeze(self.core.step(conn), conn.pid))
        if new_stop:
            self.core.emit(StartTimer(self.gate.froze(conn.pid), 1.0))

    def check(self, conn: Conn) -> None:
        """Read the overlay socket's queues."""
        assert conn.pid is not None and conn.fd is not None and conn.overlay_sock is not None
        conn.state = State.CHECKING
        self.core.emit(CheckQueues(self.core.step(conn), conn.pid, conn.fd, conn.overlay_sock))

    def migrate(self, conn: Conn) -> None:
        """Bounce both sides' unread bytes over the host connection (nothing to do: go on)."""
        conn.state = State.MIGRATING
        if not conn.now.recv_len and not conn.now.peer_len:
            self.migrated(conn)
            return
        assert conn.overlay_sock is not None and conn.host_sock is not None
        conn.bounced = True
        self.stats["bounces"] += 1
        self.core.emit(Bounce(self.core.step(conn), conn.overlay_sock, conn.host_sock,
                              conn.now.recv_len, conn.now.peer_len))

    def migrated(self, conn: Conn) -> None:
        """Unread bytes carried (or none): the server replaces; the client once told to."""
        assert conn.host_sock is not None and conn.inode is not None
        if conn.role is Role.SERVER or conn.now.peer_replaced:
            self.replace(conn, conn.host_sock, conn.inode, State.REPLACING)
            return
        conn.state = State.AWAIT_REPLACED
        self.core.timer(conn, self.config.message_timeout)

    def replace(self, conn: Conn, sock: SockRef, expected: int, state: State) -> None:
        """Put `sock` at the app's fd (if it still holds `expected`)."""
        assert conn.pid is not None and conn.fd is not None
        conn.state = state
        tup = conn.tuple
        ours, theirs = (tup.client_addr, tup.client_port), (tup.server_addr, tup.server_port)
        if conn.role is Role.SERVER:
            ours, theirs = theirs, ours
        putting_back = sock == conn.overlay_sock
        self.core.emit(ReplaceFd(self.core.step(conn), conn.pid, conn.fd, sock, expected,
                                 cid=conn.cid, overlay_local=None if putting_back else ours,
                                 overlay_peer=None if putting_back else theirs))

    def complete(self, conn: Conn) -> None:
        """Both sides have the host socket: thaw and drop our copies (the overlay one last)."""
        assert conn.pid is not None
        conn.state = State.SWAPPED
        self.thaw(conn)
        if conn.overlay_sock is not None:
            self.core.emit(CloseSocket(conn.overlay_sock))
        if conn.host_sock is not None:
            self.core.emit(CloseSocket(conn.host_sock))
        conn.overlay_sock = conn.host_sock = None
        conn.inode = conn.host_inode
        conn.path = "eager" if conn.now.eager else "late"
        conn.eager = False
        if conn.path == "eager" and conn.role is Role.SERVER:  # learn how long it lives
            conn.aging = True
            self.core.emit(StartTimer(AgeTimer(conn.cid), self.config.min_age or 0.2))
        self.stats["swapped"] += 1
        self.stats[f"swapped_{conn.path}"] += 1
        self.core.emit(NoteSwapped(conn.cid, conn.role.value, conn.pid, conn.fd or -1,
                                   str(conn.tuple), conn.path))

    def server_commit(self, conn: Conn) -> None:
        """The client committed: complete, say done, forget if the app closed meanwhile."""
        if conn.outstanding is not None:  # an orphaned probe result will be ignored
            self.core.refs.pop(conn.outstanding, None)
            conn.outstanding = None
        conn.pending_abort = None
        self.complete(conn)
        self.core.send(conn, "swap_done", attempt=conn.attempt)
        if conn.close_after:
            self.finish(conn, notify=False)

    # -- uncertainty ---------------------------------------------------------------------------

    def probe(self, conn: Conn) -> None:
        """Ask the data path which way the other side went."""
        assert conn.overlay_sock is not None and conn.host_sock is not None
        conn.state = State.PROBING
        conn.now.probes += 1
        self.core.emit(ProbeConn(self.core.step(conn), conn.overlay_sock, conn.host_sock))

    def probe_later(self, conn: Conn) -> None:
        """Probe again after `probe_interval`, or roll back after `probe_limit` probes."""
        conn.state = State.PROBING
        if conn.now.probes >= self.config.probe_limit:
            self.stats["probe_gave_up"] += 1
            self.rollback(conn)
            return
        self.core.timer(conn, self.config.probe_interval)

    def rollback(self, conn: Conn) -> None:
        """Server: put the overlay socket back."""
        assert conn.overlay_sock is not None and conn.host_inode is not None
        conn.pending_abort = conn.pending_abort or PendingAbort(Abort.ROLLED_BACK, False, False)
        self.replace(conn, conn.overlay_sock, conn.host_inode, State.ROLLING_BACK)

    # -- giving up -----------------------------------------------------------------------------

    def abort(self, conn: Conn, reason: Abort, retry: bool, notify: bool,
              detail: str = "") -> None:
        """Abandon the current attempt: undo locally, tell the peer, maybe retry later."""
        retry = retry and not conn.bounced  # bounced bytes sit in the host connection
        pending = PendingAbort(reason, retry, notify, detail)
        if conn.outstanding is not None:
            if conn.pending_abort is None or not retry:
                conn.pending_abort = pending
            return
        conn.pending_abort = pending
        self.resolve_pending(conn)

    def resolve_pending(self, conn: Conn) -> None:
        """Carry out the abort decided while a step ran (its result is here now)."""
        pending = conn.pending_abort
        assert pending is not None and conn.outstanding is None
        if conn.state is State.SWAPPED:
            conn.pending_abort = None
            return
        if conn.role is Role.SERVER and conn.now.replaced:
            if pending.reason is Abort.EXITED:
                conn.now.replaced = False  # the process is gone; nothing to put back
            else:
                if pending.notify and conn.state is not State.ROLLING_BACK:
                    self.tell_abort(conn, pending)
                    conn.pending_abort = PendingAbort(pending.reason, pending.retry, False,
                                                      pending.detail)
                self.rollback(conn)
                return
        if pending.notify and (conn.role is Role.SERVER or conn.now.prepared):
            self.tell_abort(conn, pending)
        self.abort_done(conn)

    def tell_abort(self, conn: Conn, pending: PendingAbort) -> None:
        """`swap_abort` to the peer (final when this side will not retry)."""
        self.core.send(conn, "swap_abort", attempt=conn.attempt, reason=pending.text(),
                       final=not pending.retry)
        conn.told_final = not pending.retry

    def abort_done(self, conn: Conn) -> None:
        """The attempt is undone: thaw, then retry later or forget the connection."""
        pending = conn.pending_abort or PendingAbort(Abort.FAILED, True, False, "aborted")
        conn.pending_abort = None
        self.thaw(conn)
        conn.now.probes = 0
        self.stats["attempts_aborted"] += 1
        was_eager, conn.eager = conn.now.eager, False
        if was_eager:  # both apps run on the overlay now; the late swap may take it later
            self.stats["eager_fallback"] += 1
            self.stats[f"eager_fallback:{pending.text()[:60]}"] += 1
        log.info("connection %s: attempt %d aborted: %s", conn.tuple, conn.attempt,
                 pending.text())
        if (not pending.retry or conn.close_after or conn.state is State.CONNECTING
                or conn.host_sock is None):
            gone = pending.reason in (Abort.CLOSED, Abort.EXITED)
            self.finish(conn, notify=gone or conn.bounced)
            return
        conn.state = State.IDLE
        if conn.role is Role.CLIENT:  # (after an eager try, the connection must grow up too)
            delay = self.backoff(conn)
            self.core.timer(conn, max(delay, self.config.min_age) if was_eager else delay)

    def thaw(self, conn: Conn) -> None:
        """Let go of the app: release its hold in the gate, thaw it if this swap froze it."""
        if conn.pid is not None and conn.cid in self.gate.holders(conn.pid):
            self.release_pid(conn.pid, conn.cid)
        if conn.now.frozen:
            assert conn.pid is not None
            conn.now.frozen = False
            self.core.emit(Thaw(conn.pid))
        if conn.pid is not None:
            self.resume_if_last(conn.pid, conn.cid)

    def resume_if_last(self, pid: int, token: StopToken) -> None:
        """`token` lets go of the tracer's stop of `pid`: resume it if nothing else holds it."""
        if self.gate.stop_release(pid, token):
            self.stats["resumed"] += 1
            self.core.emit(Resume(pid))

    # -- the process gate ----------------------------------------------------------------------

    def held_frozen(self, pid: int | None) -> bool:
        """Another swap holds `pid` frozen (or is freezing it): a new freeze adds no stop."""
        for token in self.gate.holders(pid):
            conn = self.core.conns.get(token) if isinstance(token, bytes) else None
            if conn is None or conn.now.frozen or conn.state is State.FREEZING:
                return True  # (an orphaned freeze, without a connection, counts too)
        return False

    def hold_pid(self, pid: int, token: Token) -> None:
        """`token` holds `pid` (a swap in progress on it)."""
        self.gate.hold(pid, token)

    def release_pid(self, pid: int, token: Token) -> None:
        """A swap lets go of the process: wake a client connection queued for it."""
        self.gate.release(pid, token)

        def still_waits(cid: bytes) -> bool:
            conn = self.core.conns.get(cid)
            return (conn is not None and conn.state is State.IDLE and conn.role is Role.CLIENT
                    and conn.outstanding is None and conn.pid == pid)

        woken = self.gate.next_waiter(pid, still_waits)
        if woken is not None:
            self.core.timer(self.core.conns[woken], 0.0)

    # -- forgetting ------------------------------------------------------------------------------

    def finish(self, conn: Conn, notify: bool) -> None:
        """Forget a connection; close the daemon's sockets; it stays where it is."""
        core = self.core
        orphan: OrphanFreeze | None = None
        if conn.outstanding is not None:  # a result will arrive: undo a freeze if need be
            if conn.outstanding in core.refs and conn.state is State.FREEZING:
                assert conn.pid is not None
                orphan = OrphanFreeze(conn.pid, conn.cid)
                core.refs[conn.outstanding] = orphan
            else:
                core.refs.pop(conn.outstanding, None)
            conn.outstanding = None
        self.thaw(conn)
        if orphan is not None:  # held until the late freeze result arrives
            self.hold_pid(orphan.pid, orphan)
        if (notify and not conn.told_final and conn.state is not State.SWAPPED
                and conn.host_sock is not None):
            core.send(conn, "conn_closed")
        for sock in (conn.overlay_sock, conn.host_sock):
            if sock is not None:
                core.emit(CloseSocket(sock))
        conn.overlay_sock = conn.host_sock = None
        core.conns.pop(conn.cid, None)
        if conn.state is State.SWAPPED:
            core.emit(NoteForgotten(conn.cid))
        if conn.aging:  # closed before min_age: its listener's connections may be short
            conn.aging = False
            core.emit(CancelTimer(AgeTimer(conn.cid)))
            core.lifetime(conn.tuple, False)
        if core.unbound.get(conn.tuple) == conn.cid:
            del core.unbound[conn.tuple]
            core.emit(CancelTimer(BindTimer(conn.cid)))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("conn %s %s: %s -> forgotten", conn.cid.hex()[:8], conn.tuple,
                      conn.state.value)
        if conn.pid is not None and core.by_fd.get((conn.pid, conn.fd or -1)) == conn.cid:
            del core.by_fd[(conn.pid, conn.fd or -1)]
        if conn.state is not State.SWAPPED:
            # a bind whose accept never came is no traced connection of ours
            self.stats["left_on_overlay" if conn.role is Role.CLIENT or conn.matched
                       else "binds_dropped"] += 1
