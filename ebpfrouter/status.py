"""`ebpf-router status`: one engine summary plus the daemon's own counters; metrics too.

`Status.snapshot()` runs on the event loop (the control socket's thread asks through
`Status.threadsafe`); each snapshot also sets the Prometheus metrics of `control.Metrics`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .control import Metrics
from .metrics import declare_all, observe_samples
from .policy import SwapPolicy
from .runners.injection import InjectorThread, family_name
from .runners.peers import PeerLinks
from .runners.status import SwapNotes
from .runners.timers import Timers
from .scoping import NodeScope
from .socktable import SocketTable
from .wiring import Wiring


def percentile_ms(values: list[int], q: float) -> float | None:
    """Percentile `q` of sorted nanosecond values, in milliseconds (None if there are none)."""
    if not values:
        return None
    return values[min(len(values) - 1, int(len(values) * q))] / 1e6


class Status:
    """What the daemon reports about itself; `privileges` is set once they are dropped."""

    def __init__(self, wiring: Wiring, scope: NodeScope, sockets: SocketTable,
                 policy: SwapPolicy, peers: PeerLinks, injector: InjectorThread,
                 notes: SwapNotes, timers: Timers, metrics: Metrics) -> None:
        self.wiring = wiring
        self.scope = scope
        self.sockets = sockets
        self.policy = policy
        self.peers = peers
        self.injector = injector
        self.notes = notes
        self.timers = timers
        self.metrics = metrics
        self.started = time.monotonic()
        self.privileges: list[str] | None = None  # capabilities kept after the drop

    def declare_metrics(self) -> None:
        """Declare the metrics (`ebpfrouter.metrics`); freeze and swap times feed histograms.

        Called once at start-up, before the first freeze.
        """
        declare_all(self.metrics)
        self.injector.freeze_ns = observe_samples(self.injector.freeze_ns, self.metrics,
                                                  "freeze_seconds")
        self.notes.latency_ns = observe_samples(self.notes.latency_ns, self.metrics,
                                                "traced_to_swapped_seconds")

    def snapshot(self) -> dict[str, Any]:
        """Counters and connections (runs on the loop)."""
        engine, counters_in = self.wiring.running_engine, self.wiring.counters
        tracer, rules, cluster = self.wiring.tracer, self.policy.rules, self.scope.cluster
        summary = engine.summary()
        codec = self.peers.codec
        rejected = dict(codec.rejected) if codec else {}
        pending = summary["pending"]
        counters = {
            "seen": counters_in["seen"],
            "bypassed": summary["bypassed"],
            "bypassed_client": counters_in["swapped_client"],
            "bypassed_server": counters_in["swapped_server"],
            "pending": pending,
            "failed": summary["failed"],
            "short": summary["short"],  # closed before anything was tried
            "skipped": summary["skipped"],  # left alone by decision (not remote..)
            "peer_rejected": sum(rejected.values()) + counters_in["host_conn_rejected"],
            "ruled_out": counters_in["ruled_out"],
        }
        tracer_figures = self._tracer_figures()
        counters["short_in_kernel"] = tracer_figures.get("closed_young", 0)  # never "seen"
        self._set_metrics(counters, pending, tracer.lost if tracer is not None else 0)
        freezes = sorted(self.injector.freeze_ns)
        swaps = sorted(self.notes.latency_ns)
        return {
            "node": self.scope.node,
            "host_addr": self.scope.host_addr,
            "pod_cidrs": [str(n) for n in self.scope.pod_cidrs],
            "uptime_s": time.monotonic() - self.started,
            "peers": self.peers.connected(),
            "counters": counters,
            "engine": summary,
            "daemon": dict(counters_in),
            "peer_rejected": rejected,
            "freeze_ms_p99": percentile_ms(freezes, 0.99),
            "traced_to_swapped_ms_p50": percentile_ms(swaps, 0.5),
            "traced_to_swapped_ms_p99": percentile_ms(swaps, 0.99),
            "connections": engine.connections(),
            "listeners": [{"overlay": lst["overlay"], "host": lst["host"], "pid": lst["pid"],
                           "family": family_name(self.sockets.held(lst["sock"]))
                           if lst["sock"] is not None else None}
                          for lst in engine.listener_table()],
            "tracer_lost": tracer.lost if tracer is not None else 0,
            "tracer": tracer_figures,
            "rules": len(rules.rules) if rules is not None else 0,
            "rules_error": str(rules.last_error) if rules and rules.last_error else None,
            "rules_loaded": not rules.rules.closed if rules is not None else False,
            "kubernetes": cluster.status() if cluster is not None else None,
            "daemon_socks": len(self.sockets.socks),
            "traced_uncopied": len(self.sockets.uncopied),
            "timers": len(self.timers),
            "prog_ids": tracer.prog_ids if tracer is not None else [],
            "capabilities": self.privileges,
            "frozen_now": self.injector.frozen_pids(),
        }

    def _tracer_figures(self) -> dict[str, Any]:
        """What the in-kernel filter holds and spared user space."""
        tracer = self.wiring.tracer
        if tracer is None or tracer.closed:
            return {}
        try:
            return {"filter_remote": tracer.filter_remote, "age_s": tracer.age_ns / 1e9,
                    "remote_pod_cidrs": tracer.remote_pod_entries(),
                    "young_waiting": tracer.young_entries() if tracer.age_ns else 0,
                    "closed_young": tracer.young_closed if tracer.age_ns else 0}
        except (OSError, ValueError) as exc:
            return {"error": str(exc)}

    def _set_metrics(self, counters: dict[str, int], pending: int, lost: int) -> None:
        m = self.metrics
        m.set("connections_seen_total", counters["seen"])
        m.set("connections_bypassed_total", counters["bypassed"])
        m.set("connections_failed_total", counters["failed"])
        m.set("connections_short_total", counters["short"])
        m.set("connections_closed_young_in_kernel_total", counters["short_in_kernel"])
        m.set("peer_frames_rejected_total", counters["peer_rejected"])
        m.set("tracer_events_lost_total", lost)
        m.set("connections_pending", pending)
        m.set("processes_frozen", len(self.injector.frozen_pids()))

    def threadsafe(self) -> dict[str, Any]:
        """`snapshot()` from another thread (the control socket's)."""
        loop = self.wiring.loop
        if loop is None or loop.is_closed():
            return {"node": self.scope.node, "counters": {}, "connections": []}

        async def get() -> dict[str, Any]:
            return self.snapshot()

        return asyncio.run_coroutine_threadsafe(get(), loop).result(timeout=5)
