"""A simulated two-node world for the engine tests (a test double: no processes, no sockets).

Each node's daemon runs a real `Engine`; the world plays the tracer, the peer transport, the
injector and the kernel's sockets, executing every action the way the real adapters must:
result-bearing actions stay pending until the test completes them (success or failure, in any
order), so any interleaving can be produced.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

from ebpfrouter.engine import (
    AcceptTraced,
    ActionFailed,
    Bounce,
    BounceDone,
    CheckQueues,
    CloseTraced,
    ConnectTraced,
    ConnProbed,
    EagerListener,
    Engine,
    EngineConfig,
    Event,
    FdMoved,
    FourTuple,
    Freeze,
    FreezeDone,
    HostAccepted,
    HostClosed,
    HostConnect,
    HostConnected,
    HostListenerOpened,
    ListenTraced,
    NoteForgotten,
    OpenHostListener,
    PeerLost,
    PeerMessage,
    ProbeConn,
    ProcessExited,
    QueuesChecked,
    ReplaceDone,
    ReplaceFd,
    Resume,
    StartTimer,
    State,
    Thaw,
    TimerFired,
)
from ebpfrouter.runners import ACTION_RUNNERS, Family

CLIENT, SERVER = "node1", "node2"
OTHER = {CLIENT: SERVER, SERVER: CLIENT}
ACTIVE = {State.CONNECTING, State.AWAIT_FROZEN, State.FREEZING, State.CHECKING,
          State.AWAIT_CHECKED, State.AWAIT_REPLACED, State.REPLACING, State.AWAIT_CHECK,
          State.AWAIT_MIGRATE, State.MIGRATING, State.AWAIT_COMMIT, State.PROBING,
          State.ROLLING_BACK}


def peer_of(ip: str) -> str | None:
    if ip.startswith("10.244.1."):
        return CLIENT
    if ip.startswith("10.244.2."):
        return SERVER
    return None


class Violation(AssertionError):
    """An invariant broke during the run."""


def check_accounting(engine: Engine) -> None:
    """Every traced connect/accept is in exactly one place: swapped, left on the overlay,
    short, skipped, still in a connection, or still waiting in a table."""
    stats = engine.stats
    traced = stats["connects_traced"] + stats["accepts_traced"]
    live = sum(1 for c in engine.conns.values() if c.state is not State.SWAPPED
               and (c.role.value == "client" or c.matched))
    placed = (stats["swapped"] + stats["left_on_overlay"] + stats["traced_short"]
              + stats["traced_skipped"] + live + len(engine.young) + len(engine.waiting)
              + len(engine.accepts))
    if traced != placed:
        raise Violation(f"{traced} traced, {placed} accounted for: {dict(stats)}")


def check_indexes(engine: Engine) -> None:
    """The engine's lookup indexes agree with the tables they index."""
    by_fd = {(a.pid, a.fd): tup for tup, a in engine.accepts.items()}
    if by_fd != engine.accepts_by_fd:
        raise Violation(f"accepts_by_fd {engine.accepts_by_fd} != {by_fd}")
    for tup, cid in engine.unbound.items():
        conn = engine.conns.get(cid)
        if conn is None or conn.matched or conn.tuple != tup:
            raise Violation(f"unbound {tup} -> {cid!r} names no unmatched connection")


@dataclasses.dataclass(eq=False)
class Sock:
    kind: str  # overlay, host, listener
    node: str
    inode: int
    conn: int  # index of the connection it belongs to (-1: listener)


@dataclasses.dataclass
class Proc:
    pid: int
    node: str
    fds: dict[int, Sock]
    frozen: int = 0  # holds: swaps sharing one stop (the injector counts them the same way)
    alive: bool = True
    stopped: bool = False  # stopped by the tracer at connect()/accept() return (eager)


class Daemon:
    def __init__(self, world: World, node: str, **config: Any) -> None:
        self.world = world
        self.node = node
        self.engine = Engine(EngineConfig(node, **config), peer_of,
                             new_cid=lambda: next(world.cids),
                             server_ready=lambda conn: world.app_read,
                             shared=lambda conn: world.shared[node])
        self.handles: dict[int, Sock] = {}
        self.timers: list[tuple[Any, ...]] = []
        self.alive = True


@dataclasses.dataclass(frozen=True)
class SimRunner:
    """The world's fake runner of one family of actions (`ebpfrouter.runners.Family`):
    `run(node, action)` does it at once or leaves it pending; `complete(node, action, proc,
    busy)` finishes a pending one successfully."""

    run: Callable[[str, Any], None]
    complete: Callable[[str, Any, Proc, bool], None]


class World:
    """Two daemons, one client process, one server process, `n` overlay connections.

    `unread` is (client side, server side): unread bytes each overlay socket holds while
    frozen, which the swap must bounce over the host connection before handing it over.
    """

    def __init__(self, n: int = 1, unread: tuple[int, int] = (0, 0), eager: bool = False,
                 **config: Any) -> None:
        """`eager`: the tracer stops both apps at connect()/accept() return (every listener
        eager); the apps must end up resumed whatever happens."""
        self.cids = (bytes([i]) * 16 for i in itertools.count(1))
        self.inodes = itertools.count(1000)
        self.handle_ids = itertools.count(1)
        config.setdefault("probe_limit", 3)
        if eager:
            config.setdefault("eager_mode", "always")
        self.daemons = {node: Daemon(self, node, **config) for node in (CLIENT, SERVER)}
        self.runners: dict[Family, SimRunner] = {
            Family.HOST: SimRunner(self._pend, self._complete_host),
            Family.DATAPATH: SimRunner(self._pend, self._complete_datapath),
            Family.INJECTION: SimRunner(self._run_injection, self._complete_injection),
            Family.PEERS: SimRunner(self._run_peers, self._done_at_once),
            Family.TIMERS: SimRunner(self._run_timers, self._done_at_once),
            Family.SOCKETS: SimRunner(self._run_sockets, self._done_at_once),
            Family.STATUS: SimRunner(self._run_status, self._done_at_once),
            Family.KERNEL: SimRunner(self._run_kernel, self._done_at_once),
        }
        self.eager_maps: dict[str, set[tuple[str, Any]]] = {CLIENT: set(), SERVER: set()}
        self.procs = {CLIENT: Proc(100, CLIENT, {}), SERVER: Proc(200, SERVER, {})}
        self.net: dict[tuple[str, str], collections.deque[tuple[str, dict]]] = {
            (CLIENT, SERVER): collections.deque(), (SERVER, CLIENT): collections.deque()}
        self.link_up = True
        self.inbox: dict[str, list[Event]] = {CLIENT: [], SERVER: []}
        self.pending: list[tuple[str, Any]] = []
        self.log: list[tuple[str, str]] = []  # (node, action/event name) in execution order
        self.actions: list[tuple[str, Any]] = []  # (node, action) as the engines emitted them
        self.host_pairs: dict[int, tuple[Sock, Sock]] = {}
        self.host_closed_sent: set[int] = set()  # id() of socks already reported closed
        self.n = n
        self.app_read = True  # the server app has read from its connections (server_ready)
        self.shared = {CLIENT: False, SERVER: False}  # a second process holds the sockets
        self.handed_off: set[str] = set()  # nodes whose process forked and let go (once)
        self.parents: dict[str, list[Proc]] = {CLIENT: [], SERVER: []}  # those who let go
        self.unread = {CLIENT: unread[0], SERVER: unread[1]}
        self.bounced: set[tuple[str, int]] = set()  # (node, connection) whose bounce is done
        self.overlay_pairs: dict[int, tuple[Sock, Sock]] = {}
        self.tuples = [FourTuple("10.244.1.2", 40000 + i, "10.244.2.2", 5201) for i in range(n)]
        for i, tup in enumerate(self.tuples):
            c = Sock("overlay", CLIENT, next(self.inodes), i)
            s = Sock("overlay", SERVER, next(self.inodes), i)
            self.overlay_pairs[i] = (c, s)
            self.procs[CLIENT].fds[5 + i] = c
            self.procs[SERVER].fds[50 + i] = s
            ch = self._hold(CLIENT, c)
            sh = self._hold(SERVER, s)
            self.inbox[CLIENT].append(ConnectTraced(100, 5 + i, c.inode, tup, ch, eager))
            self.inbox[SERVER].append(AcceptTraced(200, 50 + i, s.inode, tup, sh, eager))
        for proc in self.procs.values():
            proc.stopped = eager
        self.feed(SERVER, ListenTraced(200, 49, next(self.inodes), "10.244.2.2", 5201))
        if eager:  # the listener is announced (eager) before the connects: the kernel stopped
            # them because the client's map already had it
            self.complete(next(i for i, (_, a) in enumerate(self.pending)
                               if isinstance(a, OpenHostListener)))
            while self.net[(SERVER, CLIENT)]:
                self.deliver(SERVER)

    # -- plumbing ----------------------------------------------------------------------------

    def _hold(self, node: str, sock: Sock) -> int:
        ref = next(self.handle_ids)
        self.daemons[node].handles[ref] = sock
        return ref

    def holders(self, sock: Sock) -> int:
        count = sum(1 for p in self.procs.values() if p.alive for s in p.fds.values() if s is sock)
        return count + sum(1 for d in self.daemons.values() if d.alive
                           for s in d.handles.values() if s is sock)

    def feed(self, node: str, event: Event) -> None:
        daemon = self.daemons[node]
        if not daemon.alive:
            return
        self.log.append((node, type(event).__name__))
        for action in daemon.engine.handle(event):
            self.log.append((node, type(action).__name__))
            self.actions.append((node, action))
            self._apply(node, action)
        self._notice_closed_hosts()

    def _notice_closed_hosts(self) -> None:
        """A daemon holding one end of a host connection sees EOF when nobody holds the other."""
        for c, s in self.host_pairs.values():
            for mine, theirs in ((c, s), (s, c)):
                daemon = self.daemons[mine.node]
                refs = [r for r, k in daemon.handles.items() if k is mine]
                if (daemon.alive and refs and self.holders(theirs) == 0
                        and id(mine) not in self.host_closed_sent):
                    self.host_closed_sent.add(id(mine))
                    self.inbox[mine.node].append(HostClosed(refs[0]))

    def _apply(self, node: str, action: Any) -> None:
        self.runners[ACTION_RUNNERS[type(action)]].run(node, action)

    # -- the fake runners, one per family of actions (looked up in ACTION_RUNNERS) ---------------

    def _pend(self, node: str, action: Any) -> None:
        """A result-bearing action: pending until the test completes it."""
        self.pending.append((node, action))

    def _run_peers(self, node: str, action: Any) -> None:
        if self.link_up:
            self.net[(node, OTHER[node])].append((action.type, action.body))

    def _run_kernel(self, node: str, action: Any) -> None:
        key = ((action.addr, action.port, action.remote) if isinstance(action, EagerListener)
               else ("peer", action.peer))
        (self.eager_maps[node].add if action.on else self.eager_maps[node].discard)(key)

    def _run_injection(self, node: str, action: Any) -> None:
        if isinstance(action, Thaw):
            proc = self.proc_of(node, action.pid)
            proc.frozen = max(0, proc.frozen - 1)
        elif isinstance(action, Resume):
            self.proc_of(node, action.pid).stopped = False  # (the runner defers it past thaws)
        elif isinstance(action, NoteForgotten):
            pass
        else:
            self._pend(node, action)

    def _run_sockets(self, node: str, action: Any) -> None:
        daemon = self.daemons[node]
        if action.sock not in daemon.handles:
            raise Violation(f"{node}: CloseSocket of unknown handle {action.sock}")
        del daemon.handles[action.sock]

    def _run_timers(self, node: str, action: Any) -> None:
        daemon = self.daemons[node]
        if isinstance(action, StartTimer):
            daemon.timers.append(action.key)
        else:
            daemon.timers = [k for k in daemon.timers if k != action.key]

    def _run_status(self, node: str, action: Any) -> None:
        proc = self.proc_of(node, action.pid)
        if proc.fds.get(action.fd) is None or proc.fds[action.fd].kind != "host":
            raise Violation(f"{node}: {action} but fd {action.fd} is not the host socket")

    def _done_at_once(self, node: str, action: Any, proc: Proc, busy: bool) -> None:
        raise AssertionError(f"{action} has no result to complete")  # pragma: no cover

    def _complete_host(self, node: str, action: Any, proc: Proc, busy: bool) -> None:
        ref = action.ref
        if isinstance(action, OpenHostListener):
            sock = Sock("listener", node, next(self.inodes), -1)
            self.feed(node, HostListenerOpened(ref, self._hold(node, sock), "192.168.77.2", 41000))
            return
        assert isinstance(action, HostConnect), action
        i = next(k for k, t in enumerate(self.tuples) if FourTuple.from_body(action.bind) == t)
        c = Sock("host", CLIENT, next(self.inodes), i)
        s = Sock("host", SERVER, next(self.inodes), i)
        self.host_pairs[i] = (c, s)
        sd = self.daemons[SERVER]
        listener = next((r for r, k in sd.handles.items() if k.kind == "listener"), -1)
        if sd.alive and self.link_up:
            self.inbox[SERVER].append(HostAccepted(listener, self._hold(SERVER, s), s.inode,
                                                   CLIENT, dict(action.bind)))
        self.feed(node, HostConnected(ref, self._hold(node, c), c.inode))

    def _complete_injection(self, node: str, action: Any, proc: Proc, busy: bool) -> None:
        daemon, ref = self.daemons[node], action.ref
        if isinstance(action, Freeze):
            if not proc.alive:
                self.feed(node, ActionFailed(ref, "no such process"))
                return
            proc.frozen += 1
            self.feed(node, FreezeDone(ref))
            return
        assert isinstance(action, ReplaceFd), action
        if not proc.alive:
            self.feed(node, ActionFailed(ref, "no such process"))
            return
        if not proc.frozen:
            raise Violation(f"{node}: ReplaceFd in a running process")
        current = proc.fds.get(action.fd)
        new = daemon.handles[action.sock]
        if (new.kind == "host" and any(self.unread.values())
                and (node, new.conn) not in self.bounced):
            raise Violation(f"{node}: host socket handed over before its bounce")
        if current is None or current.inode != action.expected_inode:
            self.feed(node, ActionFailed(ref, "fd changed"))
            return
        proc.fds[action.fd] = daemon.handles[action.sock]
        self.feed(node, ReplaceDone(ref))

    def _complete_datapath(self, node: str, action: Any, proc: Proc, busy: bool) -> None:
        daemon, ref = self.daemons[node], action.ref
        if isinstance(action, CheckQueues):  # (a client's SYN is one acknowledged byte)
            # (what the other side sent us was acknowledged: it counts in its bytes_acked)
            self.feed(node, QueuesChecked(ref, 1 if busy else 0, self.unread[node],
                                          (5 if busy else 0) + (node == CLIENT)
                                          + self.unread[OTHER[node]], self.unread[node]))
        elif isinstance(action, Bounce):
            i = daemon.handles[action.host_sock].conn
            frozen = any(p.frozen for p in (proc, *self.parents[node]))
            if (proc.alive and not frozen) or (action.send_len, action.echo_len) != (
                    self.unread[node], self.unread[OTHER[node]]):
                raise Violation(f"{node}: {action} (process frozen: {proc.frozen})")
            theirs = self.host_pairs[i][0 if node == SERVER else 1]
            if action.echo_len and self.holders(theirs) == 0:
                self.feed(node, ActionFailed(ref, "host connection closed mid-bounce"))
                return
            self.bounced.add((node, i))
            self.feed(node, BounceDone(ref))
        else:
            assert isinstance(action, ProbeConn), action
            mine = daemon.handles[action.overlay_sock]
            i = mine.conn
            peer_node = OTHER[node]
            overlay = self.overlay_pairs[i][0 if peer_node == CLIENT else 1]
            host = self.host_pairs[i][0 if peer_node == CLIENT else 1]
            self.feed(node, ConnProbed(ref, self.holders(overlay) == 0, self.holders(host) == 0))

    # -- moves -------------------------------------------------------------------------------

    def complete(self, index: int, ok: bool = True, busy: bool = False) -> None:
        """Finish pending action `index` (successfully or not)."""
        node, action = self.pending.pop(index)
        daemon = self.daemons[node]
        if not daemon.alive:
            return
        pid = getattr(action, "pid", None)
        proc = self.procs[node] if pid is None else self.proc_of(node, pid)
        if not ok:
            self.feed(node, ActionFailed(action.ref, "injected failure"))
            return
        self.runners[ACTION_RUNNERS[type(action)]].complete(node, action, proc, busy)

    def deliver(self, src: str) -> None:
        msg_type, body = self.net[(src, OTHER[src])].popleft()
        self.feed(OTHER[src], PeerMessage(src, msg_type, body))

    def deliver_inbox(self, node: str, index: int = 0) -> None:
        self.feed(node, self.inbox[node].pop(index))

    def deliverable(self, node: str) -> list[int]:
        """Inbox events that may come next (a host close only after that host's accept)."""
        inbox = self.inbox[node]
        accepted = {e.sock for e in inbox if isinstance(e, HostAccepted)}
        return [i for i, e in enumerate(inbox)
                if not (isinstance(e, HostClosed) and e.sock in accepted)]

    def fire(self, node: str, index: int) -> None:
        key = self.daemons[node].timers.pop(index)
        self.feed(node, TimerFired(key))

    def timer_allowed(self, node: str, key: tuple[Any, ...]) -> bool:
        """Timing assumption: the server's last probe comes after the client decided."""
        engine = self.daemons[node].engine
        conn = engine.conns.get(key[1]) if len(key) == 3 else None
        if node != SERVER or conn is None or conn.state not in (State.AWAIT_COMMIT,
                                                                  State.PROBING):
            return True
        if conn.now.probes < engine.config.probe_limit - 1:
            return True
        client = self.daemons[CLIENT]
        other = client.engine.conns.get(conn.cid) if client.alive else None
        return other is None or other.state not in ACTIVE

    def cut_link(self) -> None:
        self.link_up = False
        for queue in self.net.values():
            queue.clear()
        self.feed(CLIENT, PeerLost(SERVER))
        self.feed(SERVER, PeerLost(CLIENT))

    def crash(self, node: str) -> None:
        """The daemon dies: its sockets close, ptrace lets go (the process runs on)."""
        daemon = self.daemons[node]
        daemon.alive = False
        daemon.handles.clear()
        daemon.timers.clear()
        self.procs[node].frozen = 0
        self.procs[node].stopped = False  # the guardian's SIGCONT
        self.pending = [(n, a) for n, a in self.pending if n != node]
        self.inbox[node].clear()
        self.link_up = False
        for queue in self.net.values():
            queue.clear()
        self.feed(OTHER[node], PeerLost(node))
        self._notice_closed_hosts()

    def app_close(self, node: str, i: int) -> None:
        proc = self.procs[node]
        fd = (5 if node == CLIENT else 50) + i
        if proc.fds.pop(fd, None) is not None:
            self.inbox[node].append(CloseTraced(proc.pid, fd))

    def proc_of(self, node: str, pid: int) -> Proc:
        """The process `pid` of `node`: its app, or a parent that handed the app its sockets."""
        for proc in (self.procs[node], *self.parents[node]):
            if proc.pid == pid:
                return proc
        raise Violation(f"{node}: action on pid {pid}, which never existed")

    def app_hand_off(self, node: str) -> None:
        """The app forks and the parent closes its copies (PostgreSQL's postmaster): the
        sockets live on in the child, at the same fds, which the daemon reports as moves.
        (A frozen process makes no syscalls: only offered while it runs and no action on it
        is under way, since the world has one process per node and cannot keep the parent.)"""
        proc = self.procs[node]
        old = proc.pid
        self.parents[node].append(Proc(old, node, {}))  # lives on, holding none of them
        proc.pid = old + 1
        self.handed_off.add(node)
        for fd in sorted(proc.fds):
            self.feed(node, FdMoved(old, fd, proc.pid, fd))

    def app_exit(self, node: str) -> None:
        proc = self.procs[node]
        proc.alive = False
        proc.frozen = 0
        proc.fds.clear()
        self.inbox[node].append(ProcessExited(proc.pid))

    # -- running -----------------------------------------------------------------------------

    def moves(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Every possible next step (for random interleavings)."""
        out: list[tuple[str, tuple[Any, ...]]] = []
        for node in (CLIENT, SERVER):
            out += [("inbox", (node, i)) for i in self.deliverable(node)]
            if self.link_up and self.net[(node, OTHER[node])]:
                out.append(("deliver", (node,)))
            out += [("fire", (node, i)) for i, key in enumerate(self.daemons[node].timers)
                    if self.timer_allowed(node, key)]
        out += [("complete", (i,)) for i in range(len(self.pending))]
        out += [("hand_off", (node,)) for node in (CLIENT, SERVER)
                if node not in self.handed_off and self.procs[node].alive
                and not self.procs[node].frozen and not self.procs[node].stopped
                and self.daemons[node].alive
                and not any(n == node for n, _ in self.pending)
                and not any(isinstance(e, (ConnectTraced, AcceptTraced))
                            for e in self.inbox[node])]  # traced before the fork
        return out

    def step_default(self) -> bool:
        """One step of a fault-free scheduler; False when nothing is left to do."""
        for node in (CLIENT, SERVER):
            if self.inbox[node]:
                self.deliver_inbox(node, self.deliverable(node)[0])
                return True
        if self.pending:
            self.complete(0)
            return True
        for node in (CLIENT, SERVER):
            if self.link_up and self.net[(node, OTHER[node])]:
                self.deliver(node)
                return True
        for node in (CLIENT, SERVER):
            for i, key in enumerate(self.daemons[node].timers):
                if self.timer_allowed(node, key):
                    self.fire(node, i)
                    return True
        return False

    def drain(self, limit: int = 20000) -> None:
        for _ in range(limit):
            if not self.step_default():
                return
        raise Violation("no quiescence (livelock?)")

    def check_final(self) -> list[str]:
        """The invariants once everything settled; returns each connection's outcome."""
        outcomes = []
        for node, proc in self.procs.items():
            if any(p.frozen for p in (proc, *self.parents[node]) if p.alive):
                raise Violation(f"{node}: process left frozen")
            if proc.alive and proc.stopped:
                raise Violation(f"{node}: process left stopped by the tracer")
        for node, daemon in self.daemons.items():
            if not daemon.alive:
                continue
            engine = daemon.engine
            if engine.busy_pids:
                raise Violation(f"{node}: busy pids left {engine.busy_pids}")
            for conn in engine.conns.values():
                if conn.state is not State.SWAPPED:
                    raise Violation(f"{node}: connection left in {conn.state}")
            check_indexes(engine)
            check_accounting(engine)
            kept = {w.sock for w in engine.waiting.values()}
            kept |= {y.sock for y in engine.young.values()}
            kept |= {a.sock for a in engine.accepts.values()}
            leaked = [s for r, s in daemon.handles.items() if s.kind != "listener"
                      and r not in kept]
            if leaked and all(c.state is State.SWAPPED for c in engine.conns.values()):
                raise Violation(f"{node}: daemon still holds {leaked}")
        for i in range(self.n):
            c = self.procs[CLIENT].fds.get(5 + i) if self.procs[CLIENT].alive else None
            s = self.procs[SERVER].fds.get(50 + i) if self.procs[SERVER].alive else None
            if c is None or s is None:
                outcomes.append("closed")
                continue
            if c.kind == s.kind == "overlay":
                outcomes.append("overlay")
            elif c.kind == s.kind == "host" and self.host_pairs[i] == (c, s):
                if any(self.unread.values()) and not {(CLIENT, i), (SERVER, i)} <= self.bounced:
                    raise Violation(f"connection {i} swapped without carrying unread bytes")
                outcomes.append("swapped")
            else:
                raise Violation(f"connection {i} one-sided: client {c.kind}, server {s.kind}")
        return outcomes
