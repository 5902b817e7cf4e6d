"""Node scoping: a tracer `SocketEvent` becomes engine events, or nothing.

Only sockets of this node's pods matter (its pod CIDRs, and its pods' network namespaces when
those are known); the engine is told about listens, accepts and connects between them and
other nodes, about closes and exits, and about sockets that change process (`FdMoved`, with
`holders.SocketHolders` following forks). Traced sockets are not copied here: the engine is
given a handle from `socktable.SocketTable.copy_later`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable
from typing import Any

from injector.errors import InjectorError
from injector.inspect import getfd
from injector.netns import run_in_netns

from . import hostnet
from .engine import Conn
from .engine.events import (
    AcceptTraced,
    CloseTraced,
    ConnectTraced,
    FdMoved,
    FourTuple,
    ListenTraced,
    ProcessExited,
    SockRef,
    StopUnclaimed,
)
from .holders import SocketHolders
from .hostnet import IPNetwork
from .k8s.link import ClusterLink
from .socktable import SocketTable
from .tracer import EventKind, SocketEvent
from .wiring import Wiring

log = logging.getLogger(__name__)

EINPROGRESS = 115
MAX_CHILDREN = 64  # forks remembered per process (a forked young connection's holders)


def normalize_addr(addr: str | None) -> str | None:
    """IPv4-mapped IPv6 (`::ffff:a.b.c.d`, a dual-stack socket) as plain IPv4."""
    if not addr or ":" not in addr:
        return addr  # IPv4 (or nothing): as is
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def netns_ipv4_addresses(pid: int) -> list[str]:
    """IPv4 addresses of the network namespace of `pid` (read from a helper thread)."""

    def read() -> list[str]:
        from pyroute2 import IPRoute

        found = []
        with IPRoute() as ipr:
            for addr in ipr.get_addr(family=2):
                value = addr.get_attr("IFA_ADDRESS")
                if value and not value.startswith("127."):
                    found.append(str(value))
        return found

    return run_in_netns(pid, read, timeout=5)  # the thread dies with its netns


def still_holds(pid: int, fd: int, inode: int) -> bool:
    """Whether fd `fd` of `pid` is socket `inode` now (a pidfd_getfd copy, closed at once)."""
    try:
        copy = getfd(pid, fd)
    except (InjectorError, OSError):
        return False
    try:
        return os.fstat(copy).st_ino == inode
    finally:
        os.close(copy)


def tgid_of(pid: int) -> int | None:
    """The thread group of task `pid` (== pid for a process), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class NodeScope:
    """This node (its name, host address, pod CIDRs, pods' netns) and the traced sockets it
    owns. `node`, `host_addr`, `pod_cidrs`, `cluster` and `local_netns` are set at start."""

    def __init__(self, wiring: Wiring, sockets: SocketTable, peer_map: hostnet.PeerMap,
                 pod_cidrs: list[IPNetwork]) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.peer_map = peer_map
        self.pod_cidrs = pod_cidrs
        self.node = ""
        self.host_addr = ""
        self.cluster: ClusterLink | None = None
        self.local_netns: set[int] | None = None  # only these netns' pods (None: any)
        self.holders = SocketHolders()  # which processes hold each traced socket (forks)
        self.traced_at: dict[tuple[int, int], int] = {}  # (pid, fd) -> when traced (ns)
        self.addr_cache: dict[int, list[str]] = {}  # pid -> its netns' IPv4 addresses
        self.children: dict[int, collections.deque[int]] = {}  # pid -> its last forks
        self._memo: dict[tuple[str, str | None], Any] = {}  # see `_remember`

    # -- addresses ---------------------------------------------------------------------------

    def in_scope(self, netns: int | None) -> bool:
        """Whether network namespace `netns` may hold this node's pods."""
        return self.local_netns is None or netns in self.local_netns

    def forget_addresses(self) -> None:
        """Drop remembered answers (the peer map, pod CIDRs or Nodes may have changed)."""
        self._memo.clear()

    def _remember(self, kind: str, addr: str | None, compute: Callable[[Any], Any]) -> Any:
        """`compute(addr)`, remembered until the next housekeeping tick (the peer map, pod
        CIDRs and Nodes change slowly; every traced connection asks about two addresses)."""
        key = (kind, addr)
        if key in self._memo:
            return self._memo[key]
        if len(self._memo) >= 4096:
            self._memo.clear()
        value = self._memo[key] = compute(addr)
        return value

    def peer_of(self, addr: str) -> str | None:
        """The node (its host address) owning overlay address `addr`; None if not overlay."""
        return self._remember("peer", addr, self._peer_of)

    def _peer_of(self, addr: str) -> str | None:
        if hostnet.in_any(addr, self.pod_cidrs):
            return self.node
        if self.cluster is not None:  # Node objects first, then --peer and overlay routes
            host = self.cluster.peer_for(addr)
            if host is not None:
                self.wiring.counters["peer_from_nodes"] += 1
                return self.node if host == self.host_addr else host
        return self.peer_map.lookup(addr)

    def cidrs_of(self, peer: str) -> list[IPNetwork]:
        """The pod CIDRs node `peer` (its host address) serves, as far as this node knows."""
        nets = [net for table in (self.peer_map.static, self.peer_map.discovered)
                for net, host in table.items() if host == peer]
        if self.cluster is not None:
            for route in self.cluster.sources.peers.nodes():
                if any(route.host_ip_for(net.version) == peer for net in route.pod_cidrs):
                    nets.extend(route.pod_cidrs)
        return sorted(set(nets), key=str)

    def local(self, addr: str | None) -> bool:
        """Whether `addr` is in this node's pod CIDRs."""
        return self._remember("local", addr,
                              lambda a: hostnet.in_any(a, self.pod_cidrs))

    def cluster_hosts(self) -> set[str]:
        """Other nodes' host addresses, from the Kubernetes Node objects."""
        return self.cluster.peer_hosts() - {self.host_addr} if self.cluster is not None else set()

    def peer_hosts(self) -> set[str]:
        """Every peer node's host address (peer map and Kubernetes)."""
        return self.peer_map.hosts() | self.cluster_hosts()

    # -- what the engine and the other parts ask -----------------------------------------------

    def traced_since(self, pid: int, fd: int) -> int | None:
        """When the connection at `pid`/`fd` was traced (monotonic ns), if it was."""
        return self.traced_at.get((pid, fd))

    def take_traced_at(self, pid: int, fd: int) -> int | None:
        """`traced_since`, forgotten (the connection was swapped)."""
        return self.traced_at.pop((pid, fd), None)

    def shared(self, conn: Conn) -> bool:
        """Whether another process holds `conn`'s overlay socket too (just forked): a swap
        would replace only one holder's fd. Holders whose fd no longer is that socket (closed
        without a traced close: close-on-exec, close_range) are dropped first."""
        if conn.inode is None or len(self.holders.holders(conn.inode)) <= 1:
            return False
        return len(self.holders.prune(conn.inode, still_holds)) > 1

    def prune_exited(self) -> None:
        """Drop holders whose process is gone (exits the tracer could not report: its pids
        map is LRU)."""
        gone = [pid for pid in self.holders.pids() if not os.path.exists(f"/proc/{pid}")]
        if gone:
            self.wiring.counters["holders_pruned"] += self.holders.drop_pids(gone)
        for pid in [p for p in self.children if not os.path.exists(f"/proc/{p}")]:
            del self.children[pid]

    # -- tracer events -------------------------------------------------------------------------

    def on_socket_event(self, ev: SocketEvent) -> None:
        """One tracer event: feed the engine what it means for this node, if anything."""
        kind = ev.kind
        if kind == EventKind.EXIT:
            self._exited(ev.pid)
        elif kind == EventKind.FORK:
            self._forked(ev)
        elif kind == EventKind.EXEC:
            self._execed(ev.pid)
        elif kind == EventKind.CLOSE:
            if self.in_scope(ev.netns):
                self._closed(ev.pid, ev.fd)
        elif kind == EventKind.LISTEN:
            if self._wanted(ev):
                self._listened(ev)
        elif kind in (EventKind.ACCEPT, EventKind.CONNECT):
            if ev.forked:  # closed young by a process that forked since: a child's now
                self._adopted(ev)
                return
            fed = self._wanted(ev) and (self._accepted(ev) if kind == EventKind.ACCEPT
                                        else self._connected(ev))
            if ev.stopped and not fed:  # stopped for the eager swap, but not ours to follow
                self.wiring.feed(StopUnclaimed(ev.pid))

    def _wanted(self, ev: SocketEvent) -> bool:
        """A listen, accept or connect that succeeded (or is in progress), of this node's
        pods, while the daemon is not shutting down."""
        if ev.ret < 0 and not (ev.kind == EventKind.CONNECT and ev.ret == -EINPROGRESS):
            return False
        return not self.wiring.draining and self.in_scope(ev.netns)

    def _exited(self, pid: int) -> None:
        self.addr_cache.pop(pid, None)
        self.children.pop(pid, None)
        for fd, _, left in self.holders.exited(pid):
            if left:
                self._moved(pid, fd, left)
        for key in [k for k in self.traced_at if k[0] == pid]:
            del self.traced_at[key]
        self.wiring.feed(ProcessExited(pid))

    def _listened(self, ev: SocketEvent) -> None:
        for addr in self._listen_addrs(ev.pid, normalize_addr(ev.laddr)):
            self.wiring.counters["listens"] += 1
            self.holders.add(ev.pid, ev.fd, ev.sock_ino)  # pre-forked workers inherit it
            self.wiring.feed(ListenTraced(ev.pid, ev.fd, ev.sock_ino, addr, ev.lport))

    def _accepted(self, ev: SocketEvent) -> bool:
        """Feed a traced accept of this node's pods (False: not ours)."""
        laddr, raddr = normalize_addr(ev.laddr), normalize_addr(ev.raddr)
        if not self.local(laddr):
            return False
        conn = FourTuple(str(raddr), ev.rport, str(laddr), ev.lport)
        sock = self.sockets.copy_later(ev.pid, ev.fd, ev.sock_ino)
        self.wiring.counters["seen"] += 1
        self.traced_at[(ev.pid, ev.fd)] = ev.ts_ns
        self._feed_traced(AcceptTraced(ev.pid, ev.fd, ev.sock_ino, conn, sock, ev.stopped))
        return True

    def _connected(self, ev: SocketEvent) -> bool:
        """Feed a traced connect of this node's pods (False: not ours)."""
        laddr, raddr = normalize_addr(ev.laddr), normalize_addr(ev.raddr)
        if raddr is None or not self.local(laddr) and laddr not in (None, "0.0.0.0"):
            return False
        sock = self.sockets.copy_later(ev.pid, ev.fd, ev.sock_ino)
        if not laddr or laddr == "0.0.0.0" or not ev.lport:  # not bound yet at the event
            copy = self.sockets.get(sock)
            if copy is None:
                return False
            laddr, lport = copy.getsockname()[:2]
            laddr = normalize_addr(laddr)
        else:
            lport = ev.lport
        if not self.local(laddr):
            self.sockets.close(sock)
            return False
        self.wiring.counters["seen"] += 1
        self.traced_at[(ev.pid, ev.fd)] = ev.ts_ns
        conn = FourTuple(str(laddr), lport, raddr, ev.rport)
        self._feed_traced(ConnectTraced(ev.pid, ev.fd, ev.sock_ino, conn, sock, ev.stopped,
                                        aged=ev.aged))
        return True

    def _feed_traced(self, event: AcceptTraced | ConnectTraced) -> None:
        """Feed a traced connection; close our copy at once if the engine did not keep it."""
        self.wiring.feed(event)
        if self.wiring.running_engine.holds_traced(event.pid, event.fd, event.sock):
            self.holders.add(event.pid, event.fd, event.inode)  # followed through forks
        else:
            self.sockets.close(event.sock)

    def _listen_addrs(self, pid: int, laddr: str | None) -> list[str]:
        if laddr and laddr not in ("0.0.0.0", "::"):
            return [laddr] if self.local(laddr) else []
        if pid not in self.addr_cache:
            try:
                self.addr_cache[pid] = netns_ipv4_addresses(pid)
            except OSError as exc:
                log.info("pid %d: cannot read its addresses: %s", pid, exc)
                return []
        return [a for a in self.addr_cache[pid] if self.local(a)]

    # -- sockets that change process -----------------------------------------------------------

    def _closed(self, pid: int, fd: int) -> None:
        """A traced close: the end of the socket, or of one holder's copy of it."""
        removed = self.holders.remove(pid, fd)
        if removed is not None and removed[1]:
            self._moved(pid, fd, removed[1])
            return
        self.traced_at.pop((pid, fd), None)
        self.wiring.feed(CloseTraced(pid, fd))

    def _moved(self, pid: int, fd: int, left: set[tuple[int, int]]) -> None:
        """`pid` let go of the socket at `fd`; a process in `left` still holds it: carry the
        connection (or listener) over to the newest holder that really has it."""
        inode = None
        for holder in sorted(left, key=lambda h: h[0]):
            inode = inode or self.holders.inode_of(*holder)
        alive = self.holders.prune(inode, still_holds) if inode is not None else set()
        if not alive:  # the other holders are gone too: the socket was closed
            self.traced_at.pop((pid, fd), None)
            self.wiring.feed(CloseTraced(pid, fd))
            return
        new_pid, new_fd = self.holders.successor(alive)
        self.wiring.counters["fd_moves"] += 1
        log.info("pid %d fd %d: the socket lives on in pid %d fd %d", pid, fd, new_pid, new_fd)
        self.sockets.moved(pid, fd, new_pid, new_fd)
        started = self.traced_at.pop((pid, fd), None)
        if started is not None:
            self.traced_at[(new_pid, new_fd)] = started
        self.wiring.feed(FdMoved(pid, fd, new_pid, new_fd))

    def _forked(self, ev: SocketEvent) -> None:
        """A process holding traced sockets forked: the child holds them too (same fds)."""
        child = ev.child_pid
        if child is None or child == ev.pid:
            return
        tracer = self.wiring.tracer
        if tgid_of(child) != child:  # a new thread (same fd table), or already gone
            if tracer is not None:
                tracer.forget_pid(child)
            return
        kids = self.children.get(ev.pid)
        if kids is None:
            kids = self.children[ev.pid] = collections.deque(maxlen=MAX_CHILDREN)
        kids.append(child)
        got = self.holders.forked(ev.pid, child)
        if not got:
            return
        self.wiring.counters["forks_followed"] += 1
        if tracer is not None:
            for fd, inode in got:  # so the child's closes and exit are reported
                with contextlib.suppress(Exception):
                    tracer.track(child, fd, inode=inode, netns=ev.netns)

    def _adopted(self, ev: SocketEvent) -> None:
        """A connect or accept the kernel held while young, reported at its close by `ev.pid`
        because that process forked since (PostgreSQL's postmaster: accept, fork, close): the
        connection lives on in the children that still hold its fd. Each is tracked (its close
        and exit are reported), the newest is fed as the connection's holder."""
        kids = [c for c in self.children.get(ev.pid, ()) if still_holds(c, ev.fd, ev.sock_ino)]
        if not kids:
            self.wiring.counters["forked_young_gone"] += 1
            return
        self.wiring.counters["forked_young_adopted"] += 1
        tracer = self.wiring.tracer
        if tracer is not None:
            for child in kids:
                with contextlib.suppress(Exception):
                    tracer.track(child, ev.fd, inode=ev.sock_ino, netns=ev.netns)
        holder = dataclasses.replace(ev, pid=kids[-1], tid=kids[-1], forked=False)
        fed = self._wanted(holder) and (self._accepted(holder) if ev.kind == EventKind.ACCEPT
                                        else self._connected(holder))
        if fed:
            for child in kids[:-1]:
                self.holders.add(child, ev.fd, ev.sock_ino)

    def _execed(self, pid: int) -> None:
        """After exec, close-on-exec fds are gone without a traced close: check each."""
        for fd, inode in self.holders.held_by(pid):
            if not still_holds(pid, fd, inode):
                if self.wiring.tracer is not None:
                    with contextlib.suppress(Exception):
                        self.wiring.tracer.untrack(pid, fd)
                self._closed(pid, fd)

    # -- accepts the tracer missed -------------------------------------------------------------

    async def find_unseen_accept(self, listener: SockRef, bind: dict[str, Any]) -> None:
        """Find the overlay accept for a bind when the tracer did not report it.

        An app already blocked in accept() when the tracer attached returns from it unseen
        (the entry was never stashed): look for the connection among the listener process's
        sockets, as `Tracer.seed` does at start-up.
        """
        engine = self.wiring.running_engine
        try:
            tup = FourTuple.from_body(bind)
        except (KeyError, TypeError):
            return
        for delay in (0.05, 0.15, 0.3, 0.5):
            await asyncio.sleep(delay)
            tracer = self.wiring.tracer
            if not engine.awaiting_accept(bind.get("cid", b"")) or tracer is None:
                return
            pids = engine.listener_pids(listener)
            if not pids:
                return
            for ev in tracer.seed(track=False, pids=pids):
                if (ev.kind == EventKind.ACCEPT and not engine.tracks_fd(ev.pid, ev.fd)
                        and normalize_addr(ev.raddr) == tup.client_addr
                        and ev.rport == tup.client_port and ev.lport == tup.server_port):
                    self.wiring.counters["accepts_found_in_proc"] += 1
                    tracer.track(ev.pid, ev.fd, ev.sock_ino, ev.netns)
                    self.on_socket_event(ev)
                    return
