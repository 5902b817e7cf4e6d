"""The daemon's resources under a short-connection flood on the testbed (root).

FLOOD_CONNECTIONS (15,000) short connections (`ebpfrouter.bench.connrate`, two clients in
n2p0, the server in n1p0) through two routers, measured once for the module: every
connection accounted for, tables and fds back to where they were, RSS growth bounded. The
100,000-connection figures are `bench/bench_bounds.py`'s (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from ebpfrouter.demo import PACKAGE_ROOT, Routers, child_env, wait_line, wait_port
from ebpfrouter.testbed import Testbed

FLOOD_CONNECTIONS = int(os.environ.get("FLOOD_CONNECTIONS", "15000"))
CLIENTS = 2
PORT = 7220
NODES = ("node1", "node2")
FD_SLACK = 2  # a peer control connection may be re-dialled meanwhile
RSS_BOUND_KIB = 32 * 1024


def _proc(pid: int) -> dict[str, int]:
    rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return {"rss_kib": int(rss.split()[1]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _snapshot(routers: Routers) -> dict[str, dict[str, Any]]:
    return {node: {**_proc(routers.procs[node].pid), "status": routers.status(node)}
            for node in NODES}


def _drained(status: dict[str, Any]) -> bool:
    eng = status["engine"]
    return (eng["connections"] == eng["young"] == eng["waiting_listener"]
            == eng["waiting_bind"] == status["traced_uncopied"] == status["counters"]["pending"]
            == 0)


def _flood(bed: Testbed, seconds_cap: float = 30.0) -> list[dict[str, Any]]:
    """Connrate clients in rounds until FLOOD_CONNECTIONS are done; their JSON results."""
    results: list[dict[str, Any]] = []
    host = bed.pod("n1p0").ip
    deadline = time.monotonic() + seconds_cap
    while sum(r["connections"] for r in results) < FLOOD_CONNECTIONS:
        assert time.monotonic() < deadline, f"flood too slow: {results}"
        procs = [bed.popen("n2p0", [sys.executable, "-m", "ebpfrouter.bench.connrate", "client",
                                    host, str(PORT), "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=child_env(),
                           cwd=str(PACKAGE_ROOT))
                 for _ in range(CLIENTS)]
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=40)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 0, err
            results.append(json.loads(out))
    return results


@pytest.fixture(scope="module")
def flood() -> Any:
    """Build, measure before, flood, wait for the tables to drain, measure after; remove."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    bed = Testbed.up(2, 1)
    server: subprocess.Popen[str] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="bounds-test-") as tmp:
            routers = Routers(bed, Path(tmp), loglevel="WARNING")
            try:
                routers.start()
                pod = bed.pod("n1p0")
                server = bed.popen(pod.name, [sys.executable, "-m", "ebpfrouter.bench.connrate",
                                              "serve", str(PORT)], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True, env=child_env(),
                                   cwd=str(PACKAGE_ROOT))
                wait_line(server, "connrate server")
                wait_port(bed, pod.name, pod.ip, PORT)
                time.sleep(0.5)  # the listener's announcement and host socket settle
                before = _snapshot(routers)
                start = time.monotonic()
                clients = _flood(bed)
                seconds = time.monotonic() - start
                deadline = time.monotonic() + 15  # an unmatched accept waits 10 s at most
                while not all(_drained(routers.status(n)) for n in NODES) \
                        and time.monotonic() < deadline:
                    time.sleep(0.25)
                after = _snapshot(routers)
                print(f"{sum(r['connections'] for r in clients)} connections in {seconds:.1f} s; "
                      + "; ".join(f"{n}: RSS {before[n]['rss_kib']} -> {after[n]['rss_kib']} KiB, "
                                  f"fds {before[n]['fds']} -> {after[n]['fds']}, "
                                  f"counters {after[n]['status']['counters']}, "
                                  f"lost {after[n]['status']['tracer_lost']}" for n in NODES))
                yield {"before": before, "after": after, "clients": clients}
            finally:
                if server is not None:
                    server.kill()
                    server.wait()
                routers.stop()
    finally:
        bed.down()


def _delta(flood: dict[str, Any], node: str, key: str) -> int:
    return (flood["after"][node]["status"]["counters"][key]
            - flood["before"][node]["status"]["counters"][key])


@pytest.mark.root
@pytest.mark.slow
def test_flood_leaves_tables_fds_and_memory_as_they_were(flood: dict[str, Any]) -> None:
    clients = flood["clients"]
    made = sum(r["connections"] for r in clients)
    assert made >= FLOOD_CONNECTIONS
    assert sum(r["errors"] for r in clients) == 0, [r["first_error"] for r in clients]
    for node in NODES:
        before, after = flood["before"][node], flood["after"][node]
        status = after["status"]
        assert _drained(status), (node, status["engine"], status["traced_uncopied"])
        assert status["daemon_socks"] == before["status"]["daemon_socks"], node  # listeners
        # no timer per traced connection left behind (the engine cancels what it let go);
        # the per-process freeze-rate timers of the long streams live 1 s
        assert status["timers"] <= before["status"]["timers"] + 8, (node, status["timers"])
        assert abs(after["fds"] - before["fds"]) <= FD_SLACK, (node, before["fds"], after["fds"])
        grown = after["rss_kib"] - before["rss_kib"]
        assert grown < RSS_BOUND_KIB, f"{node}: RSS grew {grown} KiB over {made} connections"
        assert status["frozen_now"] == [], node
    # every connection traced on the client side, once: reported (seen) or, closed young,
    # forgotten in the kernel (short_in_kernel, the kernel filter's default); a dropped tracer
    # record (counted, not expected at this rate) is a connection missed, never one counted
    # twice
    lost = flood["after"]["node2"]["status"]["tracer_lost"]
    assert isinstance(lost, int) and lost <= made // 100, lost
    traced = _delta(flood, "node2", "seen") + _delta(flood, "node2", "short_in_kernel")
    assert made - lost <= traced <= made, (traced, made, lost)


@pytest.mark.root
@pytest.mark.slow
def test_flood_every_connection_accounted_on_the_client_side(flood: dict[str, Any]) -> None:
    """seen == short + skipped + bypassed + failed + pending on node2 (the connecting side),
    and the flood's connections (each closed within a millisecond or so) end as short: in the
    kernel (never seen by user space), or in the engine."""
    counters = flood["after"]["node2"]["status"]["counters"]
    assert counters["seen"] == (counters["short"] + counters["skipped"] + counters["bypassed"]
                                + counters["failed"] + counters["pending"]), counters
    short = _delta(flood, "node2", "short") + _delta(flood, "node2", "short_in_kernel")
    # a close handled after `min_age` (the daemon lagging) is tried and ends `failed`: rare
    assert short >= 0.99 * (_delta(flood, "node2", "seen")
                            + _delta(flood, "node2", "short_in_kernel")), counters


@pytest.mark.root
@pytest.mark.slow
def test_flood_every_connection_accounted_on_the_server_side(flood: dict[str, Any]) -> None:
    """The accepting side: an accept whose connection closed before the client's bind counts
    as short too."""
    counters = flood["after"]["node1"]["status"]["counters"]
    assert counters["seen"] == (counters["short"] + counters["skipped"] + counters["bypassed"]
                                + counters["failed"] + counters["pending"]), counters
    assert _delta(flood, "node1", "short") >= 0.99 * _delta(flood, "node1", "seen"), counters
