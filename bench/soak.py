"""Soak: redis-benchmark and iperf3 cycling on the testbed, routers running, for N minutes.

Builds a 2-node testbed (2 pods per node), starts one `ebpf-router run` per node, a
redis-server in n1p0 and an iperf3 server in n1p1, then cycles until the time is up:

    redis-benchmark -c 20 -n 20000 -t set,get  from n2p0   (20 connections per test, 40 per cycle)
    iperf3 -t 5 (one data stream + its control connection)  from n2p1

About every 10 s (between cycles) it samples each daemon's RSS, open fds and status
counters. At the end (or on Ctrl-C / SIGTERM) it prints the samples and a summary: cycles,
client errors, swaps done (`bypassed_client`, counted once per connection), connections left
on the overlay, connections still pending, daemons that died, processes found stopped; then
removes everything. Exit status 0 when no client error happened, no daemon died and nothing
was left stopped. Run as root:

    python3 bench/soak.py --minutes 10 [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpfrouter import tools  # noqa: E402
from ebpfrouter.bench.process import interrupt_on, usage  # noqa: E402
from ebpfrouter.demo import Routers, wait_port  # noqa: E402
from ebpfrouter.testbed import Testbed  # noqa: E402

_spec = importlib.util.spec_from_file_location("faultlib", ROOT / "tests/ebpfrouter/faultlib.py")
assert _spec is not None and _spec.loader is not None
faultlib = importlib.util.module_from_spec(_spec)
sys.modules["faultlib"] = faultlib  # (dataclasses look their module up)
_spec.loader.exec_module(faultlib)

REDIS_PORT, IPERF_PORT = 6390, 5201
SAMPLE_EVERY = 10.0


class Soak:
    """The testbed, routers and servers of one soak; `close()` removes them."""

    def __init__(self, iperf_seconds: int) -> None:
        self.iperf_seconds = iperf_seconds
        self.workdir = Path(tempfile.mkdtemp(prefix="ebpf-router-soak-"))
        self.bed: Testbed | None = None
        self.routers: Routers | None = None
        self.servers: list[subprocess.Popen[Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.cycles = {"redis": 0, "iperf3": 0}
        self.errors: list[str] = []
        self.stopped_seen: set[int] = set()
        self.started = time.monotonic()

    def up(self) -> None:
        progress("building the testbed and starting the routers")
        self.bed = Testbed.up(2, 2)
        self.routers = Routers(self.bed, self.workdir, loglevel="WARNING")
        self.routers.start()
        bed = self.bed
        redis = bed.pod("n1p0")
        self.servers.append(bed.popen(redis.name, [
            "redis-server", "--port", str(REDIS_PORT), "--bind", redis.ip, "--save", "",
            "--appendonly", "no", "--protected-mode", "no"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        self.servers.append(bed.popen("n1p1", ["iperf3", "-s", "-p", str(IPERF_PORT)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(bed, redis.name, redis.ip, REDIS_PORT)
        wait_port(bed, "n1p1", bed.pod("n1p1").ip, IPERF_PORT)

    def sample(self) -> None:
        assert self.routers is not None
        row: dict[str, Any] = {"t": round(time.monotonic() - self.started)}
        for node, proc in self.routers.procs.items():
            alive = proc.poll() is None
            figures = usage(proc.pid) if alive else {"rss_kib": 0, "fds": 0}
            row[f"{node}_rss_kib"], row[f"{node}_fds"] = figures["rss_kib"], figures["fds"]
            if not alive:
                self.errors.append(f"router on {node} exited with {proc.returncode}")
                continue
            try:
                st = self.routers.status(node)
            except Exception as exc:  # noqa: BLE001 - recorded, the soak goes on
                self.errors.append(f"status of {node}: {exc}")
                continue
            c = st["counters"]
            row[f"{node}_swaps"] = c["bypassed_client"]
            row[f"{node}_server_swaps"] = c["bypassed_server"]
            row[f"{node}_overlay"] = c["failed"]
            row[f"{node}_pending"] = c["pending"]
            row[f"{node}_frozen"] = len(st["frozen_now"])
            row[f"{node}_lag_ms"] = st["daemon"].get("loop_lag_max_ms", 0)
        for proc in self.servers:
            if proc.poll() is None and faultlib.stopped(proc.pid):
                self.stopped_seen.add(proc.pid)
        row["redis_cycles"], row["iperf3_cycles"] = self.cycles["redis"], self.cycles["iperf3"]
        row["errors"] = len(self.errors)
        self.samples.append(row)
        progress(" ".join(f"{k}={v}" for k, v in row.items()))

    def redis_cycle(self) -> None:
        assert self.bed is not None
        res = self.bed.run("n2p0", ["redis-benchmark", "-h", self.bed.pod("n1p0").ip, "-p",
                                    str(REDIS_PORT), "-c", "20", "-n", "20000", "-t", "set,get",
                                    "-q"], timeout=120)
        out = res.stdout + res.stderr
        if res.returncode != 0 or "error" in out.lower() or out.count("requests per second") != 2:
            self.errors.append(f"redis-benchmark: rc {res.returncode}: {out.strip()[-200:]}")
        self.cycles["redis"] += 1

    def iperf_start(self) -> subprocess.Popen[str]:
        assert self.bed is not None
        return self.bed.popen("n2p1", ["iperf3", "-c", self.bed.pod("n1p1").ip, "-p",
                                       str(IPERF_PORT), "-t", str(self.iperf_seconds), "-J"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def iperf_done(self, proc: subprocess.Popen[str]) -> None:
        out, err = proc.communicate(timeout=self.iperf_seconds + 60)
        try:
            report = json.loads(out)
        except ValueError:
            report = {"error": (err or out).strip()[-200:]}
        if proc.returncode != 0 or "error" in report:
            self.errors.append(f"iperf3: rc {proc.returncode}: {report.get('error')}")
        self.cycles["iperf3"] += 1

    def run(self, seconds: float) -> None:
        """Cycle both workloads (iperf3 in the background, redis in the foreground)."""
        end = time.monotonic() + seconds
        next_sample = time.monotonic()
        iperf: subprocess.Popen[str] | None = None
        while time.monotonic() < end:
            if iperf is None:
                iperf = self.iperf_start()
            self.redis_cycle()
            if iperf.poll() is not None:
                self.iperf_done(iperf)
                iperf = None
            if time.monotonic() >= next_sample:
                self.sample()
                next_sample += SAMPLE_EVERY
        if iperf is not None:
            self.iperf_done(iperf)
        time.sleep(2.0)  # the last swaps settle
        self.sample()

    def close(self) -> None:
        for proc in self.servers:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()
        if self.routers is not None:
            codes = self.routers.stop()
            for node, code in codes.items():
                if code != 0:
                    self.errors.append(f"router on {node} stopped with {code}")
        if self.bed is not None:
            progress("removing the testbed")
            self.bed.down()
        shutil.rmtree(self.workdir, ignore_errors=True)


def progress(text: str) -> None:
    print(f"[soak] {text}", file=sys.stderr, flush=True)


def summary(soak: Soak, interrupted: bool) -> dict[str, Any]:
    last = soak.samples[-1] if soak.samples else {}
    first = soak.samples[0] if soak.samples else {}
    out: dict[str, Any] = {
        "seconds": round(time.monotonic() - soak.started),
        "interrupted": interrupted,
        "cycles": dict(soak.cycles),
        "swaps": sum(last.get(f"{n}_swaps", 0) for n in ("node1", "node2")),
        "server_side_swaps": sum(last.get(f"{n}_server_swaps", 0) for n in ("node1", "node2")),
        # counted at the client side (node2) only: each connection has a row on both daemons
        "left_on_overlay": last.get("node2_overlay", 0),
        "pending_at_end": {n: last.get(f"{n}_pending", 0) for n in ("node1", "node2")},
        "errors": soak.errors,
        "processes_left_stopped": len(soak.stopped_seen),
        "samples": soak.samples,
    }
    for node in ("node1", "node2"):
        rss = [s[f"{node}_rss_kib"] for s in soak.samples if s.get(f"{node}_rss_kib")]
        if rss:
            out[f"{node}_rss_kib"] = {"first": first.get(f"{node}_rss_kib"), "max": max(rss),
                                      "last": rss[-1]}
    return out


def print_table(result: dict[str, Any]) -> None:
    cols = ["t", "node1_rss_kib", "node2_rss_kib", "node1_fds", "node2_fds", "node2_swaps",
            "node1_server_swaps", "node2_overlay", "node1_pending", "node2_pending",
            "redis_cycles", "iperf3_cycles", "errors"]
    print(f"\nsoak: {result['seconds']} s{' (interrupted)' if result['interrupted'] else ''}")
    print("  ".join(f"{c:>13}" for c in cols))
    for row in result["samples"]:
        print("  ".join(f"{row.get(c, '-'):>13}" for c in cols))
    print(f"\ncycles: redis-benchmark {result['cycles']['redis']}, "
          f"iperf3 {result['cycles']['iperf3']}")
    print(f"swaps done (client side, once per connection): {result['swaps']}; "
          f"server side: {result['server_side_swaps']}; left on overlay: "
          f"{result['left_on_overlay']}")
    for node in ("node1", "node2"):
        rss = result.get(f"{node}_rss_kib")
        if rss:
            print(f"{node} daemon RSS: {rss['first']} KiB at first sample, max {rss['max']}, "
                  f"last {rss['last']}")
    print(f"connections still pending at the end: {result['pending_at_end']}")
    print(f"processes left stopped: {result['processes_left_stopped']}")
    print(f"errors: {len(result['errors'])}")
    for err in result["errors"][:20]:
        print(f"  {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--iperf-seconds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root", file=sys.stderr)
        return 2
    if absent := tools.missing(("redis-server", "redis-benchmark", "iperf3")):
        print(f"soak: missing {tools.describe_missing(absent)}", file=sys.stderr)
        return 2
    with interrupt_on(signal.SIGTERM, signal.SIGINT):  # SIGINT: background jobs ignore it
        soak = Soak(args.iperf_seconds)
        interrupted = False
        try:
            soak.up()
            soak.sample()
            soak.run(args.minutes * 60)
        except KeyboardInterrupt:
            interrupted = True
            progress("interrupted: cleaning up")
        except Exception as exc:  # noqa: BLE001 - reported, then cleaned up
            soak.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                soak.close()
    result = summary(soak, interrupted)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    if interrupted:
        return 130
    return 0 if not result["errors"] and not result["processes_left_stopped"] else 1


if __name__ == "__main__":
    sys.exit(main())
