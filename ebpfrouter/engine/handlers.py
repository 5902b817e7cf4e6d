"""The handlers of the swap's transitions that the server side and both roles use (the
client's are in swap.py, next to the tables that name them all)."""

from __future__ import annotations

from typing import Any

from .conn import Attempt, Conn, Role, State
from .events import ActionFailed, ConnProbed, QueuesChecked
from .keys import Abort, WaitReason
from .steps import SwapSteps


class RoleHandlers(SwapSteps):
    """Server-side and shared transition handlers (each docstring's first line is the
    "then" column of the tables in docs/swap.md)."""

    def _rate_limited(self, pid: int | None) -> bool:
        if not self.gate.over_rate(pid):
            return False
        self.stats["freeze_rate_limited"] += 1
        return True

    # -- server ------------------------------------------------------------------------------

    def _prepared(self, conn: Conn, msg: Any) -> None:
        """new attempt: wait (not matched, ruled out, busy, shared, app unread) or freeze"""
        conn.attempt = msg.attempt
        self.new_attempt(conn, Role.SERVER if msg.stage == "freeze" else Role.CLIENT)
        if not conn.matched:
            self.stats["prepare_not_ready"] += 1
            self._wait_reply(conn, WaitReason.NOT_READY)
            return
        assert conn.pid is not None
        if not self.core.policy.allow(Role.SERVER, conn.pid, conn.tuple):
            self.stats["accept_ruled_out"] += 1
            self.core.send(conn, "swap_abort", attempt=conn.attempt, reason="ruled out",
                           final=True)
            self.finish(conn, notify=False)
            return
        if self.gate.full(conn.pid) or (self._rate_limited(conn.pid)
                                        and not self.held_frozen(conn.pid)):
            self.stats["pid_busy"] += 1
            self._wait_reply(conn, WaitReason.PROCESS_BUSY)
            return
        if self.core.policy.shared(conn):
            self.stats["socket_shared"] += 1
            self._wait_reply(conn, WaitReason.SHARED)
            return
        if not self.core.policy.server_ready(conn):
            self.stats["app_not_read"] += 1
            self._wait_reply(conn, WaitReason.APP_UNREAD)
            return
        self.hold_pid(conn.pid, conn.cid)
        self.freeze(conn)

    def _wait_reply(self, conn: Conn, why: WaitReason) -> None:
        self.core.send(conn, "swap_abort", attempt=conn.attempt, reason=why.value, final=False)

    def eager_serve(self, conn: Conn) -> None:
        """Server: the client's eager bind and our app's stopped accept are both here: seize
        the app, check that nothing crossed the overlay, replace; or decline (it resumes)."""
        assert conn.pid is not None
        if not self.core.policy.allow(Role.SERVER, conn.pid, conn.tuple):
            self.stats["accept_ruled_out"] += 1
            self.core.send(conn, "swap_abort", attempt=conn.attempt, reason="ruled out",
                           final=True)
            conn.told_final = True
            self.finish(conn, notify=False)
            return
        if self.core.policy.shared(conn):
            self.stats["socket_shared"] += 1
            self.eager_decline(conn, WaitReason.SHARED)
            return
        conn.now = Attempt(first=Role.SERVER, eager=True)
        self.hold_pid(conn.pid, conn.cid)
        self.stats["eager_attempts"] += 1
        self.freeze(conn)

    def eager_decline(self, conn: Conn, why: WaitReason) -> None:
        """Server: no eager swap for this connection; the client resumes and goes late."""
        self.stats["eager_declined"] += 1
        self._wait_reply(conn, why)
        conn.eager = False
        self.thaw(conn)

    def _eager_checked(self, conn: Conn, ev: QueuesChecked) -> None:
        """Eager: replace if no payload byte crossed the overlay either way (neither app ran
        since its stop), else fall back (the late swap may take the connection later)."""
        if conn.pending_abort:
            self.resolve_pending(conn)
            return
        pristine = (not ev.send_queue and not ev.recv_queue and ev.bytes_received == 0
                    and ev.bytes_acked is not None and ev.bytes_acked <= 1)
        if not pristine:
            self.stats["eager_not_pristine"] += 1
            self.abort(conn, Abort.NOT_PRISTINE, retry=True, notify=True,
                       detail=f"eager: payload on the overlay (send {ev.send_queue}, recv "
                              f"{ev.recv_queue}, acked {ev.bytes_acked}, received "
                              f"{ev.bytes_received})")
            return
        assert conn.host_sock is not None and conn.inode is not None
        if conn.role is Role.CLIENT and not conn.now.peer_replaced:  # the server goes first
            conn.state = State.AWAIT_REPLACED
            self.core.timer(conn, self.config.eager_wait)
            return
        self.replace(conn, conn.host_sock, conn.inode, State.REPLACING)

    def _final_check(self, conn: Conn, _: Any) -> None:
        """final check"""
        self.check(conn)

    def _bounce(self, conn: Conn, msg: Any) -> None:
        """carry the unread bytes both ways"""
        conn.now.peer_len = msg.migrate_len
        self.migrate(conn)

    def _server_checked_queues(self, conn: Conn, ev: QueuesChecked) -> None:
        """quiet: ready(frozen) first in a server-first attempt, else ready(checked, |R_s|);
        eager: replace if nothing crossed the overlay"""
        if conn.now.eager:
            self._eager_checked(conn, ev)
            return
        if not self._quiet(conn, ev):
            return
        conn.now.checks += 1
        if conn.now.first is Role.SERVER and conn.now.checks == 1:
            conn.state = State.AWAIT_CHECK
            self.core.send(conn, "swap_ready", attempt=conn.attempt, stage="frozen",
                           migrate_len=0)
        else:  # the final check: the client's check and the bounce come next
            conn.now.recv_len = ev.recv_queue
            conn.state = State.AWAIT_MIGRATE
            self.core.send(conn, "swap_ready", attempt=conn.attempt, stage="checked",
                           migrate_len=ev.recv_queue)
        self.core.timer(conn, self.config.message_timeout)

    def _server_bounced(self, conn: Conn, _: Any) -> None:
        """bytes carried: replace"""
        if conn.pending_abort:
            self.resolve_pending(conn)
            return
        self.migrated(conn)

    def _server_replaced_fd(self, conn: Conn, _: Any) -> None:
        """replaced, still frozen: ready(replaced), wait for the commit"""
        conn.now.replaced = True
        if conn.pending_abort:
            self.resolve_pending(conn)
            return
        conn.state = State.AWAIT_COMMIT
        self.core.send(conn, "swap_ready", attempt=conn.attempt, stage="replaced",
                       migrate_len=0)
        self.core.timer(conn, self.config.message_timeout)

    def _server_probed(self, conn: Conn, ev: ConnProbed) -> None:
        """host closed: roll back; overlay closed: commit; neither: probe again"""
        if conn.pending_abort:
            self.resolve_pending(conn)
        elif ev.host_closed:  # the client gave up: put the overlay socket back
            self.stats["probe_rollback"] += 1
            self.rollback(conn)
        elif ev.overlay_closed:  # the client committed and dropped the overlay
            self.stats["probe_commit"] += 1
            self.server_commit(conn)
        else:
            self.probe_later(conn)

    def _committed(self, conn: Conn, _: Any) -> None:
        """thaw, swap_done"""
        self.server_commit(conn)

    def _probe_if_idle(self, conn: Conn, _: Any) -> None:
        """probe the data path (unless a probe runs)"""
        if conn.outstanding is None:
            self.probe(conn)

    def _host_closed_uncertain(self, conn: Conn, _: Any) -> None:
        """the client gave up: probe to confirm, then roll back"""
        self.stats["host_closed_by_peer"] += 1
        self._probe_if_idle(conn, None)

    def _close_after_commit(self, conn: Conn, _: Any) -> None:
        """settle the swap first (a stale event: the app is frozen), forget after"""
        self.stats["closed_by_app"] += 1
        conn.close_after = True

    # -- both roles --------------------------------------------------------------------------

    def _quiet(self, conn: Conn, ev: QueuesChecked) -> bool:
        """The check allows going on (else the attempt is aborted as busy)."""
        if conn.pending_abort:
            self.resolve_pending(conn)
            return False
        unread_ok = self.config.migrate and ev.recv_queue <= self.config.max_migrate
        if ev.send_queue or (ev.recv_queue and not unread_ok):
            self.stats["busy"] += 1
            self.abort(conn, Abort.BUSY, retry=True, notify=True,
                       detail=f"busy (send {ev.send_queue}, recv {ev.recv_queue})")
            return False
        return True

    def _frozen(self, conn: Conn, _: Any) -> None:
        """check the queues"""
        conn.now.frozen = True
        if conn.pending_abort:
            self.resolve_pending(conn)
            return
        self.check(conn)

    def _rolled_back(self, conn: Conn, _: Any) -> None:
        """the overlay socket is back: undo the attempt"""
        conn.now.replaced = False
        self.abort_done(conn)

    def _rollback_failed(self, conn: Conn, ev: ActionFailed) -> None:
        """thaw, forget, tell the peer (the one unrecoverable case)"""
        self.stats["rollback_failed"] += 1
        self.thaw(conn)
        self.finish(conn, notify=True)

    def _connect_failed(self, conn: Conn, _: Any) -> None:
        """stay on the overlay"""
        self.finish(conn, notify=False)

    def _probe_failed(self, conn: Conn, _: Any) -> None:
        """probe again later"""
        self.probe_later(conn)

    def _step_failed(self, conn: Conn, ev: ActionFailed) -> None:
        """undo, tell the peer, retry (an abort decided meanwhile wins)"""
        pending, conn.pending_abort = conn.pending_abort, None
        if pending is None:
            self.abort(conn, Abort.FAILED, retry=True, notify=True, detail=ev.reason)
        else:
            self.abort(conn, pending.reason, pending.retry, pending.notify, pending.detail)

    def _timed_out(self, conn: Conn, _: Any) -> None:
        """no peer message in time: abort, retry"""
        self.stats["timeouts"] += 1
        self.abort(conn, Abort.TIMEOUT, retry=True, notify=True)

    def _commit_uncertain(self, conn: Conn, _: Any) -> None:
        """no commit in time: probe the data path"""
        self.stats["commit_uncertain"] += 1
        self.probe(conn)

    def _peer_gave_up(self, conn: Conn, _: Any) -> None:
        """forget it"""
        self.abort(conn, Abort.PEER_GAVE_UP, retry=False, notify=False)

    def _peer_aborted(self, conn: Conn, msg: Any) -> None:
        """undo ours; a "wait" is not an attempt, and the next one is server-first"""
        self.stats["aborted_by_peer"] += 1
        if WaitReason.of(msg.reason) is not None:
            conn.waits += 1
            conn.peer_waiting = True
        self.abort(conn, Abort.PEER_ABORTED, retry=not msg.final, notify=False,
                   detail=msg.reason)

    def _peer_closed(self, conn: Conn, _: Any) -> None:
        """the peer's app closed: abort, stay on the overlay (nothing if swapped)"""
        self.stats["closed_by_peer"] += 1
        if conn.state is not State.SWAPPED:
            self.abort(conn, Abort.PEER_CLOSED, retry=False, notify=False)

    def _host_closed(self, conn: Conn, _: Any) -> None:
        """the other daemon closed the host connection: abort, no retry"""
        self.stats["host_closed_by_peer"] += 1
        self.abort(conn, Abort.HOST_CLOSED, retry=False, notify=True)

    def _forget_swapped(self, conn: Conn, _: Any) -> None:
        """the swapped connection ended in the app: forget it"""
        self.stats["closed_by_app"] += 1
        self.finish(conn, notify=False)

    def _app_gone(self, conn: Conn, exited: Any) -> None:
        """abort, no retry, conn_closed to the peer"""
        self.stats["closed_by_app"] += 1
        self.abort(conn, Abort.EXITED if exited else Abort.CLOSED, retry=False, notify=True)

    def _peer_lost(self, conn: Conn, _: Any) -> None:
        """abort, no retry"""
        self.abort(conn, Abort.PEER_LOST, retry=False, notify=False)

    def _ignore(self, conn: Conn, _: Any) -> None:
        """nothing to do"""
