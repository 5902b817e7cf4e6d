"""The two-phase swap of one connection, as two transition tables (client, server).

The eager swap runs through the same tables: both apps were stopped by the tracer at
`connect()`/`accept()` return, so an attempt only seizes each side, checks that no payload
crossed the overlay, and replaces, server first (docs/swap.md, "the eager swap").

Roles: the **client** side (the daemon that traced the overlay `connect`) coordinates; the
**server** side (the daemon that traced the `accept`) follows. Per attempt, "first" is the side
frozen first (the writer, so the reader can drain). Every queue check requires the send queue
of the overlay socket to be empty, and a side's check only counts after the other side is
frozen with an empty send queue; the unread receive queues are then final and are carried
over (`Bounce`) instead of waited for. The commit point is the client's successful replace.
docs/swap.md has the sequence diagrams and the tables as rendered by `transitions.markdown`.
"""

from __future__ import annotations

from typing import Any

from .conn import Conn, Role, State
from .core import Core
from .events import ConnProbed, FourTuple, HostConnected, QueuesChecked
from .gate import ProcessGate
from .handlers import RoleHandlers
from .keys import Abort, PendingAbort
from .transitions import ANY, Table, Transition, Trigger

# The states each role can be in (rows of the shared table for the other role's states are
# left out of that role's table: they could never fire).
_REACHABLE = {
    Role.CLIENT: {State.CONNECTING, State.IDLE, State.AWAIT_FROZEN, State.FREEZING,
                  State.CHECKING, State.AWAIT_CHECKED, State.MIGRATING, State.AWAIT_REPLACED,
                  State.REPLACING, State.PROBING, State.SWAPPED},
    Role.SERVER: {State.IDLE, State.FREEZING, State.CHECKING, State.AWAIT_CHECK,
                  State.AWAIT_MIGRATE, State.MIGRATING, State.REPLACING, State.AWAIT_COMMIT,
                  State.PROBING, State.ROLLING_BACK, State.SWAPPED},
}
_AWAITING = (State.AWAIT_FROZEN, State.AWAIT_CHECKED, State.AWAIT_REPLACED, State.AWAIT_CHECK,
             State.AWAIT_MIGRATE)
_UNCERTAIN = (State.AWAIT_COMMIT, State.PROBING)


class SwapProtocol(RoleHandlers):
    """Runs a connection's transitions; `fire(conn, trigger, payload)` is the way in."""

    def __init__(self, core: Core, gate: ProcessGate) -> None:
        super().__init__(core, gate)
        T = Transition
        common: dict[tuple[State | None, Trigger], Transition] = {
            (State.FREEZING, Trigger.FROZEN): T(self._frozen),
            (State.ROLLING_BACK, Trigger.REPLACED): T(self._rolled_back),
            (State.ROLLING_BACK, Trigger.FAILED): T(self._rollback_failed),
            (State.CONNECTING, Trigger.FAILED): T(self._connect_failed),
            (State.PROBING, Trigger.FAILED): T(self._probe_failed),
            (ANY, Trigger.FAILED): T(self._step_failed),
            **{(s, Trigger.TIMER): T(self._timed_out) for s in _AWAITING},
            **{(s, Trigger.TIMER): T(self._commit_uncertain) for s in _UNCERTAIN},
            (State.IDLE, Trigger.ABORT): T(self._peer_gave_up, self._final),
            (ANY, Trigger.ABORT): T(self._peer_aborted, self._abort_applies),
            (ANY, Trigger.CONN_CLOSED): T(self._peer_closed),
            (State.SWAPPED, Trigger.HOST_CLOSED): T(self._ignore),
            **{(s, Trigger.HOST_CLOSED): T(self._host_closed_uncertain) for s in _UNCERTAIN},
            (ANY, Trigger.HOST_CLOSED): T(self._host_closed),
            (State.SWAPPED, Trigger.APP_CLOSED): T(self._forget_swapped),
            (State.SWAPPED, Trigger.APP_EXITED): T(self._forget_swapped),
            **{(s, Trigger.APP_CLOSED): T(self._close_after_commit) for s in _UNCERTAIN},
            (ANY, Trigger.APP_EXITED): T(self._app_gone),
            (ANY, Trigger.APP_CLOSED): T(self._app_gone),
            (State.SWAPPED, Trigger.PEER_LOST): T(self._ignore),
            (ANY, Trigger.PEER_LOST): T(self._peer_lost),
        }
        client = {
            **common,
            (State.CONNECTING, Trigger.HOST_CONNECTED): T(self._host_connected),
            (State.CONNECTING, Trigger.READY_REPLACED): T(self._replaced_early_eager,
                                                          self._same),
            (State.FREEZING, Trigger.READY_REPLACED): T(self._replaced_early_eager, self._same),
            (State.CHECKING, Trigger.READY_REPLACED): T(self._replaced_early_eager, self._same),
            (State.IDLE, Trigger.TIMER): T(self.next_attempt),
            (State.CHECKING, Trigger.CHECKED): T(self._client_checked),
            (State.MIGRATING, Trigger.BOUNCED): T(self._client_bounced),
            (State.REPLACING, Trigger.REPLACED): T(self._client_replaced),
            (State.PROBING, Trigger.PROBED): T(self._client_probed),
            (State.AWAIT_FROZEN, Trigger.READY_FROZEN): T(self._server_frozen, self._same),
            (State.AWAIT_CHECKED, Trigger.READY_CHECKED): T(self._server_checked, self._same),
            (State.AWAIT_REPLACED, Trigger.READY_REPLACED): T(self._server_replaced, self._same),
            (State.MIGRATING, Trigger.READY_REPLACED): T(self._server_replaced_early,
                                                        self._still_bouncing),
            (State.SWAPPED, Trigger.DONE): T(self._done),
            (State.AWAIT_REPLACED, Trigger.PEER_LOST): T(self._probe_replaced),
        }
        server = {
            **common,
            (State.IDLE, Trigger.PREPARE_FREEZE): T(self._prepared, self._newer),
            (State.IDLE, Trigger.PREPARE_CHECK): T(self._prepared, self._newer),
            (State.AWAIT_CHECK, Trigger.PREPARE_CHECK): T(self._final_check, self._same_tuple),
            (State.AWAIT_MIGRATE, Trigger.PREPARE_MIGRATE): T(self._bounce, self._same_tuple),
            (State.CHECKING, Trigger.CHECKED): T(self._server_checked_queues),
            (State.MIGRATING, Trigger.BOUNCED): T(self._server_bounced),
            (State.REPLACING, Trigger.REPLACED): T(self._server_replaced_fd),
            (State.PROBING, Trigger.PROBED): T(self._server_probed),
            (State.AWAIT_COMMIT, Trigger.COMMIT): T(self._committed, self._same),
            (State.PROBING, Trigger.COMMIT): T(self._committed, self._same),
            (State.AWAIT_COMMIT, Trigger.PEER_LOST): T(self._probe_if_idle),
            (State.PROBING, Trigger.PEER_LOST): T(self._probe_if_idle),
        }
        self.tables = {role: Table(role, {key: row for key, row in rows.items()
                                          if key[0] is ANY or key[0] in _REACHABLE[role]},
                                   self.stats)
                       for role, rows in ((Role.CLIENT, client), (Role.SERVER, server))}

    def fire(self, conn: Conn, trigger: Trigger, payload: Any = None) -> bool:
        """Run `conn`'s transition for `trigger` (False: it had none; counted)."""
        return self.tables[conn.role].fire(conn, trigger, payload)

    # -- guards ------------------------------------------------------------------------------

    @staticmethod
    def _same(conn: Conn, msg: Any) -> bool:
        """the peer's attempt is ours"""
        return bool(msg.attempt == conn.attempt)

    @staticmethod
    def _still_bouncing(conn: Conn, msg: Any) -> bool:
        """the peer's attempt is ours and our bounce runs"""
        return (msg.attempt == conn.attempt and not conn.now.peer_replaced
                and conn.outstanding is not None)

    @staticmethod
    def _same_tuple(conn: Conn, msg: Any) -> bool:
        """it names our 4-tuple and attempt"""
        return bool(_tuple(msg) == conn.tuple and msg.attempt == conn.attempt)

    @staticmethod
    def _newer(conn: Conn, msg: Any) -> bool:
        """it names our 4-tuple and a newer attempt"""
        return bool(_tuple(msg) == conn.tuple and msg.attempt > conn.attempt)

    @staticmethod
    def _final(conn: Conn, msg: Any) -> bool:
        """the abort is final"""
        return bool(msg.final)

    @staticmethod
    def _abort_applies(conn: Conn, msg: Any) -> bool:
        """it names our attempt (and we have not swapped)"""
        return bool(msg.attempt == conn.attempt and conn.state is not State.SWAPPED)

    # -- client ------------------------------------------------------------------------------

    def _host_connected(self, conn: Conn, ev: HostConnected) -> None:
        """keep the host socket; first attempt"""
        conn.host_sock, conn.host_inode = ev.sock, ev.inode
        if conn.pending_abort:
            if conn.now.eager:  # (a retry is still possible: the late swap)
                conn.state = State.IDLE
            self.resolve_pending(conn)
            return
        conn.state = State.IDLE
        if conn.now.eager:  # both apps stopped: seize and check ours while the server works
            self.freeze(conn)
            return
        self.next_attempt(conn)

    def _replaced_early_eager(self, conn: Conn, _: Any) -> None:
        """eager: the server replaced before our seize and check were done; replace after"""
        conn.now.peer_replaced = True

    def next_attempt(self, conn: Conn, _: Any = None) -> None:
        """next attempt: wait (process busy or rate-capped, socket shared) or freeze / prepare"""
        cfg = self.config
        if conn.attempt - conn.waits >= cfg.max_attempts or conn.waits >= cfg.max_waits:
            self.stats["gave_up"] += 1
            self.core.send(conn, "swap_abort", attempt=conn.attempt, reason="gave up",
                           final=True)
            conn.told_final = True
            self.finish(conn, notify=False)
            return
        assert conn.pid is not None
        if self.gate.full(conn.pid):  # enough swaps hold this process: queue up
            self.stats["pid_busy"] += 1
            self._wait(conn, cfg.backoff_max)  # woken sooner when the process is free
            self.gate.queue(conn.pid, conn.cid)
            return
        if self._rate_limited(conn.pid) and not self.held_frozen(conn.pid):
            self._wait(conn, cfg.rate_wait)  # frozen often enough lately: let it run a while
            return
        if self.core.policy.shared(conn):  # just forked: wait until one process holds it
            self.stats["socket_shared"] += 1
            self._wait(conn, cfg.rate_wait)
            return
        conn.attempt += 1
        # after a "wait" the server goes first: if it still is not ready, nothing froze
        first = Role.SERVER if conn.peer_waiting or not conn.attempt % 2 else Role.CLIENT
        conn.peer_waiting = False
        self.new_attempt(conn, first)
        self.hold_pid(conn.pid, conn.cid)
        self.stats["attempts"] += 1
        if first is Role.CLIENT:
            self.freeze(conn)
        else:
            self.prepare(conn, "freeze", State.AWAIT_FROZEN)

    def _wait(self, conn: Conn, delay: float) -> None:
        conn.attempt += 1
        conn.waits += 1
        self.core.timer(conn, delay)

    def _client_checked(self, conn: Conn, ev: QueuesChecked) -> None:
        """quiet: prepare the server's check, or (final) carry the bytes"""
        if conn.now.eager:
            self._eager_checked(conn, ev)
            return
        if not self._quiet(conn, ev):
            return
        conn.now.checks += 1
        if not conn.now.prepared or (conn.now.first is Role.SERVER and conn.now.checks == 1):
            self.prepare(conn, "check", State.AWAIT_CHECKED)
        else:  # the final check: our unread bytes are final, and so are the server's
            conn.now.recv_len = ev.recv_queue
            self.prepare(conn, "migrate", State.MIGRATING)
            self.migrate(conn)

    def _client_bounced(self, conn: Conn, _: Any) -> None:
        """bytes carried: replace once the server has (probe if the peer was lost)"""
        pending = conn.pending_abort
        if pending is not None and pending.reason is Abort.PEER_LOST:
            conn.pending_abort = None  # the server may have replaced: ask the data path
            self.probe(conn)
            return
        if pending is not None:
            self.resolve_pending(conn)
            return
        self.migrated(conn)

    def _client_replaced(self, conn: Conn, _: Any) -> None:
        """the commit point: swap_commit, thaw, done"""
        conn.now.replaced = True
        pending, conn.pending_abort = conn.pending_abort, None
        self.core.send(conn, "swap_commit", attempt=conn.attempt)
        self.complete(conn)
        if pending is not None and pending.reason in (Abort.CLOSED, Abort.EXITED):
            self.finish(conn, notify=False)

    def _client_probed(self, conn: Conn, ev: ConnProbed) -> None:
        """forward if the server replaced and its daemon is gone, else stay on the overlay"""
        pending = conn.pending_abort
        if pending is not None and pending.reason in (Abort.CLOSED, Abort.EXITED):
            self.resolve_pending(conn)
        elif ev.overlay_closed and not ev.host_closed:
            self.stats["probe_forward"] += 1
            assert conn.host_sock is not None and conn.inode is not None
            conn.pending_abort = PendingAbort(Abort.PEER_LOST, False, False)
            self.replace(conn, conn.host_sock, conn.inode, State.REPLACING)
        else:
            self.abort(conn, Abort.PEER_LOST, retry=False, notify=False)

    def _server_frozen(self, conn: Conn, _: Any) -> None:
        """freeze our app"""
        self.freeze(conn)

    def _server_checked(self, conn: Conn, msg: Any) -> None:
        """note the server's unread bytes; final check"""
        conn.now.peer_len = msg.migrate_len
        self.check(conn)

    def _server_replaced(self, conn: Conn, _: Any) -> None:
        """replace our fd"""
        assert conn.host_sock is not None and conn.inode is not None
        self.replace(conn, conn.host_sock, conn.inode, State.REPLACING)

    def _probe_replaced(self, conn: Conn, _: Any) -> None:
        """the server may have replaced, and may be gone: probe the data path"""
        self.probe(conn)

    def _server_replaced_early(self, conn: Conn, _: Any) -> None:
        """replace once our bounce is done"""
        conn.now.peer_replaced = True

    def _done(self, conn: Conn, _: Any) -> None:
        """count it"""
        self.stats["swap_done_received"] += 1


def tables_markdown() -> str:
    """Both roles' transition tables as Markdown, as docs/swap.md shows them (regenerate:
    ``python -c 'from ebpfrouter.engine.swap import tables_markdown as t; print(t(), end="")'``).
    """
    from .core import EngineConfig, Policy
    from .transitions import markdown

    protocol = SwapProtocol(Core(EngineConfig("doc"), Policy(lambda ip: None)),
                            ProcessGate(EngineConfig("doc")))
    return markdown([protocol.tables[Role.CLIENT], protocol.tables[Role.SERVER]])


def _tuple(msg: Any) -> FourTuple:
    return FourTuple(msg.client_addr, msg.client_port, msg.server_addr, msg.server_port)
