"""The node daemon: builds the parts, connects them on one asyncio loop, starts and stops them.

    tracer ───────── scoping.NodeScope ───────┐
    peer server ──── runners.peers ───────────┼──> events ──> Engine.handle ──> actions
    host listeners ─ runners.hostconn ────────┘      ^                             │
                                                     └── results ── runners <──────┘
                                                                    ACTION_RUNNERS[type(action)]

The engine (:mod:`ebpfrouter.engine`) decides; the runners (:mod:`ebpfrouter.runners`) act;
this module only wires. Socket handles given to the engine (`SockRef`) are the daemon's own
(:mod:`ebpfrouter.socktable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import time

from injector.netns import run_in_thread

from . import hostnet, startup
from .config import ConfigError, RouterConfig
from .control import ControlError, ControlServer, HealthServer, Metrics
from .engine import Action, ActionFailed, Engine, EngineConfig, Event, ShortLived
from .guardian import Guardian, resume_stopped
from .hostnet import IPNetwork
from .peers import Codec
from .peers.transport import PeerServer
from .policy import SwapPolicy
from .runners import ACTION_RUNNERS, Family, Runner
from .runners.datapath import DataPath
from .runners.hostconn import HostConnections, HostWatch
from .runners.injection import Injection, InjectorThread
from .runners.kernel import TracerMaps
from .runners.peers import PeerLinks
from .runners.sockets import SocketCloser
from .runners.status import SwapNotes
from .runners.timers import Timers
from .scoping import NodeScope
from .socktable import SocketTable
from .startup import StartupError
from .status import Status
from .tracer import Tracer, TracerError
from .wiring import Wiring

log = logging.getLogger(__name__)



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
    kernel_filter: bool = True  # the tracer reports only connections with other nodes' pods,
    # and only once they are `min_age` old (short ones never reach user space)
    swap_batch: int = 4  # swaps of one process that may share one freeze
    read_first_wait: float | None = None  # an accepted connection is swapped once its app
    # has read from it, or once it is this old (0: at once; None: 0 with address
    # virtualization, else 3 s); see `SwapPolicy.server_ready`
    eager: bool = True  # swap at connect()/accept() return (needs address virtualization)
    eager_mode: str = "auto"  # which listeners: learned ("auto") or "always"
    eager_wait: float = 0.1  # how long a stopped app waits for the other side
    addrvirt_pin: str | None = ""  # bpffs dir keeping address virtualization across restarts
    # ("": /sys/fs/bpf/ebpf-router/addrvirt-<node, dots as _>; None: not pinned)
    drain_wait: float = 0.05
    bounce_timeout: float = 1.0  # carrying unread bytes over the host connection (frozen)
    drop_privileges: bool = True
    bind_timeout: float = 5.0
    rules_poll: float = 2.0
    peer_refresh: float = 10.0


class Daemon:
    """One node's router. `await run()` serves until `stop()` (or SIGTERM/SIGINT)."""

    def __init__(self, options: DaemonOptions) -> None:
        self.options = options
        self.config = cfg = options.config
        self.wiring = w = Wiring(self.feed)
        self.counters = w.counters
        self.metrics = Metrics()
        self.injector = InjectorThread(options.freeze_timeout, on_resumed=self._stop_settled)
        self.sockets = SocketTable(w, in_scope=lambda netns: self.scope.in_scope(netns))
        self.scope = NodeScope(w, self.sockets, hostnet.PeerMap(options.peers),
                               list(options.pod_cidrs))
        self.policy = SwapPolicy(w, self.scope, self.sockets, options.read_first_wait or 0.0)
        self.watch = HostWatch(w, self.sockets)
        self.hosts = HostConnections(w, self.sockets, self.scope, self.watch,
                                     options.bind_timeout, self.scope.find_unseen_accept)
        self.peers = PeerLinks(w, self.scope, cfg.router_port)
        self.timers = Timers(w)
        self.notes = SwapNotes(w, self.scope.take_traced_at)
        self.injection = Injection(w, self.sockets, self.injector, self.watch.unwatch)
        self.tracer_maps = TracerMaps(w, self.scope.cidrs_of)
        self.guardian: Guardian | None = None
        self.runner_for: dict[Family, Runner] = {
            Family.HOST: self.hosts,
            Family.DATAPATH: DataPath(w, self.sockets, self.watch.unwatch, options.drain_wait,
                                      options.bounce_timeout),
            Family.INJECTION: self.injection,
            Family.PEERS: self.peers,
            Family.TIMERS: self.timers,
            Family.SOCKETS: SocketCloser(self.sockets),
            Family.STATUS: self.notes,
            Family.KERNEL: self.tracer_maps,
        }
        self.status = Status(w, self.scope, self.sockets, self.policy, self.peers,
                             self.injector, self.notes, self.timers, self.metrics)
        self.server: PeerServer | None = None
        self.control: ControlServer | None = None
        self.health: HealthServer | None = None
        self._stop: asyncio.Event | None = None
        self._ready = False
        self._beat = time.monotonic()

    # -- start -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open everything; raise `DaemonError` naming what failed (and undo the rest)."""
        w, cfg, opts, scope = self.wiring, self.config, self.options, self.scope
        w.loop = loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            cfg.validate()
        except ConfigError as exc:
            raise DaemonError(str(exc)) from None
        assert cfg.host_if and cfg.overlay_if and cfg.key is not None
        try:
            run_in_thread(lambda: startup.discover_node(  # pyroute2 wants no running loop
                scope, cfg.host_if or "", cfg.overlay_if or "", opts.node_name,
                pod_cidrs_later=opts.kubernetes), name="discover")
            startup.load_policy(self.policy, scope, cfg.rules_dir, opts.pod_metadata,
                                self.counters)
            if opts.scope_netns:
                startup.limit_netns(scope, opts.scope_netns)
            if opts.kubernetes:
                startup.build_cluster(scope, self.policy, opts.kubeconfig, opts.node_name)
        except StartupError as exc:
            raise DaemonError(str(exc)) from None
        self.peers.codec = self.hosts.codec = codec = Codec(cfg.key)
        virt = self.injection.virtualizer = startup.open_virtualizer(scope.node, opts.addrvirt_pin,
                                                                     self.counters)
        if opts.read_first_wait is None:  # apps that check getpeername() are served by virt
            self.policy.read_first_wait = 0.0 if virt is not None else 3.0
        eager = opts.eager and virt is not None
        if opts.eager and not eager:
            log.warning("eager swap off: it needs address virtualization (see above); "
                        "connections are swapped late")
        w.engine = Engine(EngineConfig(node=scope.node, min_age=opts.min_age,
                                       max_swaps_per_process=opts.swap_batch, eager=eager,
                                       eager_wait=opts.eager_wait,
                                       eager_mode=opts.eager_mode),
                          scope.peer_of, self.policy.allow, server_ready=self.policy.server_ready,
                          shared=scope.shared, listener_mode=self.policy.listener_mode)
        self.server = PeerServer(codec, self.peers.on_message, host=scope.host_addr,
                                 port=cfg.router_port)
        try:
            await self.server.start()
        except OSError as exc:
            raise DaemonError(f"ROUTER_PORT: {exc.strerror or exc}") from None
        try:
            w.tracer = tracer = Tracer(filter_remote=opts.kernel_filter,
                                       age=opts.min_age if opts.kernel_filter else 0.0)
            tracer.open()
        except (TracerError, OSError) as exc:
            raise DaemonError(f"tracer: {exc}") from None
        self.tracer_maps.sync_remote_pods(scope.peer_hosts())  # before the seed: none missed
        if eager:  # before the first stop: resumes what a dead daemon would leave stopped
            self.guardian = Guardian(tracer.stops_map)
        if opts.drop_privileges:  # before any thread exists: capabilities are per thread
            self.status.privileges = startup.drop_privileges(self.counters)
        if scope.cluster is not None:
            try:
                await startup.start_cluster(scope, scope.cluster, opts.kubernetes_sync_timeout,
                                            bool(opts.pod_cidrs), cfg.overlay_if, self.counters)
            except StartupError as exc:
                raise DaemonError(str(exc)) from None
        self.status.declare_metrics()
        try:
            self.control = ControlServer(cfg.control_socket, self.status.threadsafe)
            self.control.start()
        except (ControlError, OSError) as exc:
            raise DaemonError(f"control socket {cfg.control_socket}: {exc}") from None
        if opts.health_port is not None:
            try:
                self.health = HealthServer(opts.health_port, self.metrics,
                                           ready=lambda: self._ready, alive=self._alive)
                self.health.start()
            except OSError as exc:
                raise DaemonError(f"health port {opts.health_port}: "
                                  f"{exc.strerror or exc}") from None
        loop.add_reader(tracer.fileno(), self._on_tracer_readable)
        for host in sorted(scope.peer_hosts()):
            self.peers.ensure(host)
        seeded = tracer.seed(on_denied=self.sockets.note_uninspectable)
        for ev in seeded:
            scope.on_socket_event(ev)
        log.info("seeded %d existing sockets (pod netns %s)", len(seeded),
                 sorted(scope.local_netns) if scope.local_netns is not None else "any")
        w.spawn(self._housekeeping())
        if tracer.age_ns:
            w.spawn(self._drain_grown_up(tracer))
        self._ready = True
        log.warning("ebpf-router on %s: host %s, pod CIDRs %s, peers %s, port %d", scope.node,
                    scope.host_addr, ", ".join(map(str, scope.pod_cidrs)),
                    ", ".join(sorted(scope.peer_hosts())) or "none", self.server.port)

    # -- run and stop ------------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until stopped, then shut down cleanly."""
        try:
            await self.start()
            loop, stop = self.wiring.running_loop, self._stop
            assert stop is not None
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
            await stop.wait()
        finally:
            await self.shutdown()

    def _alive(self) -> bool:
        """The loop turned recently (the housekeeping task beats every `rules_poll`)."""
        return time.monotonic() - self._beat < 3 * self.options.rules_poll + 5

    def stop(self) -> None:
        """Ask the loop to shut down."""
        if self._stop is not None:
            self._stop.set()

    async def shutdown(self) -> None:
        """Detach BPF, thaw every frozen process, close sockets, remove the control socket."""
        w = self.wiring
        self._ready = False
        loop = asyncio.get_running_loop()
        w.draining = True
        deadline = time.monotonic() + 5.0
        while w.engine is not None and w.engine.swaps_in_flight() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # let running two-phase swaps commit or roll back
        if w.tracer is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(w.tracer.fileno())
        if w.tracer is not None:  # stop no more apps; resume those still waiting
            with contextlib.suppress(Exception):
                w.tracer.eager_clear()
        await loop.run_in_executor(None, self.injector.close)
        if w.tracer is not None:
            with contextlib.suppress(Exception):
                self.counters["resumed_at_stop"] += len(resume_stopped(w.tracer.stops_map))
        if self.guardian is not None:
            self.guardian.close()
        tasks = list(w.tasks) + list(self.hosts.listen_tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        self.watch.unwatch_all()
        await self.peers.close()
        if self.server is not None:
            await self.server.close()
        self.sockets.close_all()
        if w.tracer is not None:
            w.tracer.close()
            w.tracer = None
        virt = self.injection.virtualizer
        if virt is not None:  # keep it pinned only while swapped connections still need it
            swapped = bool(self.injection.cookies)
            with contextlib.suppress(Exception):
                virt.close() if swapped else virt.destroy()
        if self.control is not None:
            self.control.close()
        if self.health is not None:
            self.health.close()
        if self.scope.cluster is not None:
            await loop.run_in_executor(None, self.scope.cluster.stop)

    async def _housekeeping(self) -> None:
        """Poll the rules directory and refresh the peer map from the overlay routes."""
        opts, scope = self.options, self.scope
        last_peers = time.monotonic()
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(opts.rules_poll)
            lag = time.monotonic() - self._beat - opts.rules_poll
            if lag > 0.2:
                log.warning("event loop stalled for %.0f ms", lag * 1000)
            self.counters["loop_lag_max_ms"] = max(self.counters["loop_lag_max_ms"],
                                                   int(lag * 1000))
            self.status.snapshot()  # refreshes the metrics
            scope.forget_addresses()  # peer map, pod CIDRs or Nodes may have changed
            assert self.policy.rules is not None
            if self.policy.rules.poll():
                self.counters["rules_reloads"] += 1
                for action in self.wiring.running_engine.rules_changed():
                    self.run_action(action)
            self.sockets.collect(self.wiring.running_engine.held_socks())
            scope.prune_exited()
            for host in scope.cluster_hosts():
                self.peers.ensure(host)
            self.tracer_maps.sync_remote_pods(scope.peer_hosts())
            self._feed_short_lived()
            if self.guardian is not None and not self.guardian.alive():
                log.warning("the guardian (pid %d) is gone; starting a new one", self.guardian.pid)
                assert self.wiring.tracer is not None
                self.guardian = Guardian(self.wiring.tracer.stops_map)
            if time.monotonic() - last_peers >= opts.peer_refresh:
                last_peers = time.monotonic()
                assert self.config.overlay_if
                try:
                    found = await self.wiring.running_loop.run_in_executor(
                        None, hostnet.overlay_peers, self.config.overlay_if)
                except (hostnet.HostNetError, OSError) as exc:
                    log.warning("refreshing peers from %s: %s", self.config.overlay_if, exc)
                else:
                    scope.peer_map.update_discovered(found)
                for host in scope.peer_map.hosts():
                    self.peers.ensure(host)
                self.tracer_maps.refresh()

    async def _drain_grown_up(self, tracer: Tracer) -> None:
        """Read the connections the kernel held until `min_age` as they grow up: they arrive
        without a wake-up, so read by the time `Tracer.next_due` says (at most `min_age`
        apart, at least 25 ms)."""
        while True:
            await asyncio.sleep(tracer.next_due() or 0.0)
            if not tracer.closed:
                self._on_tracer_readable()

    def _feed_short_lived(self) -> None:
        """Tell the engine how many accepts closed young in the kernel, per listener (what
        `--eager auto` learns from)."""
        tracer = self.wiring.tracer
        if tracer is None or not tracer.age_ns:
            return
        try:
            closes = tracer.young_closes()
        except (OSError, ValueError) as exc:
            log.warning("reading young closes: %s", exc)
            return
        for (addr, port), count in closes.items():
            self.feed(ShortLived(addr, port, count))

    # -- events in, actions out --------------------------------------------------------------

    def feed(self, event: Event) -> None:
        """Hand one event to the engine and run what it asks for."""
        try:
            actions = self.wiring.running_engine.handle(event)
        except Exception:  # the engine must never take the daemon down
            log.exception("engine failed on %s", type(event).__name__)
            self.counters["engine_errors"] += 1
            return
        for action in actions:
            try:
                self.run_action(action)
            except Exception as exc:
                log.exception("action %s failed", type(action).__name__)
                ref = getattr(action, "ref", None)
                if ref is not None:
                    self.wiring.later(ActionFailed(ref, f"{type(action).__name__}: {exc}"))

    def run_action(self, action: Action) -> None:
        """Run one action with the runner of its family."""
        self.runner_for[ACTION_RUNNERS[type(action)]].run(action)

    def _stop_settled(self, pid: int) -> None:
        """The injector resumed `pid`: the tracer's record of its stop goes (any thread)."""
        tracer = self.wiring.tracer
        if tracer is not None:
            tracer.stop_settled(pid)

    def _on_tracer_readable(self) -> None:
        tracer = self.wiring.tracer
        assert tracer is not None
        try:
            events = tracer.read(0)
        except Exception as exc:
            log.error("tracer read: %s", exc)
            self.counters["tracer_errors"] += 1
            return
        for ev in events:
            try:
                self.scope.on_socket_event(ev)
            except Exception:
                log.exception("tracer event %s", ev)
                self.counters["tracer_errors"] += 1


def run_daemon(options: DaemonOptions) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 1 (one message) if it cannot start."""
    daemon = Daemon(options)
    try:
        asyncio.run(daemon.run())
    except DaemonError as exc:
        print(f"ebpf-router: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
