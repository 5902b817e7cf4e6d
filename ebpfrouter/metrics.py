"""The daemon's Prometheus metrics: names, kinds, help, buckets; and what feeds the histograms.

Names follow the Prometheus conventions (`promtool check metrics` passes): counters end in
`_total`, durations are histograms in seconds. Every name is rendered with the `ebpf_router_`
prefix. The counters are set from the engine's own monotonic counts at each status snapshot
(the daemon's housekeeping beat, every 2 s, or an `ebpf-router status`).

The histograms take each sample as it happens: the injector thread keeps its freeze times,
and the swap notes their traced-to-swapped times, in bounded deques (for the status
percentiles); `observe_samples` puts in their place a deque that also feeds a histogram, so
no sample is missed between two scrapes and the runners need no metrics hook of their own.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable

from .control import Metrics

FREEZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SWAP_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)

# name (without the prefix), kind, help, histogram buckets
METRICS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("connections_seen_total", "counter",
     "Overlay connection ends (connect or accept) traced on this node.", ()),
    ("connections_bypassed_total", "counter",
     "Connection ends swapped onto the host network on this node.", ()),
    ("connections_failed_total", "counter",
     "Connection ends whose swap was given up: left on the overlay.", ()),
    ("connections_short_total", "counter",
     "Connection ends closed before --min-age, never tried.", ()),
    ("connections_closed_young_in_kernel_total", "counter",
     "Connection ends closed before --min-age and forgotten by the BPF programs, never "
     "reported to the daemon (with --kernel-filter on).", ()),
    ("peer_frames_rejected_total", "counter",
     "Peer frames and host connections rejected (bad MAC, schema, replay, size).", ()),
    ("tracer_events_lost_total", "counter",
     "Trace records the kernel dropped because the event buffer was full.", ()),
    ("connections_pending", "gauge",
     "Connection ends traced and not yet swapped, given up or closed.", ()),
    ("processes_frozen", "gauge",
     "Processes held frozen by the injector right now.", ()),
    ("freeze_seconds", "histogram",
     "How long an application process was held frozen, per freeze (a freeze may carry "
     "several swaps).", FREEZE_BUCKETS),
    ("traced_to_swapped_seconds", "histogram",
     "Time from a connection's traced connect() or accept() to its swap on this side.",
     SWAP_BUCKETS),
)


def declare_all(metrics: Metrics) -> None:
    """Declare every metric of `METRICS` on `metrics`."""
    for name, kind, help_text, buckets in METRICS:
        metrics.declare(name, kind, help_text, buckets)


def exported_names() -> set[str]:
    """Every sample name the daemon's `/metrics` carries (histograms: `_bucket` etc.)."""
    metrics = Metrics()
    declare_all(metrics)
    return set(metrics.names())


class ObservedSamples(collections.deque[int]):
    """A bounded deque of nanosecond samples that also observes each one, in seconds."""

    def __init__(self, kept: Iterable[int], maxlen: int | None, metrics: Metrics,
                 name: str) -> None:
        super().__init__(kept, maxlen)
        self._metrics = metrics
        self._name = name

    def append(self, value: int) -> None:
        """Keep `value` and add it to the histogram."""
        super().append(value)
        self._metrics.observe(self._name, value / 1e9)


def observe_samples(samples: collections.deque[int], metrics: Metrics,
                    name: str) -> ObservedSamples:
    """A deque with `samples`' contents and bound whose appends feed histogram `name`."""
    return ObservedSamples(samples, samples.maxlen, metrics, name)
