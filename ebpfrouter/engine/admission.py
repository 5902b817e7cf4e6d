"""Admission: which traced connections become swaps, and when.

A traced connect ages (`min_age`), is checked against the rules once grown up, and waits for
its server's listener announcement; then the host connection is made. A traced accept waits
for its client's bind (either may come first). Every traced connection ends up counted once:
swapped, left on the overlay, short (closed before anything was tried), skipped (a decision),
or still pending somewhere.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable
from typing import TypeVar

from .actions import CancelTimer, CloseSocket, HostConnect, Resume, StartTimer
from .conn import Attempt, Conn, Role, State
from .core import Core
from .events import AcceptTraced, ConnectTraced, FourTuple, HostAccepted, SockRef
from .keys import (
    AcceptTimer,
    BindTimer,
    EagerTimer,
    FdTimer,
    StoppedAccept,
    WaitingTimer,
    WaitReason,
    YoungTimer,
)
from .listeners import ListenerBook
from .swap import SwapProtocol

log = logging.getLogger("ebpfrouter.engine.machine")

Traced = ConnectTraced | AcceptTraced
T = TypeVar("T", ConnectTraced, AcceptTraced)
FdKey = tuple[int, int]


class Admission:
    """Young and waiting connects, accepts waiting for binds; binds waiting for accepts."""

    def __init__(self, core: Core, listeners: ListenerBook, swap: SwapProtocol,
                 forget_fd: Callable[[int, int], None]) -> None:
        """`forget_fd(pid, fd)` ends whatever swap held that fd (a reused fd number)."""
        self.core = core
        self.forget_fd = forget_fd
        self.config = core.config
        self.stats = core.stats
        self.listeners = listeners
        self.swap = swap
        self.young: collections.OrderedDict[FdKey, ConnectTraced] = collections.OrderedDict()
        self.waiting: collections.OrderedDict[FdKey, ConnectTraced] = collections.OrderedDict()
        self.accepts: dict[FourTuple, AcceptTraced] = {}  # server: traced, not yet bound
        self.accepts_by_fd: dict[FdKey, FourTuple] = {}  # index of `accepts`

    # -- client side ---------------------------------------------------------------------------

    def connect_traced(self, ev: ConnectTraced) -> None:
        """A pod connected to another node's pod: age it, or route it now."""
        self.stats["connects_traced"] += 1
        if ev.stopped:
            self.stats["eager_stops"] += 1
            if not self.config.eager:
                ev = self.resume(ev, "eager_off")
        peer = self.core.policy.peer_of(ev.conn.server_addr)
        if peer is None or peer == self.core.node:
            self.let_go(ev, None, "connect_not_remote")
            return
        self._reused(ev)
        if ev.stopped:  # eager: route it now, or let the app go on and age as usual
            target = self.listeners.remote.get((ev.conn.server_addr, ev.conn.server_port))
            if not self.core.policy.allow(Role.CLIENT, ev.pid, ev.conn):
                self.let_go(ev, None, "connect_ruled_out")
                return
            if target is not None and target[0] == peer:
                self._start_client(ev, peer, target[1], target[2])
                return
            ev = self.resume(ev, "eager_no_listener")
        if self.config.min_age > 0 and not ev.aged:  # short connections are not worth a host
            # connection (nor a look at the rules: applied when the connection has grown up);
            # `aged`: the kernel held it that long already
            self.young[(ev.pid, ev.fd)] = ev
            self.core.emit(StartTimer(YoungTimer(ev.pid, ev.fd, ev.inode), self.config.min_age))
            while len(self.young) > self.config.max_waiting:
                _, evicted = self.young.popitem(last=False)
                self.let_go(evicted, YoungTimer, "young_evicted")
            return
        self._route(ev, peer)

    def grown_up(self, timer: YoungTimer) -> None:
        """A traced connect lived `min_age`: bypass it now."""
        ev = self.young.get((timer.pid, timer.fd))
        if ev is None or ev.inode != timer.inode:
            self.stats["stale_timer"] += 1
            return
        del self.young[(timer.pid, timer.fd)]
        peer = self.core.policy.peer_of(ev.conn.server_addr)
        if peer is None or peer == self.core.node:  # the peer map changed meanwhile
            self.let_go(ev, None, "connect_not_remote")
            return
        self._route(ev, peer)

    def _route(self, ev: ConnectTraced, peer: str) -> None:
        """Apply the rules; start the bypass if the server's listener is announced, else wait
        for it."""
        if not self.core.policy.allow(Role.CLIENT, ev.pid, ev.conn):
            self.let_go(ev, None, "connect_ruled_out")
            return
        target = self.listeners.remote.get((ev.conn.server_addr, ev.conn.server_port))
        if target is None or target[0] != peer:
            self.stats["connect_waiting_listener"] += 1
            self.waiting[(ev.pid, ev.fd)] = ev
            self.core.emit(StartTimer(WaitingTimer(ev.pid, ev.fd, ev.inode),
                                      self.config.listener_wait))
            while len(self.waiting) > self.config.max_waiting:
                _, evicted = self.waiting.popitem(last=False)
                self.let_go(evicted, WaitingTimer, "waiting_evicted")
            return
        self._start_client(ev, peer, target[1], target[2])

    def listener_announced(self, key: tuple[str, int], peer: str) -> None:
        """A peer announced (addr, port): start the connects that waited for it."""
        _, host_addr, host_port = self.listeners.remote[key]
        for fd_key, waiting in list(self.waiting.items()):  # clients that connected early
            if (waiting.conn.server_addr, waiting.conn.server_port) == key:
                del self.waiting[fd_key]
                self.core.emit(CancelTimer(WaitingTimer(waiting.pid, waiting.fd, waiting.inode)))
                self._start_client(waiting, peer, host_addr, host_port)

    def _start_client(self, ev: ConnectTraced, peer: str, host_addr: str, host_port: int) -> None:
        core = self.core
        if len(core.conns) >= self.config.max_connections:
            self.let_go(ev, None, "too_many_connections")
            return
        cid = core.policy.new_cid()
        conn = Conn(cid, Role.CLIENT, peer, ev.conn, State.CONNECTING, pid=ev.pid, fd=ev.fd,
                    inode=ev.inode, overlay_sock=ev.sock)
        core.conns[cid] = conn
        core.by_fd[(ev.pid, ev.fd)] = cid
        self.stats["bypass_started"] += 1
        bind: dict[str, object] = {"cid": cid, **ev.conn.to_body()}
        if ev.stopped:  # the eager attempt is attempt 1; the server replaces first
            conn.eager, conn.attempt = True, 1
            conn.now = Attempt(first=Role.SERVER, prepared=True, eager=True)
            self.swap.gate.stop_hold(ev.pid, cid)
            self.swap.hold_pid(ev.pid, cid)
            self.stats["eager_attempts"] += 1
            bind["eager"] = True
        core.emit(HostConnect(core.step(conn), cid, host_addr, host_port, bind,
                              overlay_sock=ev.sock))

    # -- server side ---------------------------------------------------------------------------

    def accept_traced(self, ev: AcceptTraced) -> None:
        """A local pod accepted a remote pod's connection: pair it with the bind."""
        self.stats["accepts_traced"] += 1
        if ev.stopped:
            self.stats["eager_stops"] += 1
            if not self.config.eager:
                ev = self.resume(ev, "eager_off")
        self._reused(ev)
        peer_of = self.core.policy.peer_of
        if peer_of(ev.conn.server_addr) != self.core.node:
            self.let_go(ev, None, "accept_not_local")
            return
        peer = peer_of(ev.conn.client_addr)
        if peer is None or peer == self.core.node:
            self.let_go(ev, None, "accept_not_remote")
            return
        cid = self.core.unbound.get(ev.conn)  # the bind may have come first
        conn = self.core.conns.get(cid) if cid is not None else None
        if conn is not None and conn.role is Role.SERVER and not conn.matched:
            if conn.peer != peer:
                self.let_go(ev, None, "bind_peer_mismatch")
                return
            self.core.emit(CancelTimer(BindTimer(conn.cid)))
            if ev.stopped:
                self.swap.gate.stop_hold(ev.pid, conn.cid)
            self._match(conn, ev)
            self._eager_or_resume(conn, ev.stopped)
            return
        old = self._pop_accept(ev.conn)
        if old is not None:
            self.let_go(old, AcceptTimer, "accept_duplicate")
        self.accepts[ev.conn] = ev
        self.accepts_by_fd[(ev.pid, ev.fd)] = ev.conn
        self.core.emit(StartTimer(AcceptTimer(ev.pid, ev.fd, ev.inode), self.config.bind_wait))
        if ev.stopped:  # its client's eager bind should be on its way
            self.swap.gate.stop_hold(ev.pid, StoppedAccept(ev.pid, ev.fd, ev.inode))
            self.core.emit(StartTimer(EagerTimer(ev.pid, ev.fd, ev.inode),
                                      self.config.eager_wait))
        if len(self.accepts) > self.config.max_waiting:
            evicted = self._pop_accept(next(iter(self.accepts)))
            assert evicted is not None
            self.let_go(evicted, AcceptTimer, "accepts_evicted")

    def host_accepted(self, ev: HostAccepted) -> None:
        """A client's bind came on a host listener: a server connection, matched if its
        accept is here already."""
        core = self.core
        bind = ev.bind
        try:
            cid, tup = bind["cid"], FourTuple.from_body(bind)
        except (KeyError, TypeError):
            self.stats["bad_bind"] += 1
            core.emit(CloseSocket(ev.sock))
            return
        listener = self.listeners.by_host_sock(ev.listener)
        if (listener is None or (listener.addr, listener.port) != (tup.server_addr, tup.server_port)
                or core.policy.peer_of(tup.client_addr) != ev.peer or ev.peer == core.node
                or cid in core.conns or len(core.conns) >= self.config.max_connections):
            self.stats["bind_rejected"] += 1
            core.emit(CloseSocket(ev.sock))
            return
        conn = Conn(cid, Role.SERVER, ev.peer, tup, State.IDLE, host_sock=ev.sock,
                    host_inode=ev.inode)
        if bind.get("eager") is True:  # the client app is stopped: attempt 1 is eager
            conn.eager, conn.attempt = True, 1
        core.conns[cid] = conn
        accepted = self._pop_accept(tup)
        if accepted is not None:
            core.emit(CancelTimer(AcceptTimer(accepted.pid, accepted.fd, accepted.inode)))
            if accepted.stopped:
                key = (accepted.pid, accepted.fd, accepted.inode)
                core.emit(CancelTimer(EagerTimer(*key)))
                self.swap.gate.stop_move(accepted.pid, StoppedAccept(*key), cid)
            self._match(conn, accepted)
            self._eager_or_resume(conn, accepted.stopped)
        elif conn.eager and (not self.config.eager or not self._could_stop(tup)):
            self.swap.eager_decline(conn, WaitReason.NOT_STOPPED)
            core.unbound[tup] = cid
            core.emit(StartTimer(BindTimer(cid), self.config.bind_wait))
        else:  # the client may forget it (app closed during its host connect): expire it
            core.unbound[tup] = cid
            core.emit(StartTimer(BindTimer(cid), self.config.bind_wait))

    def _eager_or_resume(self, conn: Conn, stopped: bool) -> None:
        """A bind and its accept just met: run the eager swap if both apps are stopped for
        it; decline it if only the client is; resume a stopped server app nobody needs."""
        if conn.eager and stopped:
            self.swap.eager_serve(conn)
        elif conn.eager:
            self.swap.eager_decline(conn, WaitReason.NOT_STOPPED)
        elif stopped:
            assert conn.pid is not None
            self.swap.resume_if_last(conn.pid, conn.cid)

    def _could_stop(self, tup: FourTuple) -> bool:
        """An accept of `tup` may still come stopped (our listener is eager)."""
        return self.listeners.eager_local((tup.server_addr, tup.server_port))

    def eager_expired(self, timer: EagerTimer) -> None:
        """A stopped accept's client never sent its eager bind in time: let the app run."""
        tup = self.accepts_by_fd.get((timer.pid, timer.fd))
        acc = self.accepts.get(tup) if tup is not None else None
        if acc is None or acc.inode != timer.inode or not acc.stopped:
            self.stats["stale_timer"] += 1
            return
        assert tup is not None
        self.stats["eager_accept_expired"] += 1
        self.accepts[tup] = self.resume(acc, "")

    def resume(self, ev: T, why: str) -> T:
        """Let the app the tracer stopped for `ev` run again (unless another eager swap still
        holds that stop); `ev` is no longer stopped."""
        if why:
            self.stats[why] += 1
        self._release_stop(ev)
        return dataclasses.replace(ev, stopped=False)

    def _release_stop(self, ev: Traced) -> None:
        token = StoppedAccept(ev.pid, ev.fd, ev.inode)
        if token in self.swap.gate.stops.get(ev.pid, ()):
            self.core.emit(CancelTimer(EagerTimer(ev.pid, ev.fd, ev.inode)))
            self.swap.resume_if_last(ev.pid, token)
        elif not self.swap.gate.stopped(ev.pid):
            self.stats["resumed"] += 1
            self.core.emit(Resume(ev.pid))

    def _match(self, conn: Conn, ev: AcceptTraced) -> None:
        core = self.core
        if core.unbound.get(conn.tuple) == conn.cid:
            del core.unbound[conn.tuple]
        conn.pid, conn.fd, conn.inode, conn.overlay_sock = ev.pid, ev.fd, ev.inode, ev.sock
        core.by_fd[(ev.pid, ev.fd)] = conn.cid
        self.stats["bound"] += 1
        if not conn.eager:  # its client waited min_age: a long connection
            self.listeners.outcome((conn.tuple.server_addr, conn.tuple.server_port), long=True)

    def _pop_accept(self, tup: FourTuple) -> AcceptTraced | None:
        """Take a traced accept that waits for its bind out of `accepts` (and its index)."""
        acc = self.accepts.pop(tup, None)
        if acc is not None and self.accepts_by_fd.get((acc.pid, acc.fd)) == tup:
            del self.accepts_by_fd[(acc.pid, acc.fd)]
        return acc

    # -- expiry ----------------------------------------------------------------------------------

    def unmatched_expired(self, timer: WaitingTimer | AcceptTimer) -> None:
        """A traced connect never saw its listener announced, or an accept its bind: let go."""
        if isinstance(timer, WaitingTimer):
            waiting = self.waiting.get((timer.pid, timer.fd))
            if waiting is not None and waiting.inode == timer.inode:
                del self.waiting[(timer.pid, timer.fd)]
                self.let_go(waiting, None, "waiting_expired")
                return
        else:
            tup = self.accepts_by_fd.get((timer.pid, timer.fd))
            if tup is not None and self.accepts[tup].inode == timer.inode:
                acc = self._pop_accept(tup)
                assert acc is not None
                self.let_go(acc, None, "accepts_expired")
                return
        self.stats["stale_timer"] += 1

    def bind_expired(self, timer: BindTimer) -> None:
        """A bind never met its accept within `bind_wait`: close the host socket, forget it."""
        conn = self.core.conns.get(timer.cid)
        if (conn is None or conn.role is not Role.SERVER or conn.matched
                or conn.state is not State.IDLE or conn.outstanding is not None):
            return  # matched (or gone) meanwhile: nothing to do
        self.stats["binds_expired"] += 1
        log.info("connection %s: no accept within %.1f s of its bind; dropped", conn.tuple,
                 self.config.bind_wait)
        self.swap.finish(conn, notify=True)  # conn_closed: a client still waiting stops retrying

    # -- letting go ------------------------------------------------------------------------------

    def _reused(self, ev: Traced) -> None:
        """A new socket at (pid, fd): whatever was known under that fd is stale."""
        self.forget_fd(ev.pid, ev.fd)
        self.drop_unstarted(ev.pid, ev.fd)

    def let_go(self, ev: Traced, timer: type[FdTimer] | None, why: str,
               short: bool = False) -> None:
        """Leave a traced connection alone before any attempt: cancel its `timer` (the table
        it waited in), close our copy, count `why` and the outcome: short (closed before
        anything was tried) or skipped (a decision: not remote, ruled out, expired, full)."""
        if timer is not None:
            self.core.emit(CancelTimer(timer(ev.pid, ev.fd, ev.inode)))
        if ev.stopped:
            self._release_stop(ev)
        self.core.emit(CloseSocket(ev.sock))
        self.stats[why] += 1
        self.stats["traced_short" if short else "traced_skipped"] += 1

    def drop_unstarted(self, pid: int, fd: int) -> None:
        """Forget a traced connect or accept of `pid`/`fd` that has no swap yet."""
        ev = self.young.pop((pid, fd), None)
        if ev is not None:
            self.let_go(ev, YoungTimer, "closed_young", short=True)
        ev = self.waiting.pop((pid, fd), None)
        if ev is not None:
            self.let_go(ev, WaitingTimer, "closed_waiting_listener")
        tup = self.accepts_by_fd.get((pid, fd))
        if tup is not None:
            acc = self._pop_accept(tup)
            assert acc is not None
            self.let_go(acc, AcceptTimer, "closed_before_bind", short=True)
            self.listeners.outcome((acc.conn.server_addr, acc.conn.server_port), long=False)

    def unstarted_fds(self, pid: int) -> set[FdKey]:
        """Every fd of `pid` waiting in a table."""
        keys = {k for k in self.young if k[0] == pid} | {k for k in self.waiting if k[0] == pid}
        return keys | {k for k in self.accepts_by_fd if k[0] == pid}

    def moved(self, old: FdKey, new: FdKey) -> bool:
        """Carry unstarted state from holder `old` to `new`, restarting its wait (a full one)."""
        moved = False
        for table, timer, delay in ((self.young, YoungTimer, self.config.min_age),
                                    (self.waiting, WaitingTimer, self.config.listener_wait)):
            traced = table.pop(old, None)
            if traced is not None:
                self.core.emit(CancelTimer(timer(old[0], old[1], traced.inode)))
                table[new] = dataclasses.replace(traced, pid=new[0], fd=new[1])
                self.core.emit(StartTimer(timer(new[0], new[1], traced.inode), delay))
                moved = True
        tup = self.accepts_by_fd.pop(old, None)
        if tup is not None:
            acc = self.accepts[tup]
            self.core.emit(CancelTimer(AcceptTimer(acc.pid, acc.fd, acc.inode)))
            self.accepts[tup] = dataclasses.replace(acc, pid=new[0], fd=new[1])
            self.accepts_by_fd[new] = tup
            self.core.emit(StartTimer(AcceptTimer(new[0], new[1], acc.inode),
                                      self.config.bind_wait))
            moved = True
        return moved

    def holds_traced(self, pid: int, fd: int, sock: SockRef) -> bool:
        """Whether `sock`, the copy that came with a traced connect/accept, is kept."""
        for table in (self.young, self.waiting):
            ev = table.get((pid, fd))
            if ev is not None and ev.sock == sock:
                return True
        tup = self.accepts_by_fd.get((pid, fd))
        if tup is not None and self.accepts[tup].sock == sock:
            return True
        conn = self.core.conn_at(pid, fd)
        return conn is not None and conn.overlay_sock == sock

    def held_socks(self) -> set[SockRef]:
        """The copies of traced sockets still waiting."""
        refs = {w.sock for w in self.waiting.values()}
        refs.update(y.sock for y in self.young.values())
        refs.update(a.sock for a in self.accepts.values())
        return refs
