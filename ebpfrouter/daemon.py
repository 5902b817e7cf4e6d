"""The node daemon: tracer + engine + peers + injector + control on one asyncio loop.

    tracer fd ──> node scoping ──> engine events ──> Engine.handle ──> actions ──> runners
    peer server ─────────────────> PeerMessage                           │
    host listeners ──────────────> HostAccepted            results <─────┘ (loop / threads)

The engine (:mod:`ebpfrouter.engine`) decides; this module only observes and acts. Every
ptrace operation (freeze, replace, thaw) runs on one dedicated thread, because a ptrace
tracer is a thread: the thread that seized a process must be the one that drives it. Socket
handles given to the engine (`SockRef`) are the daemon's own fds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from injector.errors import InjectorError
from injector.inspect import TCP_STATES, copy_socket, getfd, queue_sizes, tcp_info

from . import hostnet
from .config import ConfigError, RouterConfig
from .control import ControlError, ControlServer, HealthServer, Metrics
from .engine.actions import (
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
from .engine.events import (
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
    TimerFired,
)
from .engine.machine import Conn, Engine, EngineConfig, Role
from .holders import SocketHolders
from .k8s.link import ClusterLink, ClusterLinkError
from .peers import Codec, ProtocolError
from .peers.transport import PeerClient, PeerInfo, PeerServer
from .peers.wire import HEADER
from .podmeta import PodMetadataSource, StaticPodMetadata
from .rules import ConnectionFacts, RuleError, RuleWatcher
from .tracer import EventKind, SocketEvent, Tracer, TracerError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DaemonError(RuntimeError):
    """The daemon cannot start; the message names the interface, port, file or program."""


@dataclasses.dataclass
class DaemonOptions:
    """Everything `ebpf-router run` passes in, beyond `RouterConfig`."""

    config: RouterConfig
    pod_cidrs: list[IPNetwork] = dataclasses.field(default_factory=list)
    peers: dict[IPNetwork, str] = dataclasses.field(default_factory=dict)
    health_port: int | None = None
    pod_metadata: str | None = None
    node_name: str | None = None
    kubernetes: bool = False  # use the API (pods, nodes): in a pod, or with a kubeconfig
    kubeconfig: str | None = None
    kubernetes_sync_timeout: float = 30.0
    scope_netns: list[str] = dataclasses.field(default_factory=list)  # only these netns' pods
    freeze_timeout: float = 2.0
    min_age: float = 0.2  # connections younger than this are left alone (short ones never pay)
    swap_batch: int = 4  # swaps of one process that may share one freeze
    read_first_wait: float = 3.0  # an accepted connection is swapped once its app has read
    # from it, or once it is this old (0: at once); see `server_ready`
    drain_wait: float = 0.05
    bounce_timeout: float = 1.0  # carrying unread bytes over the host connection (frozen)
    drop_privileges: bool = True
    bind_timeout: float = 5.0
    rules_poll: float = 2.0
    peer_refresh: float = 10.0


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


def host_sockaddr(family: int, addr: str, port: int) -> tuple[str, int]:
    """`(addr, port)` for a socket of `family`: IPv4 `addr` v4-mapped for an AF_INET6 one."""
    if family == socket.AF_INET6 and ipaddress.ip_address(addr).version == 4:
        return f"::ffff:{addr}", port
    return addr, port


def host_socket(family: int) -> socket.socket:
    """A TCP socket for a host connection or listener; AF_INET6 ones are dual-stack.

    A swap hands the app a host socket of its own socket's family: a dual-stack app (Go,
    Java, `dualstack_ipv6=True`, nginx `listen [::]`) keeps an AF_INET6 socket that talks
    IPv4 through v4-mapped addresses (`::ffff:<host ip>`), so `getsockname()` still returns a
    sockaddr_in6 and IPPROTO_IPV6 options still work.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"host socket of family {family}: only AF_INET and AF_INET6")
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            sock.close()
            raise
    return sock


def _setns(path: str) -> None:
    from .testbed import setns_path

    setns_path(path)


def netns_ipv4_addresses(pid: int) -> list[str]:
    """IPv4 addresses of the network namespace of `pid` (read from a helper thread)."""
    result: list[str] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            _setns(f"/proc/{pid}/ns/net")
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for addr in ipr.get_addr(family=2):
                    value = addr.get_attr("IFA_ADDRESS")
                    if value and not value.startswith("127."):
                        result.append(str(value))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            error.append(exc)

    thread = threading.Thread(target=work, name=f"netns-{pid}")  # dies with its netns
    thread.start()
    thread.join(5)
    if error:
        raise error[0]
    return result


class _Injector:
    """The one thread that freezes, replaces and thaws (ptrace is per tracer thread)."""

    def __init__(self, freeze_timeout: float) -> None:
        self.freeze_timeout = freeze_timeout
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="injector")
        self.frozen: dict[int, tuple[Any, Any, int]] = {}  # pid -> (context, proc, holds)
        self.freeze_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self._since: dict[int, int] = {}

    def freeze(self, pid: int) -> None:
        from injector.freeze import freeze

        if pid in self.frozen:
            ctx, proc, holds = self.frozen[pid]
            self.frozen[pid] = (ctx, proc, holds + 1)
            return
        ctx = freeze(pid, timeout=self.freeze_timeout)
        t0 = time.monotonic()
        proc = ctx.__enter__()
        if time.monotonic() - t0 > 0.2:
            log.warning("pid %d: freezing took %.0f ms", pid, (time.monotonic() - t0) * 1000)
        self.frozen[pid] = (ctx, proc, 1)
        self._since[pid] = time.monotonic_ns()

    def thaw(self, pid: int, force: bool = False) -> None:
        entry = self.frozen.get(pid)
        if entry is None:
            return
        ctx, proc, holds = entry
        if holds > 1 and not force:
            self.frozen[pid] = (ctx, proc, holds - 1)
            return
        del self.frozen[pid]
        try:
            ctx.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - thaw must not fail the loop
            log.warning("pid %d: thaw: %s", pid, exc)
        started = self._since.pop(pid, None)
        if started is not None:
            held = time.monotonic_ns() - started
            self.freeze_ns.append(held)
            if held > 500_000_000:
                log.warning("pid %d was frozen for %.0f ms", pid, held / 1e6)

    def replace(self, pid: int, fd: int, sock: socket.socket, expected_inode: int) -> None:
        from injector.swap import replace_fd

        entry = self.frozen.get(pid)
        if entry is None:
            raise InjectorError(f"pid {pid} is not frozen (replace fd {fd})")
        old = replace_fd(pid, fd, sock, expected_inode=expected_inode,
                         timeout=self.freeze_timeout, proc=entry[1])
        old.close()

    def frozen_pids(self) -> list[int]:
        """Pids held frozen right now (read from any thread)."""
        for _ in range(10):
            with contextlib.suppress(RuntimeError):  # resized by the injector thread meanwhile
                return sorted(self.frozen)
        return []

    def thaw_all(self) -> None:
        for pid in list(self.frozen):
            self.thaw(pid, force=True)

    def submit(self, fn: Any, *args: Any) -> concurrent.futures.Future[Any]:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        """Thaw everything (on the injector thread) and stop the thread."""
        with contextlib.suppress(RuntimeError):
            self.pool.submit(self.thaw_all).result(timeout=30)
        self.pool.shutdown(wait=True)


class Daemon:
    """One node's router. `await run()` serves until `stop()` (or SIGTERM/SIGINT)."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.config = options.config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tracer: Tracer | None = None
        self.engine: Engine | None = None
        self.codec: Codec | None = None
        self.server: PeerServer | None = None
        self.clients: dict[str, PeerClient] = {}
        self.control: ControlServer | None = None
        self.health: HealthServer | None = None
        self.metrics = Metrics()
        self.injector = _Injector(options.freeze_timeout)
        self.socks: dict[int, socket.socket] = {}
        # traced sockets not copied yet: ref -> (pid, fd, inode); copied on first use (`_sock`),
        # so a connection that closes young costs no pidfd_getfd and its FIN is not held back
        self.uncopied: dict[int, tuple[int, int, int]] = {}
        self._addr_memo: dict[tuple[str, str | None], Any] = {}  # see `_memo`
        self._uncopied_refs = itertools.count(-1, -1)  # never an fd number
        # the engine's pending timers by key (several may share one), so it can cancel them
        self.timers: dict[tuple[Any, ...], dict[int, asyncio.TimerHandle]] = {}
        self._timer_tokens = itertools.count()
        self.listen_tasks: dict[int, asyncio.Task[None]] = {}
        self.host_watch: set[int] = set()  # held host sockets watched for EOF (before handover)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.host_addr = ""
        self.node = ""
        self.pod_cidrs: list[IPNetwork] = list(options.pod_cidrs)
        self.peer_map = hostnet.PeerMap(options.peers)
        self.pods: PodMetadataSource | None = None
        self.cluster: ClusterLink | None = None
        self.local_netns: set[int] | None = None
        self.draining = False
        self.rules: RuleWatcher | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self.addr_cache: dict[int, list[str]] = {}
        self.started = time.monotonic()
        self.traced_at: dict[tuple[int, int], int] = {}
        self._unreferenced: set[int] = set()
        self._beat = time.monotonic()
        self.swap_latency_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self._stop: asyncio.Event | None = None
        self._ready = False
        self.privileges: list[str] | None = None  # capabilities kept after the drop
        self.holders = SocketHolders()  # which processes hold each traced socket (forks)
        self.uninspectable: dict[int, str] = {}  # pid -> why it cannot be inspected (logged
        # once per pid; see `_note_uninspectable`)

    # -- lifecycle ---------------------------------------------------------------------------

    def _discover(self) -> None:
        cfg = self.config
        assert cfg.host_if and cfg.overlay_if
        try:
            self.host_addr = hostnet.interface_ipv4(cfg.host_if)
            if not self.pod_cidrs:
                self.pod_cidrs = hostnet.local_pod_cidrs(cfg.overlay_if)
            self.peer_map.update_discovered(hostnet.overlay_peers(cfg.overlay_if))
        except hostnet.HostNetError as exc:
            raise DaemonError(str(exc)) from None
        if not self.pod_cidrs and not self.options.kubernetes:  # else: from the Node object
            self._no_pod_cidr()
        self.node = self.options.node_name or self.host_addr

    def _no_pod_cidr(self) -> None:
        raise DaemonError(f"OVERLAY_IF {self.config.overlay_if}: cannot find this node's pod "
                          "CIDR (no bridge route holds its address); give --pod-cidr")

    def _memo(self, kind: str, addr: str | None, compute: Any) -> Any:
        """`compute(addr)`, remembered until the next housekeeping tick (the peer map, pod
        CIDRs and Nodes change slowly; every traced connection asks about two addresses)."""
        key = (kind, addr)
        if key in self._addr_memo:
            return self._addr_memo[key]
        if len(self._addr_memo) >= 4096:
            self._addr_memo.clear()
        value = self._addr_memo[key] = compute(addr)
        return value

    def peer_of(self, addr: str) -> str | None:
        """The node (its host address) owning overlay address `addr`; None if not overlay."""
        return self._memo("peer", addr, self._peer_of)  # type: ignore[no-any-return]

    def _peer_of(self, addr: str) -> str | None:
        if hostnet.in_any(addr, self.pod_cidrs):
            return self.node
        if self.cluster is not None:  # Node objects first, then --peer and overlay routes
            host = self.cluster.peer_for(addr)
            if host is not None:
                self.counters["peer_from_nodes"] += 1
                return self.node if host == self.host_addr else host
        return self.peer_map.lookup(addr)

    def allow(self, role: Role, pid: int, conn: FourTuple) -> bool:
        """Rules: label filters (pod metadata of `pid`), then cidr validators."""
        if self.pods is not None:
            pod = self.pods.pod_for_pid(pid)
        elif self.cluster is not None:  # by cgroup, else by the local end's pod IP
            local = conn.server_addr if role is Role.SERVER else conn.client_addr
            pod = self.cluster.pod_for(pid, local)
        else:
            pod = None
        facts = ConnectionFacts(conn.server_addr, conn.server_port, conn.client_addr,
                                conn.client_port,
                                pod_labels=dict(pod.labels) if pod else {},
                                container_labels=dict(pod.container_labels) if pod else {})
        assert self.rules is not None
        ok = self.rules.rules.allows(facts)
        if not ok:
            self.counters["ruled_out"] += 1
        return ok

    def server_ready(self, conn: Conn) -> bool:
        """Whether an accepted connection may be swapped: its app has read from it once.

        After a swap `getpeername()` names host addresses. Apps that check the peer's address
        right after reading its first message (Open MPI's TCP transport drops a connection
        whose source is not an address the peer published) must do so before the swap, so
        the server side waits until TCP_INFO shows a byte consumed, or until the connection
        is `read_first_wait` old (a server whose client never writes is swapped then).
        """
        wait = self.options.read_first_wait
        started = self.traced_at.get((conn.pid or 0, conn.fd or 0))
        if wait <= 0 or started is None or time.monotonic_ns() - started >= wait * 1e9:
            return True
        sock = self._sock(conn.overlay_sock) if conn.overlay_sock is not None else None
        if sock is None:
            return True  # the swap's own steps will find out
        try:
            unread, _ = queue_sizes(sock)
            return tcp_info(sock).bytes_received > unread
        except OSError:
            return True

    def shared(self, conn: Conn) -> bool:
        """Whether another process holds `conn`'s overlay socket too (just forked): a swap
        would replace only one holder's fd. Holders whose fd no longer is that socket (closed
        without a traced close: close-on-exec, close_range) are dropped first."""
        if conn.inode is None or len(self.holders.holders(conn.inode)) <= 1:
            return False
        return len(self.holders.prune(conn.inode, _still_holds)) > 1

    def _note_uninspectable(self, pid: int, exc: OSError) -> None:
        """Count and log (once per pid) a process whose fds the router may not read."""
        if pid in self.uninspectable:
            return
        try:
            uid: int | str = os.stat(f"/proc/{pid}").st_uid
            netns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            uid, netns = "?", None
        if self.local_netns is not None and netns not in self.local_netns:
            return  # not one of this node's pods: none of our business
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.uninspectable[pid] = name
        if len(self.uninspectable) > 4096:  # remembered to log once, not for ever
            self.uninspectable.pop(next(iter(self.uninspectable)))
        self.counters["uninspectable"] += 1
        log.warning("pid %d (uid %s): cannot inspect its sockets: %s (%s); its connections "
                    "stay on the overlay%s", pid, uid, name, exc.strerror or exc,
                    " (the router was started without the capabilities it needs: "
                    "see docs/kubernetes.md, Capabilities)"
                    if exc.errno in (errno.EACCES, errno.EPERM) else "")

    async def start(self) -> None:
        """Open everything; raise `DaemonError` naming what failed (and undo the rest)."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = self.config
        try:
            cfg.validate()
        except ConfigError as exc:
            raise DaemonError(str(exc)) from None
        _in_thread(self._discover)  # pyroute2 wants no running loop; no thread may outlive it
        try:
            self.rules = RuleWatcher(cfg.rules_dir, strict=False)
        except RuleError as exc:  # pragma: no cover - strict=False logs instead
            raise DaemonError(str(exc)) from None
        if self.rules.last_error is not None:
            self.counters["rules_errors"] += 1
        if self.options.pod_metadata:
            try:
                pods = StaticPodMetadata.from_file(self.options.pod_metadata)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DaemonError(f"pod metadata {self.options.pod_metadata}: {exc}") from None
            self.pods = pods
            # with pod metadata, scope by network namespace too: only this node's pods
            self.local_netns = {p.netns_inode for p in pods.pods
                                if p.netns_inode and hostnet.in_any(p.ip, self.pod_cidrs)}
        if self.options.scope_netns:
            try:
                inodes = {os.stat(path).st_ino for path in self.options.scope_netns}
            except OSError as exc:
                raise DaemonError(f"--scope-netns {exc.filename}: {exc.strerror}") from None
            self.local_netns = inodes if self.local_netns is None else self.local_netns & inodes
        if self.options.kubernetes:  # built now (errors stop start-up), started after the drop
            try:
                self.cluster = ClusterLink.build([r.kind for r in self.rules.rules.filters],
                                                 self.options.kubeconfig, self.options.node_name)
            except ClusterLinkError as exc:
                raise DaemonError(str(exc)) from None
        assert cfg.key is not None
        self.codec = Codec(cfg.key)
        self.engine = Engine(EngineConfig(node=self.node, min_age=self.options.min_age,
                                          max_swaps_per_process=self.options.swap_batch),
                             self.peer_of, self.allow, server_ready=self.server_ready,
                             shared=self.shared)
        self.server = PeerServer(self.codec, self._on_peer_message, host=self.host_addr,
                                 port=cfg.router_port)
        try:
            await self.server.start()
        except OSError as exc:
            raise DaemonError(f"ROUTER_PORT: {exc.strerror or exc}") from None
        try:
            self.tracer = Tracer()
            self.tracer.open()
        except (TracerError, OSError) as exc:
            raise DaemonError(f"tracer: {exc}") from None
        if self.options.drop_privileges:
            self._drop_privileges()  # before any thread exists: capabilities are per thread
        if self.cluster is not None:
            await self._start_cluster()
        self._declare_metrics()
        try:
            self.control = ControlServer(cfg.control_socket, self._status_threadsafe)
            self.control.start()
        except (ControlError, OSError) as exc:
            raise DaemonError(f"control socket {cfg.control_socket}: {exc}") from None
        if self.options.health_port is not None:
            try:
                self.health = HealthServer(self.options.health_port, self.metrics,
                                           ready=lambda: self._ready, alive=self._alive)
                self.health.start()
            except OSError as exc:
                raise DaemonError(f"health port {self.options.health_port}: "
                                  f"{exc.strerror or exc}") from None
        self.loop.add_reader(self.tracer.fileno(), self._on_tracer_readable)
        for host in sorted(self.peer_map.hosts() | self._cluster_hosts()):
            self._ensure_client(host)
        seeded = self.tracer.seed(on_denied=self._note_uninspectable)
        for ev in seeded:
            self._on_socket_event(ev)
        log.info("seeded %d existing sockets (pod netns %s)", len(seeded),
                 sorted(self.local_netns) if self.local_netns is not None else "any")
        self._spawn(self._housekeeping())
        self._ready = True
        log.warning("ebpf-router on %s: host %s, pod CIDRs %s, peers %s, port %d", self.node,
                    self.host_addr, ", ".join(map(str, self.pod_cidrs)),
                    ", ".join(sorted(self.peer_map.hosts() | self._cluster_hosts())) or "none",
                    self.server.port)

    async def _start_cluster(self) -> None:
        """Start the Kubernetes watchers; take this node's podCIDRs from its Node object."""
        assert self.cluster is not None and self.loop is not None
        await self.loop.run_in_executor(None, self.cluster.start,
                                        self.options.kubernetes_sync_timeout)
        if self.cluster.error:
            self.counters["kubernetes_errors"] += 1
        if not self.options.pod_cidrs and self.cluster.local_pod_cidrs():
            self.pod_cidrs = self.cluster.local_pod_cidrs()
            self._addr_memo.clear()
        if not self.pod_cidrs:
            self._no_pod_cidr()

    def _cluster_hosts(self) -> set[str]:
        return self.cluster.peer_hosts() - {self.host_addr} if self.cluster is not None else set()

    def _drop_privileges(self) -> None:
        """Keep only what the daemon still uses once its BPF programs are attached."""
        from .privileges import PrivilegeError, daemon_required, drop_privileges

        try:
            report = drop_privileges(daemon_required(tracer_open=True))
        except (PrivilegeError, OSError) as exc:
            log.warning("cannot drop capabilities (running with all of them): %s", exc)
            self.counters["privileges_kept"] = 1
            return
        self.privileges = list(report.kept)
        if report.other_threads:
            log.warning("threads %s still hold more capabilities than %s", report.other_threads,
                        ", ".join(report.kept))
        log.info("capabilities kept: %s", ", ".join(report.kept))

    async def run(self) -> None:
        """Start, serve until stopped, then shut down cleanly."""
        try:
            await self.start()
            assert self.loop is not None and self._stop is not None
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    self.loop.add_signal_handler(sig, self.stop)
            await self._stop.wait()
        finally:
            await self.shutdown()

    def _alive(self) -> bool:
        """The loop turned recently (the housekeeping task beats every `rules_poll`)."""
        return time.monotonic() - self._beat < 3 * self.options.rules_poll + 5

    def _swaps_in_flight(self) -> bool:
        assert self.engine is not None
        return self.engine.swaps_in_flight()

    def stop(self) -> None:
        """Ask the loop to shut down."""
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self) -> None:
        """Detach BPF, thaw every frozen process, close sockets, remove the control socket."""
        self._ready = False
        loop = asyncio.get_running_loop()
        self.draining = True
        deadline = time.monotonic() + 5.0
        while self.engine is not None and self._swaps_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # let running two-phase swaps commit or roll back
        if self.tracer is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.tracer.fileno())
        await loop.run_in_executor(None, self.injector.close)
        for task in list(self.tasks) + list(self.listen_tasks.values()):
            task.cancel()
        for task in list(self.tasks) + list(self.listen_tasks.values()):
            with contextlib.suppress(BaseException):
                await task
        for ref in list(self.host_watch):
            self._unwatch_host(ref)
        for client in self.clients.values():
            await client.close()
        if self.server is not None:
            await self.server.close()
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.socks.clear()
        self.uncopied.clear()
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None
        if self.control is not None:
            self.control.close()
        if self.health is not None:
            self.health.close()
        if self.cluster is not None:
            await loop.run_in_executor(None, self.cluster.stop)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _housekeeping(self) -> None:
        """Poll the rules directory and refresh the peer map from the overlay routes."""
        last_peers = time.monotonic()
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(self.options.rules_poll)
            lag = time.monotonic() - self._beat - self.options.rules_poll
            if lag > 0.2:
                log.warning("event loop stalled for %.0f ms", lag * 1000)
            self.counters["loop_lag_max_ms"] = max(self.counters["loop_lag_max_ms"],
                                                   int(lag * 1000))
            self.status()  # refreshes the metrics
            self._addr_memo.clear()  # peer map, pod CIDRs or Nodes may have changed
            assert self.rules is not None
            if self.rules.poll():
                self.counters["rules_reloads"] += 1
            self._gc_socks()
            gone = [pid for pid in self.holders.pids() if not os.path.exists(f"/proc/{pid}")]
            if gone:  # exits the tracer could not report (its pids map is LRU)
                self.counters["holders_pruned"] += self.holders.drop_pids(gone)
            for host in self._cluster_hosts():
                self._ensure_client(host)
            if time.monotonic() - last_peers >= self.options.peer_refresh:
                last_peers = time.monotonic()
                assert self.config.overlay_if and self.loop is not None
                try:
                    found = await self.loop.run_in_executor(None, hostnet.overlay_peers,
                                                            self.config.overlay_if)
                except (hostnet.HostNetError, OSError) as exc:
                    log.warning("refreshing peers from %s: %s", self.config.overlay_if, exc)
                else:
                    self.peer_map.update_discovered(found)
                for host in self.peer_map.hosts():
                    self._ensure_client(host)

    # -- engine plumbing ---------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the engine and run what it asks for."""
        assert self.engine is not None
        try:
            actions = self.engine.handle(event)
        except Exception:  # the engine must never take the daemon down
            log.exception("engine failed on %s", type(event).__name__)
            self.counters["engine_errors"] += 1
            return
        for action in actions:
            try:
                self._run_action(action)
            except Exception as exc:
                log.exception("action %s failed", type(action).__name__)
                ref = getattr(action, "ref", None)
                if ref is not None:
                    self._later(ActionFailed(ref, f"{type(action).__name__}: {exc}"))

    def _note_swapped(self, action: NoteSwapped) -> None:
        """Count a swapped connection per role; time from connect()/accept() to swapped."""
        self.counters[f"swapped_{action.role}"] += 1
        started = self.traced_at.pop((action.pid, action.fd), None)
        if started is not None:
            self.swap_latency_ns.append(time.monotonic_ns() - started)
        log.info("swapped %s %s (pid %s fd %s)", action.role, action.tuple, action.pid,
                 action.fd)

    def _timer_fired(self, key: tuple[Any, ...], token: int) -> None:
        handles = self.timers.get(key)
        if handles is not None:
            handles.pop(token, None)
            if not handles:
                del self.timers[key]
        self.feed(TimerFired(key))

    def _later(self, event: Event) -> None:
        assert self.loop is not None
        self.loop.call_soon(self.feed, event)

    def _run_action(self, action: Action) -> None:
        if isinstance(action, SendPeer):
            self._send_peer(action)
        elif isinstance(action, StartTimer):
            assert self.loop is not None
            token = next(self._timer_tokens)
            self.timers.setdefault(action.key, {})[token] = self.loop.call_later(
                action.delay, self._timer_fired, action.key, token)
        elif isinstance(action, CancelTimer):
            for handle in self.timers.pop(action.key, {}).values():
                handle.cancel()
        elif isinstance(action, CloseSocket):
            self._close_sock(action.sock)
        elif isinstance(action, NoteSwapped):
            self._note_swapped(action)
        elif isinstance(action, CheckQueues):
            self._spawn(self._check_queues(action))
        elif isinstance(action, Bounce):
            self._unwatch_host(action.host_sock)  # the bounce reads it now
            self._spawn(self._bounce(action))
        elif isinstance(action, ProbeConn):
            overlay, host = self._sock(action.overlay_sock), self._sock(action.host_sock)
            self._later(ConnProbed(action.ref, overlay is None or _peer_closed(overlay),
                                   host is None or _peer_closed(host)))
        elif isinstance(action, Freeze) and self.draining:
            self._later(ActionFailed(action.ref, "the router is shutting down"))
        elif isinstance(action, Freeze):
            self._injector_call(action.ref, FreezeDone(action.ref), self.injector.freeze,
                                action.pid)
        elif isinstance(action, Thaw):
            log.debug("injector thaw pid %d: start", action.pid)
            future = self.injector.submit(self.injector.thaw, action.pid)
            if log.isEnabledFor(logging.DEBUG):
                future.add_done_callback(lambda f, pid=action.pid: log.debug(
                    "injector thaw pid %d: %s", pid, "failed" if f.exception() else "done"))
        elif isinstance(action, ReplaceFd):
            self._replace(action)
        elif isinstance(action, OpenHostListener):
            self._open_listener(action)
        elif isinstance(action, HostConnect):
            self._spawn(self._host_connect(action))
        else:
            log.error("unknown engine action %r", action)

    def _injector_call(self, ref: int, done: Event, fn: Any, *args: Any) -> None:
        log.debug("injector %s pid %s: start", fn.__name__, args[0])
        future = self.injector.submit(fn, *args)
        assert self.loop is not None
        wrapped = asyncio.wrap_future(future, loop=self.loop)

        def finished(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                log.debug("injector %s pid %s: done", fn.__name__, args[0])
                self.feed(done)
            else:
                self.counters["injector_errors"] += 1
                log.debug("injector %s pid %s: failed", fn.__name__, args[0])
                log.info("%s: %s", fn.__name__, exc)
                self.feed(ActionFailed(ref, str(exc)))

        wrapped.add_done_callback(finished)

    def _replace(self, action: ReplaceFd) -> None:
        self._unwatch_host(action.sock)  # handed over: the app owns it now
        sock = self.socks[action.sock]
        new_ino = os.fstat(sock.fileno()).st_ino
        pid, fd = action.pid, action.fd
        app_family = self._app_family(pid, fd)
        if app_family is not None and app_family != sock.family:
            # a host listener serves one family; an accept of the other family (two overlay
            # listeners of different families on one port) cannot be given one of its sockets
            self.counters["family_mismatch"] += 1
            self._later(ActionFailed(action.ref, f"replace pid {pid} fd {fd}: the app's socket "
                                                 f"is {_family_name(app_family)}, the host "
                                                 f"socket {_family_name(sock.family)}; a swap "
                                                 "would change its family"))
            return

        def done() -> None:
            # the tracer keys its tracked fds by (pid, fd) and does not see dup3: re-register
            if self.tracer is not None:
                with contextlib.suppress(Exception):
                    self.tracer.untrack(pid, fd)
                with contextlib.suppress(Exception):
                    self.tracer.track(pid, fd, inode=new_ino)

        def work() -> None:
            self.injector.replace(pid, fd, sock, action.expected_inode)

        log.debug("injector replace pid %d fd %d: start", pid, fd)
        future = self.injector.submit(work)
        assert self.loop is not None
        wrapped = asyncio.wrap_future(future, loop=self.loop)

        def finished(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                log.debug("injector replace pid %d fd %d: done", pid, fd)
                done()
                self.feed(ReplaceDone(action.ref))
            else:
                self.counters["injector_errors"] += 1
                log.debug("injector replace pid %d fd %d: failed", pid, fd)
                log.info("replace pid %d fd %d: %s", pid, fd, exc)
                self.feed(ActionFailed(action.ref, str(exc)))

        wrapped.add_done_callback(finished)

    async def _check_queues(self, action: CheckQueues) -> None:
        """Queue sizes of the overlay socket, giving in-flight data a moment to drain.

        Bytes we sent that the other end has not acknowledged yet (its app may still be
        reading: it is not frozen before us in that order) usually drain within a few round
        trips. Bytes waiting in our own receive queue never will (our app is frozen): they
        are migrated (`Bounce`), or, with migration off, answered as busy at once.
        """
        log.debug("check pid %d fd %d: start", action.pid, action.fd)
        sock = self._sock(action.sock)
        if sock is None:
            log.debug("check pid %d fd %d: failed", action.pid, action.fd)
            self.feed(ActionFailed(action.ref, f"socket {action.sock} is gone"))
            return
        deadline = time.monotonic() + self.options.drain_wait
        try:
            recv, send = queue_sizes(sock)
            migrate = self.engine is not None and self.engine.config.migrate
            while send and (migrate or not recv) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
                recv, send = queue_sizes(sock)
        except OSError as exc:
            log.debug("check pid %d fd %d: failed", action.pid, action.fd)
            self.feed(ActionFailed(action.ref, f"queue sizes: {exc}"))
            return
        log.debug("check pid %d fd %d: done (send %d, recv %d)", action.pid, action.fd, send, recv)
        self.feed(QueuesChecked(action.ref, send, recv))

    async def _bounce(self, action: Bounce) -> None:
        """Write our unread overlay bytes (peeked) to the host socket; echo the peer's."""
        log.debug("bounce %d+%d bytes: start", action.send_len, action.echo_len)
        overlay, host = self._sock(action.overlay_sock), self.socks.get(action.host_sock)
        if overlay is None or host is None:
            self.feed(ActionFailed(action.ref, f"bounce: socket {action.overlay_sock} or "
                                               f"{action.host_sock} is gone"))
            return
        assert self.loop is not None
        started = time.monotonic()
        try:
            mine = peek_unread(overlay, action.send_len)
            await asyncio.wait_for(_carry(self.loop, host, mine, action.echo_len),
                                   self.options.bounce_timeout)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            self.counters["bounce_failed"] += 1
            log.debug("bounce %d+%d bytes: failed", action.send_len, action.echo_len)
            self.feed(ActionFailed(action.ref, f"bounce of {action.send_len}+{action.echo_len} "
                                               f"bytes: {type(exc).__name__}: {exc}"))
            return
        self.counters["bounces"] += 1
        self.counters["bounced_bytes"] += action.send_len
        log.debug("bounce %d+%d bytes: done in %.1f ms", action.send_len, action.echo_len,
                  (time.monotonic() - started) * 1e3)
        self.feed(BounceDone(action.ref))

    def _app_family(self, pid: int, fd: int) -> int | None:
        """Family of the app's overlay socket at `pid`/`fd` (our copy; None if unknown)."""
        assert self.engine is not None
        ref = self.engine.overlay_sock_of(pid, fd)
        sock = self._sock(ref) if ref is not None else None
        return sock.family if sock is not None else None

    def _listener_family(self, action: OpenHostListener) -> int:
        """Family of the overlay listener `action` is for (AF_INET if it is gone)."""
        try:
            with copy_socket(action.pid, action.fd) as sock:
                return sock.family
        except (InjectorError, OSError) as exc:
            log.info("pid %d fd %d: cannot copy the listener: %s", action.pid, action.fd, exc)
            return socket.AF_INET

    def _add_sock(self, sock: socket.socket) -> int:
        ref = sock.fileno()
        self.socks[ref] = sock
        return ref

    def _watch_host(self, ref: int) -> None:
        """Report EOF or reset on a held host socket as `HostClosed` (until handed over)."""
        assert self.loop is not None
        self.loop.add_reader(ref, self._on_host_readable, ref)
        self.host_watch.add(ref)

    def _unwatch_host(self, ref: int) -> None:
        if ref in self.host_watch:
            self.host_watch.discard(ref)
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(ref)

    def _on_host_readable(self, ref: int) -> None:
        """A watched host socket is readable: the other end closed it, or a swap has begun."""
        self._unwatch_host(ref)  # either way: stop watching (no busy loop behind unread data)
        sock = self.socks.get(ref)
        if sock is None:
            return
        if _peer_closed(sock):
            self.counters["host_closed_seen"] += 1
            self.feed(HostClosed(ref))
        else:  # bytes before the handover: a bounce under way; its own timeouts cover it
            self.counters["host_watch_data"] += 1

    def _sock(self, ref: int) -> socket.socket | None:
        """The daemon's copy of a socket, taken now if it was not yet (None: it is gone)."""
        sock = self.socks.get(ref)
        if sock is None and ref in self.uncopied:
            pid, fd, inode = self.uncopied.pop(ref)
            try:
                sock = copy_socket(pid, fd, inode)
            except (InjectorError, OSError) as exc:
                self.counters["copy_failed"] += 1
                if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
                    self._note_uninspectable(pid, exc)
                log.info("pid %d fd %d: cannot copy the socket: %s", pid, fd, exc)
                return None
            self.socks[ref] = sock
        return sock

    def _close_sock(self, ref: int) -> None:
        if self.uncopied.pop(ref, None) is not None:
            return
        self.host_watch.discard(ref)
        task = self.listen_tasks.pop(ref, None)
        if task is not None:
            task.cancel()
        sock = self.socks.pop(ref, None)
        if sock is not None:
            if self.loop is not None:
                with contextlib.suppress(Exception):
                    self.loop.remove_reader(ref)
            sock.close()

    # -- host listeners (server side) ------------------------------------------------------

    def _open_listener(self, action: OpenHostListener) -> None:
        """A host listener of the overlay listener's family: what it accepts replaces what
        the app accepts (AF_INET6: dual-stack, bound to `::ffff:<host ip>`)."""
        family = self._listener_family(action)
        sock = None
        for port in (action.port_hint, 0):
            sock = host_socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(host_sockaddr(family, self.host_addr, port))
                sock.listen(1024)
                break
            except OSError as exc:
                sock.close()
                sock = None
                if port == 0:
                    self._later(ActionFailed(action.ref, f"host listener on {self.host_addr}: "
                                                         f"{exc.strerror or exc}"))
                    return
        assert sock is not None
        sock.setblocking(False)
        ref = self._add_sock(sock)
        host_port = sock.getsockname()[1]
        self.listen_tasks[ref] = asyncio.ensure_future(self._accept_loop(ref, sock))
        self.counters["host_listeners"] += 1
        self._later(HostListenerOpened(action.ref, ref, self.host_addr, host_port))

    async def _accept_loop(self, ref: int, listener: socket.socket) -> None:
        assert self.loop is not None
        while True:
            try:
                conn, address = await self.loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("host listener %s: accept: %s", listener.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._read_bind(ref, conn, str(normalize_addr(address[0]))))

    async def _read_bind(self, listener: int, conn: socket.socket, peer_addr: str) -> None:
        """Read exactly the `bind` frame (never a byte of application data behind it)."""
        assert self.loop is not None and self.codec is not None
        conn.setblocking(False)
        try:
            header = await asyncio.wait_for(_recv_exact(self.loop, conn, HEADER.size),
                                            self.options.bind_timeout)
            length = self.codec.frame_length(header)
            payload = await asyncio.wait_for(_recv_exact(self.loop, conn, length),
                                             self.options.bind_timeout)
            msg = self.codec.decode_payload(payload)
            if msg.type != "bind":
                self.codec.rejected["not_bind"] += 1
                raise ProtocolError(f"first frame was {msg.type}, expected bind")
        except (ProtocolError, OSError, EOFError, TimeoutError) as exc:
            self.counters["host_conn_rejected"] += 1
            log.warning("host connection from %s: %s: %s; closed", peer_addr,
                        type(exc).__name__, exc)
            conn.close()
            return
        if peer_addr not in self.peer_map.hosts() | self._cluster_hosts():
            log.info("host connection from %s: not a known peer node", peer_addr)
        ref = self._add_sock(conn)
        self._watch_host(ref)
        self.feed(HostAccepted(listener, ref, os.fstat(conn.fileno()).st_ino, peer_addr,
                               msg.body))
        await self._match_unseen_accept(listener, msg.body)

    async def _match_unseen_accept(self, listener: int, bind: dict[str, Any]) -> None:
        """Find the overlay accept for a bind when the tracer did not report it.

        An app already blocked in accept() when the tracer attached returns from it unseen
        (the entry was never stashed): look for the connection among the listener process's
        sockets, as `Tracer.seed` does at start-up.
        """
        assert self.engine is not None
        try:
            tup = FourTuple.from_body(bind)
        except (KeyError, TypeError):
            return
        for delay in (0.05, 0.15, 0.3, 0.5):
            await asyncio.sleep(delay)
            if not self.engine.awaiting_accept(bind.get("cid", b"")) or self.tracer is None:
                return
            pids = self.engine.listener_pids(listener)
            if not pids:
                return
            for ev in self.tracer.seed(track=False, pids=pids):
                if (ev.kind == EventKind.ACCEPT and not self.engine.tracks_fd(ev.pid, ev.fd)
                        and normalize_addr(ev.raddr) == tup.client_addr
                        and ev.rport == tup.client_port and ev.lport == tup.server_port):
                    self.counters["accepts_found_in_proc"] += 1
                    self.tracer.track(ev.pid, ev.fd, ev.sock_ino, ev.netns)
                    self._on_socket_event(ev)
                    return

    # -- host connect (client side) --------------------------------------------------------

    async def _host_connect(self, action: HostConnect) -> None:
        """Connect to the peer's host listener with a socket of the app's family."""
        assert self.loop is not None and self.codec is not None and self.engine is not None
        overlay = self._sock(action.overlay_sock) if action.overlay_sock is not None else None
        family = overlay.family if overlay is not None else socket.AF_INET
        sock = None
        try:
            sock = host_socket(family)
            sock.setblocking(False)
            sock.bind(host_sockaddr(family, self.host_addr, 0))
            await asyncio.wait_for(self.loop.sock_connect(
                sock, host_sockaddr(family, action.host_addr, action.host_port)), 5.0)
            await self.loop.sock_sendall(sock, self.codec.encode("bind", action.bind))
        except (OSError, TimeoutError, ValueError) as exc:
            if sock is not None:
                sock.close()
            self.counters["host_connect_failed"] += 1
            self.feed(ActionFailed(action.ref, f"host connect to {action.host_addr}:"
                                               f"{action.host_port}: {exc}"))
            return
        ref = self._add_sock(sock)
        self._watch_host(ref)
        self.feed(HostConnected(action.ref, ref, os.fstat(sock.fileno()).st_ino))

    # -- peers ------------------------------------------------------------------------------

    def _ensure_client(self, host: str) -> None:
        if host in self.clients or host == self.host_addr:
            return
        assert self.codec is not None
        client = PeerClient(self.codec, host, self.config.router_port,
                            {"node": self.node, "host_addr": self.host_addr},
                            on_state=lambda up, h=host: self._later(PeerUp(h) if up
                                                                    else PeerLost(h)))
        self.clients[host] = client
        client.start()

    def _send_peer(self, action: SendPeer) -> None:
        targets = list(self.clients.values()) if action.peer is None else [
            self.clients[action.peer]] if action.peer in self.clients else []
        if not targets:
            self.counters["peer_send_unknown"] += 1
            log.info("no peer connection for %s (%s)", action.peer, action.type)
            return
        for client in targets:
            try:
                client.send(action.type, action.body)
            except (asyncio.QueueFull, ProtocolError, ValueError) as exc:
                self.counters["peer_send_failed"] += 1
                log.warning("peer %s: cannot send %s: %s", client.host, action.type, exc)

    def _on_peer_message(self, peer: PeerInfo, msg: Any) -> None:
        if peer.host_addr != peer.address[0]:
            log.info("peer %s says it is %s", peer.address[0], peer.host_addr)
        self._ensure_client(peer.host_addr)  # a peer we did not know: talk back
        self.feed(PeerMessage(peer.host_addr, msg.type, msg.body))

    # -- tracer -----------------------------------------------------------------------------

    def _on_tracer_readable(self) -> None:
        assert self.tracer is not None
        try:
            events = self.tracer.read(0)
        except Exception as exc:
            log.error("tracer read: %s", exc)
            self.counters["tracer_errors"] += 1
            return
        for ev in events:
            try:
                self._on_socket_event(ev)
            except Exception:
                log.exception("tracer event %s", ev)
                self.counters["tracer_errors"] += 1

    def _local(self, addr: str | None) -> bool:
        return self._memo("local", addr,  # type: ignore[no-any-return]
                          lambda a: hostnet.in_any(a, self.pod_cidrs))

    def _on_socket_event(self, ev: SocketEvent) -> None:
        kind = ev.kind
        if kind == EventKind.EXIT:
            self.addr_cache.pop(ev.pid, None)
            for fd, _, left in self.holders.exited(ev.pid):
                if left:
                    self._moved(ev.pid, fd, left)
            for key in [k for k in self.traced_at if k[0] == ev.pid]:
                del self.traced_at[key]
            self.feed(ProcessExited(ev.pid))
            return
        if kind == EventKind.FORK:
            self._forked(ev)
            return
        if kind == EventKind.EXEC:
            self._execed(ev.pid)
            return
        if kind == EventKind.CLOSE:
            if self.local_netns is not None and ev.netns not in self.local_netns:
                return
            self._closed(ev.pid, ev.fd)
            return
        if ev.ret < 0 and not (kind == EventKind.CONNECT and ev.ret == -115):  # EINPROGRESS
            return
        if self.draining or (self.local_netns is not None and ev.netns not in self.local_netns):
            return
        laddr, raddr = normalize_addr(ev.laddr), normalize_addr(ev.raddr)
        if kind == EventKind.LISTEN:
            for addr in self._listen_addrs(ev.pid, laddr):
                self.counters["listens"] += 1
                self.holders.add(ev.pid, ev.fd, ev.sock_ino)  # pre-forked workers inherit it
                self.feed(ListenTraced(ev.pid, ev.fd, ev.sock_ino, addr, ev.lport))
            return
        if kind == EventKind.ACCEPT:
            if not self._local(laddr):
                return
            conn = FourTuple(str(raddr), ev.rport, str(laddr), ev.lport)
            sock = self._copy_later(ev)
            self.counters["seen"] += 1
            self.traced_at[(ev.pid, ev.fd)] = ev.ts_ns
            self._feed_traced(AcceptTraced(ev.pid, ev.fd, ev.sock_ino, conn, sock))
            return
        if kind == EventKind.CONNECT:
            if raddr is None or not self._local(laddr) and laddr not in (None, "0.0.0.0"):
                return
            sock = self._copy_later(ev)
            if not laddr or laddr == "0.0.0.0" or not ev.lport:  # not bound yet at the event
                copy = self._sock(sock)
                if copy is None:
                    return
                laddr, lport = copy.getsockname()[:2]
                laddr = normalize_addr(laddr)
            else:
                lport = ev.lport
            if not self._local(laddr):
                self._close_sock(sock)
                return
            self.counters["seen"] += 1
            self.traced_at[(ev.pid, ev.fd)] = ev.ts_ns
            conn = FourTuple(str(laddr), lport, raddr, ev.rport)
            self._feed_traced(ConnectTraced(ev.pid, ev.fd, ev.sock_ino, conn, sock))

    def _feed_traced(self, event: AcceptTraced | ConnectTraced) -> None:
        """Feed a traced connection; close our copy at once if the engine did not keep it."""
        self.feed(event)
        assert self.engine is not None
        if self.engine.holds_traced(event.pid, event.fd, event.sock):
            self.holders.add(event.pid, event.fd, event.inode)  # followed through forks
        else:
            self._close_sock(event.sock)

    # -- sockets that change process ---------------------------------------------------------

    def _closed(self, pid: int, fd: int) -> None:
        """A traced close: the end of the socket, or of one holder's copy of it."""
        removed = self.holders.remove(pid, fd)
        if removed is not None and removed[1]:
            self._moved(pid, fd, removed[1])
            return
        self.traced_at.pop((pid, fd), None)
        self.feed(CloseTraced(pid, fd))

    def _moved(self, pid: int, fd: int, left: set[tuple[int, int]]) -> None:
        """`pid` let go of the socket at `fd`; a process in `left` still holds it: carry the
        connection (or listener) over to the newest holder that really has it."""
        inode = None
        for holder in sorted(left, key=lambda h: h[0]):
            inode = inode or self.holders.inode_of(*holder)
        alive = self.holders.prune(inode, _still_holds) if inode is not None else set()
        if not alive:  # the other holders are gone too: the socket was closed
            self.traced_at.pop((pid, fd), None)
            self.feed(CloseTraced(pid, fd))
            return
        new_pid, new_fd = self.holders.successor(alive)
        self.counters["fd_moves"] += 1
        log.info("pid %d fd %d: the socket lives on in pid %d fd %d", pid, fd, new_pid, new_fd)
        for ref, (p, f, ino) in list(self.uncopied.items()):
            if (p, f) == (pid, fd):
                self.uncopied[ref] = (new_pid, new_fd, ino)
        started = self.traced_at.pop((pid, fd), None)
        if started is not None:
            self.traced_at[(new_pid, new_fd)] = started
        self.feed(FdMoved(pid, fd, new_pid, new_fd))

    def _forked(self, ev: SocketEvent) -> None:
        """A process holding traced sockets forked: the child holds them too (same fds)."""
        child = ev.child_pid
        if child is None or child == ev.pid:
            return
        tgid = _tgid(child)
        if tgid != child:  # a new thread (same fd table), or already gone
            if self.tracer is not None:
                self.tracer.forget_pid(child)
            return
        got = self.holders.forked(ev.pid, child)
        if not got:
            return
        self.counters["forks_followed"] += 1
        if self.tracer is not None:
            for fd, inode in got:  # so the child's closes and exit are reported
                with contextlib.suppress(Exception):
                    self.tracer.track(child, fd, inode=inode, netns=ev.netns)

    def _execed(self, pid: int) -> None:
        """After exec, close-on-exec fds are gone without a traced close: check each."""
        for fd, inode in self.holders.held_by(pid):
            if not _still_holds(pid, fd, inode):
                if self.tracer is not None:
                    with contextlib.suppress(Exception):
                        self.tracer.untrack(pid, fd)
                self._closed(pid, fd)

    def _referenced(self) -> set[int]:
        """Every socket handle the engine holds (the rest of `socks` may be closed)."""
        assert self.engine is not None
        return self.engine.held_socks()

    def _gc_socks(self) -> None:
        """Close copies the engine dropped without a `CloseSocket` (seen unreferenced twice)."""
        if self.engine is None:
            return
        unreferenced = (set(self.socks) | set(self.uncopied)) - self._referenced()
        for ref in unreferenced & self._unreferenced:
            self.counters["socks_collected"] += 1
            self._close_sock(ref)
        self._unreferenced = unreferenced

    def _copy_later(self, ev: SocketEvent) -> int:
        """A handle for the traced socket; the copy itself is taken on first use."""
        ref = next(self._uncopied_refs)
        self.uncopied[ref] = (ev.pid, ev.fd, ev.sock_ino)
        return ref

    def _listen_addrs(self, pid: int, laddr: str | None) -> list[str]:
        if laddr and laddr not in ("0.0.0.0", "::"):
            return [laddr] if self._local(laddr) else []
        if pid not in self.addr_cache:
            try:
                self.addr_cache[pid] = netns_ipv4_addresses(pid)
            except OSError as exc:
                log.info("pid %d: cannot read its addresses: %s", pid, exc)
                return []
        return [a for a in self.addr_cache[pid] if self._local(a)]

    # -- status -----------------------------------------------------------------------------

    def _declare_metrics(self) -> None:
        for name, help_text in (("connections_seen", "overlay connections traced on this node"),
                                ("connections_bypassed", "connections moved to the host network"),
                                ("connections_failed", "connections left on the overlay"),
                                ("connections_short", "connections closed before min_age "
                                                      "(never tried)"),
                                ("peer_frames_rejected", "peer frames rejected")):
            self.metrics.declare(name, "counter", help_text)
        self.metrics.declare("connections_pending", "gauge", "connections being swapped")

    def status(self) -> dict[str, Any]:
        """Counters and connections (runs on the loop)."""
        assert self.engine is not None
        summary = self.engine.summary()
        rejected = dict(self.codec.rejected) if self.codec else {}
        pending = summary["pending"]
        counters = {
            "seen": self.counters["seen"],
            "bypassed": summary["bypassed"],
            "bypassed_client": self.counters["swapped_client"],
            "bypassed_server": self.counters["swapped_server"],
            "pending": pending,
            "failed": summary["failed"],
            "short": summary["short"],  # closed before anything was tried
            "skipped": summary["skipped"],  # left alone by decision (not remote..)
            "peer_rejected": sum(rejected.values()) + self.counters["host_conn_rejected"],
            "ruled_out": self.counters["ruled_out"],
        }
        self.metrics.set("connections_seen", counters["seen"])
        self.metrics.set("connections_bypassed", counters["bypassed"])
        self.metrics.set("connections_failed", counters["failed"])
        self.metrics.set("connections_short", counters["short"])
        self.metrics.set("connections_pending", pending)
        self.metrics.set("peer_frames_rejected", counters["peer_rejected"])
        freezes = sorted(self.injector.freeze_ns)
        swaps = sorted(self.swap_latency_ns)
        return {
            "node": self.node,
            "host_addr": self.host_addr,
            "pod_cidrs": [str(n) for n in self.pod_cidrs],
            "uptime_s": time.monotonic() - self.started,
            "peers": sorted(h for h, c in self.clients.items() if c.connected.is_set()),
            "counters": counters,
            "engine": summary,
            "daemon": dict(self.counters),
            "peer_rejected": rejected,
            "freeze_ms_p99": _pct(freezes, 0.99),
            "traced_to_swapped_ms_p50": _pct(swaps, 0.5),
            "traced_to_swapped_ms_p99": _pct(swaps, 0.99),
            "connections": self.engine.connections(),
            "listeners": [{"overlay": lst["overlay"], "host": lst["host"], "pid": lst["pid"],
                           "family": _family_name(self.socks.get(lst["sock"]))
                           if lst["sock"] is not None else None}
                          for lst in self.engine.listener_table()],
            "tracer_lost": self.tracer.lost if self.tracer is not None else 0,
            "rules": len(self.rules.rules) if self.rules is not None else 0,
            "rules_error": str(self.rules.last_error) if self.rules and self.rules.last_error
            else None,
            "rules_loaded": not self.rules.rules.closed if self.rules is not None else False,
            "kubernetes": self.cluster.status() if self.cluster is not None else None,
            "daemon_socks": len(self.socks),
            "traced_uncopied": len(self.uncopied),
            "timers": sum(len(h) for h in self.timers.values()),
            "prog_ids": self.tracer.prog_ids if self.tracer is not None else [],
            "capabilities": self.privileges,
            "frozen_now": self.injector.frozen_pids(),
        }

    def _status_threadsafe(self) -> dict[str, Any]:
        loop = self.loop
        if loop is None or loop.is_closed():
            return {"node": self.node, "counters": {}, "connections": []}

        async def get() -> dict[str, Any]:
            return self.status()

        return asyncio.run_coroutine_threadsafe(get(), loop).result(timeout=5)


def _in_thread(fn: Any) -> None:
    """Run `fn` in a short-lived thread and wait (re-raising its exception)."""
    error: list[BaseException] = []

    def work() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error.append(exc)

    thread = threading.Thread(target=work, name="discover")
    thread.start()
    thread.join()
    if error:
        raise error[0]


def _tgid(pid: int) -> int | None:
    """The thread group of task `pid` (== pid for a process), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _still_holds(pid: int, fd: int, inode: int) -> bool:
    """Whether fd `fd` of `pid` is socket `inode` now (a pidfd_getfd copy, closed at once)."""
    try:
        copy = getfd(pid, fd)
    except (InjectorError, OSError):
        return False
    try:
        return os.fstat(copy).st_ino == inode
    finally:
        os.close(copy)


def _family_name(what: socket.socket | int | None) -> str | None:
    """'inet' / 'inet6' for a socket or a family number (None for None)."""
    if what is None:
        return None
    family = what.family if isinstance(what, socket.socket) else what
    return {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}.get(family, str(family))


def _pct(values: list[int], q: float) -> float | None:
    """Percentile `q` of sorted nanosecond values, in milliseconds."""
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * q))] / 1e6


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def peek_unread(sock: socket.socket, size: int) -> bytes:
    """All `size` unread bytes of TCP socket `sock`, without consuming them (MSG_PEEK).

    The socket's owner is frozen, so nothing reads them meanwhile; a rollback leaves the
    socket exactly as it was. Raises ValueError if the receive queue does not hold exactly
    `size` bytes (it changed since the check, or a peek offset is set).
    """
    unread, _ = queue_sizes(sock)
    if unread != size:
        raise ValueError(f"fd {sock.fileno()}: {unread} unread bytes, expected {size}")
    data = b""
    for _ in range(8):  # one peek returns every queued segment; repeat if it came up short
        if not size:
            return b""
        data = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) == size:
            return data
    raise ValueError(f"fd {sock.fileno()}: peek returned {len(data)} of {size} unread bytes")


async def _carry(loop: asyncio.AbstractEventLoop, host: socket.socket, mine: bytes,
                 echo_len: int) -> None:
    """Send `mine`, meanwhile read exactly `echo_len` bytes; then send those back after it."""
    writer = asyncio.ensure_future(loop.sock_sendall(host, mine)) if mine else None
    try:
        theirs = await _recv_exact(loop, host, echo_len) if echo_len else b""
        if writer is not None:
            await writer
    finally:
        if writer is not None and not writer.done():
            writer.cancel()
    if theirs:
        await loop.sock_sendall(host, theirs)


_GONE_STATES = frozenset({"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "CLOSING"})


def _peer_closed(sock: socket.socket) -> bool:
    """True if the other end closed (FIN or reset, even behind unread data); never consumes."""
    with contextlib.suppress(OSError):  # not TCP (a test's socketpair): the peek decides
        if TCP_STATES.get(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]) \
                in _GONE_STATES:
            return True
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


def run_daemon(options: DaemonOptions) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 1 (one message) if it cannot start."""
    daemon = Daemon(options)
    try:
        asyncio.run(daemon.run())
    except DaemonError as exc:
        print(f"ebpf-router: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
