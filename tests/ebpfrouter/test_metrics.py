"""The daemon's metric names: histograms, Prometheus conventions (promtool) and the dashboard.

No root needed; promtool is Debian's (package prometheus, installed by .ci/system-deps).
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ebpfrouter.control import Metrics
from ebpfrouter.metrics import METRICS, declare_all, exported_names, observe_samples

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "ebpf-router" / "dashboards" / "ebpf-router.json"
NAME_RE = re.compile(r"\bebpf_router_[A-Za-z0-9_:]+")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing (Debian: apt-get install prometheus)")
    return path


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on an exposition: lint problems on stderr, non-zero if any."""
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


def daemon_metrics(observed: bool) -> Metrics:
    metrics = Metrics()
    declare_all(metrics)
    if observed:
        for name, kind, _, _ in METRICS:
            if kind == "histogram":
                for v in (0.0004, 0.003, 0.2, 7.0, 100.0):
                    metrics.observe(name, v)
            else:
                metrics.set(name, 3)
    return metrics


def test_histogram_renders_cumulative_buckets_sum_and_count() -> None:
    m = Metrics()
    m.declare("wait_seconds", "histogram", "Waits.", buckets=(0.1, 0.01, 1))
    for v in (0.005, 0.05, 0.05, 5.0):
        m.observe("wait_seconds", v)
    lines = m.render().splitlines()
    assert lines[:2] == ["# HELP ebpf_router_wait_seconds Waits.",
                         "# TYPE ebpf_router_wait_seconds histogram"]
    assert lines[2:] == ['ebpf_router_wait_seconds_bucket{le="0.01"} 1',
                         'ebpf_router_wait_seconds_bucket{le="0.1"} 3',
                         'ebpf_router_wait_seconds_bucket{le="1"} 3',
                         'ebpf_router_wait_seconds_bucket{le="+Inf"} 4',
                         "ebpf_router_wait_seconds_sum 5.105",
                         "ebpf_router_wait_seconds_count 4"]
    assert m.value("wait_seconds") == 4
    with pytest.raises(KeyError, match="histogram"):
        m.set("wait_seconds", 1)
    with pytest.raises(ValueError, match="buckets"):
        m.declare("x", "histogram", "no buckets")
    with pytest.raises(ValueError, match="buckets"):
        m.declare("y_total", "counter", "buckets on a counter", buckets=(1,))


def test_observed_samples_keep_the_bound_and_feed_the_histogram() -> None:
    m = Metrics()
    m.declare("freeze_seconds", "histogram", "Freezes.", buckets=(0.01, 1))
    kept = collections.deque([5_000_000], maxlen=3)  # a sample from before: not re-observed
    samples = observe_samples(kept, m, "freeze_seconds")
    for ns in (2_000_000, 20_000_000, 3_000_000_000):
        samples.append(ns)
    assert list(samples) == [2_000_000, 20_000_000, 3_000_000_000]  # maxlen 3 kept
    assert samples.maxlen == 3
    text = m.render()
    assert 'ebpf_router_freeze_seconds_bucket{le="0.01"} 1' in text
    assert 'ebpf_router_freeze_seconds_bucket{le="1"} 2' in text
    assert "ebpf_router_freeze_seconds_count 3" in text


def test_names_follow_prometheus_conventions() -> None:
    """Counters end in _total, histograms are in seconds; no unit-less duration names."""
    for name, kind, help_text, _ in METRICS:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert help_text.endswith("."), name
        if kind == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
        assert not re.search(r"_(ms|us|ns|millis|kb|mb|percent)(_|$)", name), name


@pytest.mark.parametrize("observed", [False, True], ids=["fresh", "observed"])
def test_promtool_check_metrics_is_clean(observed: bool) -> None:
    result = check_metrics(daemon_metrics(observed).render())
    assert result.returncode == 0 and (result.stdout + result.stderr).strip() == "", \
        result.stdout + result.stderr


def test_promtool_catches_a_counter_without_total() -> None:
    """The check above is not vacuous: promtool flags the old names."""
    m = Metrics()
    m.declare("connections_bypassed", "counter", "The old name.")
    result = check_metrics(m.render())
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'ebpf_router_connections_bypassed counter metrics should have "_total"' in \
        result.stderr


def test_exported_names() -> None:
    names = exported_names()
    assert "ebpf_router_connections_bypassed_total" in names
    assert {"ebpf_router_freeze_seconds_bucket", "ebpf_router_freeze_seconds_sum",
            "ebpf_router_freeze_seconds_count"} <= names
    assert "ebpf_router_freeze_seconds" not in names  # a histogram has no bare sample
    rendered = {line.split("{")[0].split(" ")[0] for line in daemon_metrics(True).render()
                .splitlines() if not line.startswith("#")}
    assert rendered == names


def dashboard_exprs(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and variable queries."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict)
                         else var["query"])
    return exprs


def test_dashboard_is_grafana_json_using_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ebpf-router" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in panels:
        assert panel["title"] and panel["type"] in ("timeseries", "stat"), panel
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs), panel["title"]
    exported = exported_names()
    used = set()
    for expr in dashboard_exprs(dashboard):
        found = NAME_RE.findall(expr)
        assert found, f"expression uses no ebpf_router metric: {expr}"
        used.update(found)
        for var in re.findall(r"\$(\w+)", expr):
            assert var in variables or var.startswith("__"), f"${var} in {expr}"
    assert used <= exported, f"not exported by the daemon: {sorted(used - exported)}"
    # The dashboard shows every counter and the two histograms.
    assert {f"ebpf_router_{n}" for n, kind, _, _ in METRICS if kind != "histogram"} <= used
    assert {"ebpf_router_freeze_seconds_bucket",
            "ebpf_router_traced_to_swapped_seconds_bucket"} <= used
