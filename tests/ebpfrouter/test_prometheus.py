"""A real Prometheus (Debian's) scrapes both routers on the testbed while a connection is swapped.

Prometheus runs in node1's netns and scrapes `/metrics` of node1's and node2's routers over
the underlay; the test asks its HTTP API (`/api/v1/query`) for the swap counters and the
freeze-time histogram before and after the swap, evaluates every expression of the chart's
Grafana dashboard against it, and passes each router's live exposition through `promtool
check metrics`. Prometheus is stopped and its data directory removed even on failure.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_daemon as td  # the daemon tests' testbed, routers and helpers
from test_daemon import Stream, stream_server, wait_for, wait_listener_announced
from test_metrics import DASHBOARD, check_metrics, dashboard_exprs

from ebpfrouter.testbed import Testbed, netns_context

bed = td.bed  # fixture, shared by name

STREAM_PORT = 7460
HEALTH_PORT = 9461  # each router's, in its own node's netns
PROM_PORT = 9462  # Prometheus's, on 127.0.0.1 in node1's netns
JOB = "ebpf-router"


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus missing (Debian: apt-get install prometheus)")
    return path


@contextlib.contextmanager
def prometheus(bed: Testbed, targets: list[str]) -> Iterator[str]:
    """Prometheus in node1's netns scraping `targets` every second; yields its URL."""
    binary = prometheus_binary()
    with tempfile.TemporaryDirectory(prefix="er-prometheus-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}]}))
        log = (Path(tmp) / "prometheus.log").open("wb")
        proc = bed.popen("node1", [binary, f"--config.file={config}",
                                   f"--storage.tsdb.path={Path(tmp) / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{PROM_PORT}",
                                   "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                         stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{PROM_PORT}"
        try:
            wait_for(lambda: proc.poll() is not None or _ready(bed, url), 30, "prometheus ready")
            assert proc.poll() is None, (Path(tmp) / "prometheus.log").read_text()[-2000:]
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            print("--- prometheus log\n" + (Path(tmp) / "prometheus.log").read_text()[-2000:])


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def _get(bed: Testbed, url: str, timeout: float = 5.0) -> bytes:
    """GET `url` from inside node1's netns (this thread enters it for the call)."""
    with netns_context(bed.netns_of("node1")), _DIRECT.open(url, timeout=timeout) as resp:
        return resp.read()


def _ready(bed: Testbed, url: str) -> bool:
    with contextlib.suppress(OSError):
        return _get(bed, url + "/-/ready", timeout=1).startswith(b"Prometheus")
    return False


def query(bed: Testbed, url: str, expr: str) -> list[dict[str, Any]]:
    """`/api/v1/query` of `expr` now: the instant vector's samples (fails on an API error)."""
    answer = json.loads(_get(bed, f"{url}/api/v1/query?"
                                  + urllib.parse.urlencode({"query": expr})))
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def by_instance(samples: list[dict[str, Any]]) -> dict[str, float]:
    return {s["metric"].get("instance", ""): float(s["value"][1]) for s in samples}


def scalar(bed: Testbed, url: str, expr: str) -> float | None:
    samples = query(bed, url, expr)
    return float(samples[0]["value"][1]) if samples else None


@pytest.mark.root
def test_prometheus_sees_swaps_and_freeze_times(bed) -> None:
    n1, n2 = bed.node("node1"), bed.node("node2")
    targets = [f"{n1.underlay_ip}:{HEALTH_PORT}", f"{n2.underlay_ip}:{HEALTH_PORT}"]
    health = ["--health-port", str(HEALTH_PORT)]
    with td._routers(bed) as routers, prometheus(bed, targets) as url:
        routers.start(extra_args={"node1": health, "node2": health})
        up = wait_for(lambda: (u := by_instance(query(bed, url, f'up{{job="{JOB}"}}')))
                      and all(u.get(t) == 1 for t in targets) and u, 30, "both targets up")
        before = {
            "bypassed": by_instance(query(bed, url, "ebpf_router_connections_bypassed_total")),
            "freezes": by_instance(query(bed, url, "ebpf_router_freeze_seconds_count")),
        }
        assert before["bypassed"] == {t: 0 for t in targets}, before
        assert before["freezes"] == {t: 0 for t in targets}, before

        server, client = bed.pod("n1p0"), bed.pod("n2p0")
        with stream_server(bed, server.name, STREAM_PORT):
            wait_listener_announced(routers, "node1", STREAM_PORT)
            stream = Stream(bed, client.name, server.ip, STREAM_PORT)
            wait_for(lambda: (p := stream.peer()) and p[0] == n1.underlay_ip, 10, "swap")
            assert stream.result()["ok"]

        # Counters reach /metrics at the daemons' 2 s beat, then the next 1 s scrape.
        bypassed = wait_for(lambda: (b := by_instance(query(
            bed, url, "ebpf_router_connections_bypassed_total"))) and all(
            b.get(t, 0) >= 1 for t in targets) and b, 15, "bypass counted by Prometheus")
        freezes = wait_for(lambda: (f := by_instance(query(
            bed, url, "ebpf_router_freeze_seconds_count"))) and all(
            f.get(t, 0) >= 1 for t in targets) and f, 15, "freezes counted by Prometheus")
        freeze_sum = by_instance(query(bed, url, "ebpf_router_freeze_seconds_sum"))
        swapped_count = by_instance(query(bed, url, "ebpf_router_traced_to_swapped_seconds_count"))
        p99 = scalar(bed, url, "histogram_quantile(0.99, sum by (le) "
                               "(ebpf_router_freeze_seconds_bucket))")
        swap_p50 = scalar(bed, url, "histogram_quantile(0.5, sum by (le) "
                                    "(ebpf_router_traced_to_swapped_seconds_bucket))")
        moved = scalar(bed, url, "sum(increase(ebpf_router_connections_bypassed_total[5m]))")
        print(f"up {up}\nbefore {before}\nbypassed {bypassed}\nfreeze count {freezes}\n"
              f"freeze sum (s) {freeze_sum}\ntraced-to-swapped count {swapped_count}\n"
              f"freeze p99 (s) {p99}\ntraced-to-swapped p50 (s) {swap_p50}\n"
              f"increase(bypassed[5m]) {moved}")
        assert bypassed == {t: 1 for t in targets}  # one connection, one end on each node
        assert all(0 < freeze_sum[t] < 2.0 for t in targets), freeze_sum
        assert sum(swapped_count.values()) >= 1, swapped_count
        assert p99 is not None and 0 < p99 <= 2.5, p99
        assert swap_p50 is not None and 0 < swap_p50 <= 10, swap_p50
        assert moved is not None and moved > 0, moved

        # Every expression of the chart's dashboard evaluates against the real data.
        subst = {"$__rate_interval": "10s", "$__range": "5m", "$job": JOB, "$instance": ".*"}
        for expr in dashboard_exprs(json.loads(DASHBOARD.read_text())):
            concrete = expr
            for var, value in subst.items():
                concrete = concrete.replace(var, value)
            if concrete.startswith("label_values("):  # a Grafana function, not PromQL
                metric = concrete[len("label_values("):].rsplit(",", 1)[0]
                assert query(bed, url, metric), expr
                continue
            query(bed, url, concrete)  # fails the test on a PromQL error

        # The routers' live expositions pass promtool's lint.
        for target in targets:
            text = _get(bed, f"http://{target}/metrics").decode()
            result = check_metrics(text)
            assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
                f"{target}: {result.stdout}{result.stderr}"
