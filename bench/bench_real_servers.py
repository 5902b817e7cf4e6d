"""Real servers run as non-root users: overlay vs bypass vs host, on one fresh testbed.

Builds a 2-node testbed (one pod per node) and, for each of `--rounds` rounds, runs every
workload in each mode in turn (so the modes alternate and drift hits all three alike):

| mode | where |
|---|---|
| `overlay` | server in n1p0, client in n2p0, over the VXLAN overlay, no router |
| `bypass` | the same pods, one `ebpf-router run` per node, default privileges (per mode) |
| `host` | server on node1's underlay address in node1's netns, client in node2's netns, no router |

Workloads (servers from `tests/ebpfrouter/realservers.py`, each started fresh for each run
of a mode and removed after):

- `nginx`: master as root, 2 workers as nobody, sendfile, keep-alive; `wrk -t2 -c16 -dSECONDS`
  on a 1 MiB file (Gbit/s) and on a small file (kreq/s); errors: wrk's non-2xx/3xx responses
  and socket errors;
- `pgbench`: PostgreSQL as the `postgres` user (fsync off), `pgbench -i -s 4`, then select-only
  (`-S`) and TPC-B, each `-c 4 -j 2 -T SECONDS` (tps); errors: failed transactions, TPC-B's
  invariants (sum of account, teller, branch balances and history deltas agree; one history
  row per transaction);
- `stream`: a threaded Python stream server as uid 65534, one client sending as fast as it can
  for SECONDS (Gbit/s); errors: a SHA-256 mismatch over the bytes.

Each bypass run reads both routers' status before and after: connections bypassed at the
client side (node2) and at the server side (node1), against the connections the client held.
`--router-arg ARG` (repeatable) adds arguments to bypass mode's routers, e.g.
`--router-arg=--keep-privileges` for a comparison.
The table shows the median of the rounds per mode, bypass/host, and bypassed/expected over all
bypass runs; a metric with nothing bypassed gets no ratio. `--json` prints one object instead.
Exit status 0 when every run produced numbers without error, 1 otherwise, 2 for a missing tool
or no root, 130 on Ctrl-C/SIGTERM. The testbed, routers, servers and temporary directories are
removed in every case. As root, about 7 minutes with the defaults:

    python3 bench/bench_real_servers.py [--rounds 3] [--seconds 6] [--json] [--out FILE]
                                        [--workloads nginx,pgbench,stream] [--router-arg ARG]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "ebpfrouter"))

import realservers as rs  # noqa: E402

from ebpfrouter import tools  # noqa: E402
from ebpfrouter.bench.process import interrupt_on  # noqa: E402
from ebpfrouter.demo import Routers  # noqa: E402
from ebpfrouter.testbed import Testbed  # noqa: E402

MODES = ("overlay", "bypass", "host")
WORKLOADS = ("nginx", "pgbench", "stream")
# key -> (workload, label); all are "higher is better"
METRICS = {
    "nginx_big_gbps": ("nginx", "nginx 1 MiB file, wrk -c16 (Gbit/s)"),
    "nginx_small_kreqs": ("nginx", "nginx small file, wrk -c16 (kreq/s)"),
    "pg_select_tps": ("pgbench", "pgbench -S, 4 clients (tps)"),
    "pg_tpcb_tps": ("pgbench", "pgbench TPC-B, 4 clients (tps)"),
    "stream_gbps": ("stream", "python as nobody, 1 stream (Gbit/s)"),
}
BASE_PORT = 7700


def progress(text: str) -> None:
    print(f"[real-servers] {text}", file=sys.stderr, flush=True)


def missing_tools() -> list[str]:
    """Tools this benchmark runs that are not installed."""
    missing = tools.missing(("wrk", "nginx", "setpriv"))
    for tool in ("postgres", "initdb", "pgbench", "psql"):
        try:
            rs.pg_bin(tool)
        except rs.RealServerError:
            missing.append(tool)
    return missing


class Counts:
    """Bypass counters of both routers from now on (None when no router runs)."""

    def __init__(self, routers: Routers | None) -> None:
        self.routers = routers
        self.before = self._now()

    def _now(self) -> tuple[int, int]:
        if self.routers is None:
            return 0, 0
        return (int(self.routers.status("node2")["counters"]["bypassed_client"]),
                int(self.routers.status("node1")["counters"]["bypassed_server"]))

    def grown(self) -> dict[str, int] | None:
        """Connections bypassed since creation at the client side and at the server side."""
        if self.routers is None:
            return None
        now = self._now()
        return {"client": now[0] - self.before[0], "server": now[1] - self.before[1]}


class Bench:
    """One testbed and everything measured on it; `close()` removes it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-real-servers-"))
        self.bed: Testbed | None = None
        self.routers: Routers | None = None
        self.runs: list[dict[str, Any]] = []
        self.errors: list[str] = []

    # -- one run of a metric ----------------------------------------------------------------

    def record(self, metric: str, mode: str, rnd: int, value: float | None, counts: Counts,
               expected: int, errors: list[str], extra: dict[str, Any] | None = None) -> None:
        grown = counts.grown()
        row = {"metric": metric, "mode": mode, "round": rnd, "value": value,
               "expected_connections": expected, "bypassed": grown, "errors": errors,
               **(extra or {})}
        self.runs.append(row)
        self.errors += [f"{metric} {mode} round {rnd}: {e}" for e in errors]
        shown = "-" if value is None else f"{value:.2f}"
        bypassed = "" if grown is None else (f", bypassed {grown['client']}/{expected} (client), "
                                             f"{grown['server']}/{expected} (server)")
        progress(f"round {rnd} {mode:7} {metric}: {shown}{bypassed}"
                 f"{'; ERRORS ' + '; '.join(errors) if errors else ''}")

    def _wait_announced(self, port: int) -> None:
        """In bypass mode, give node1's router up to 10 s to announce its host listener (a
        router that cannot do it is measured all the same: the counts will show it)."""
        if self.routers is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(lst["overlay"].endswith(f":{port}") and not lst["host"].endswith(":0")
                   for lst in self.routers.status("node1")["listeners"]):
                return
            time.sleep(0.1)
        progress(f"node1's router announced no host listener for port {port} within 10 s")

    def nginx(self, mode: str, rnd: int, srv: str, cli: str, bind: str | None,
              port: int) -> None:
        assert self.bed is not None
        seconds = self.args.seconds
        with rs.nginx_server(self.bed, srv, port, bind=bind, access_log=False) as ng:
            self._wait_announced(port)
            for path, metric in ((ng.big_path, "nginx_big_gbps"),
                                 (ng.small_path, "nginx_small_kreqs")):
                counts = Counts(self.routers)
                res = self.bed.run(cli, rs.wrk_argv(ng.url(path), seconds, 16, 2),
                                   timeout=seconds + 60)
                wrk = rs.parse_wrk(res.stdout)
                errors = []
                if res.returncode != 0 or not wrk["parsed"] or not wrk["requests"]:
                    errors.append(f"wrk rc {res.returncode}: {(res.stdout + res.stderr)[-300:]}")
                if wrk["non_2xx_3xx"]:
                    errors.append(f"{wrk['non_2xx_3xx']} non-2xx/3xx responses")
                if wrk["socket_errors"]:
                    errors.append(f"socket errors {wrk['socket_errors']}")
                value = None
                if wrk["parsed"] and wrk["seconds"] > 0:
                    value = (wrk["requests"] * ng.files[path][0] * 8 / wrk["seconds"] / 1e9
                             if path == ng.big_path else wrk["rps"] / 1e3)
                self.record(metric, mode, rnd, value, counts, 16, errors,
                            {"requests": wrk["requests"]})

    def pgbench(self, mode: str, rnd: int, srv: str, cli: str, bind: str | None,
                port: int) -> None:
        assert self.bed is not None
        seconds = str(max(1, round(self.args.seconds)))
        with rs.postgres_server(self.bed, srv, port, bind=bind, scale=4, init_from=cli) as pg:
            self._wait_announced(port)
            for metric, extra in (("pg_select_tps", ["-S"]), ("pg_tpcb_tps", [])):
                before = rs.pgbench_invariants(self.bed, cli, pg)["history_rows"]
                counts = Counts(self.routers)
                res = self.bed.run(cli, pg.pgbench_argv("-n", *extra, "-c", "4", "-j", "2",
                                                        "-T", seconds),
                                   timeout=float(seconds) + 120)
                out = rs.parse_pgbench(res.stdout)
                errors = []
                if res.returncode != 0 or not out["parsed"] or not out["processed"]:
                    errors.append(f"pgbench rc {res.returncode}: {res.stderr[-300:]}")
                if out["failed"]:
                    errors.append(f"{out['failed']} failed transactions")
                if metric == "pg_tpcb_tps":
                    sums = rs.pgbench_invariants(self.bed, cli, pg)
                    if not sums["ok"]:
                        errors.append(f"TPC-B invariants broken: {sums}")
                    if sums["history_rows"] - before != out["processed"]:
                        errors.append(f"{sums['history_rows'] - before} history rows for "
                                      f"{out['processed']} transactions")
                self.record(metric, mode, rnd, out["tps"] if out["parsed"] else None, counts, 4,
                            errors, {"transactions": out["processed"]})

    def stream(self, mode: str, rnd: int, srv: str, cli: str, bind: str | None,
               port: int) -> None:
        assert self.bed is not None
        with rs.python_server_as(self.bed, srv, port, uid=rs.NOBODY, bind=bind) as server:
            self._wait_announced(port)
            counts = Counts(self.routers)
            with rs.StreamClient(self.bed, cli, server.host, port,
                                 seconds=self.args.seconds + 60) as client:
                time.sleep(self.args.seconds)
                res = client.result()
        errors = [] if res.get("ok") and res.get("rc") == 0 else [f"stream: {res}"]
        self.record("stream_gbps", mode, rnd, res["bps"] / 1e9 if "bps" in res else None, counts,
                    1, errors, {"bytes": res.get("sent_bytes")})

    # -- the whole run ----------------------------------------------------------------------

    def run(self) -> None:
        progress("building a 2-node testbed")
        self.bed = Testbed.up(2, 1)
        bed = self.bed
        for rnd in range(1, self.args.rounds + 1):
            for m, mode in enumerate(MODES):
                if mode == "host":
                    srv, cli, bind = "node1", "node2", bed.node("node1").underlay_ip
                else:
                    srv, cli, bind = "n1p0", "n2p0", None
                if mode == "bypass":
                    extra = self.args.router_arg
                    progress(f"round {rnd}: starting the routers "
                             f"({' '.join(extra) if extra else 'default privileges'})")
                    self.routers = Routers(bed, self.workdir / f"routers-{rnd}",
                                           loglevel="WARNING")
                    self.routers.workdir.mkdir()
                    self.routers.start(extra_args={n.name: list(extra) for n in bed.nodes})
                try:
                    for w, workload in enumerate(self.args.workloads):
                        port = BASE_PORT + 100 * (rnd - 1) + 10 * m + w
                        getattr(self, workload)(mode, rnd, srv, cli, bind, port)
                finally:
                    if self.routers is not None:
                        for node, code in self.routers.stop().items():
                            if code != 0:
                                self.errors.append(f"router on {node} stopped with {code}")
                        self.routers = None

    def close(self) -> None:
        if self.routers is not None:
            self.routers.stop()
            self.routers = None
        if self.bed is not None:
            progress("removing the testbed")
            self.bed.down()
            self.bed = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: the median of each mode, bypass/host, and bypassed/expected connections."""
    out: dict[str, Any] = {}
    for metric, (_workload, label) in METRICS.items():
        rows = [r for r in runs if r["metric"] == metric]
        if not rows:
            continue
        entry: dict[str, Any] = {"label": label}
        for mode in MODES:
            values = [r["value"] for r in rows if r["mode"] == mode and r["value"] is not None]
            entry[mode] = statistics.median(values) if values else None
            entry[f"{mode}_runs"] = values
        bypass_rows = [r for r in rows if r["mode"] == "bypass"]
        entry["expected"] = sum(r["expected_connections"] for r in bypass_rows)
        entry["bypassed_client"] = sum((r["bypassed"] or {}).get("client", 0)
                                       for r in bypass_rows)
        entry["bypassed_server"] = sum((r["bypassed"] or {}).get("server", 0)
                                       for r in bypass_rows)
        entry["bypass_host_ratio"] = (entry["bypass"] / entry["host"]
                                      if entry["bypassed_client"] and entry["bypass"]
                                      and entry["host"] else None)
        out[metric] = entry
    return out


def print_table(result: dict[str, Any], interrupted: bool) -> None:
    print(f"\nbench_real_servers: {result['rounds']} rounds, {result['seconds']:g} s per run, "
          f"median per mode (overlay, bypass, host alternate each round)"
          f"{' (interrupted)' if interrupted else ''}")
    if result["router_args"]:
        print(f"  bypass mode's routers ran with: {' '.join(result['router_args'])}")
    print(f"  {'workload':<38} {'overlay':>9} {'bypass':>9} {'host':>9} {'bypass/host':>11} "
          f"{'bypassed':>9}")

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"

    for entry in result["summary"].values():
        ratio = entry["bypass_host_ratio"]
        if not entry["bypassed_client"]:
            ratio_text = "not byp."
        elif ratio is None:
            ratio_text = "-"
        else:
            partly = entry["bypassed_client"] < entry["expected"]
            ratio_text = f"{ratio:.2f}{'*' if partly else ''}"
        print(f"  {entry['label']:<38} {cell(entry['overlay']):>9} {cell(entry['bypass']):>9} "
              f"{cell(entry['host']):>9} {ratio_text:>11} "
              f"{entry['bypassed_client']:>4}/{entry['expected']:<4}")
    print("  bypassed: connections bypassed at the client side over all bypass runs / held by "
          "the clients; * partly bypassed")
    print(f"errors: {len(result['errors'])}")
    for err in result["errors"][:20]:
        print(f"  {err}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode (median)")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each run")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra `ebpf-router run` argument for bypass mode (repeatable, "
                             "e.g. --router-arg=--keep-privileges); default: none")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the result as JSON to this file")
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if bad := [w for w in args.workloads if w not in WORKLOADS]:
        parser.error(f"unknown workload(s): {', '.join(bad)}")
    if os.geteuid() != 0:
        print("bench_real_servers: needs root", file=sys.stderr)
        return 2
    if missing := missing_tools():
        print(f"bench_real_servers: missing {tools.describe_missing(missing)}", file=sys.stderr)
        return 2
    bench = Bench(args)
    interrupted = False
    started = time.monotonic()
    with interrupt_on(signal.SIGTERM, signal.SIGINT):
        try:
            bench.run()
        except KeyboardInterrupt:
            interrupted = True
            progress("interrupted: cleaning up")
        except Exception as exc:  # noqa: BLE001 - reported, then cleaned up
            bench.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                bench.close()
    result = {"rounds": args.rounds, "seconds": args.seconds, "workloads": args.workloads,
              "router_args": args.router_arg,
              "elapsed_s": round(time.monotonic() - started, 1),
              "summary": summarize(bench.runs), "runs": bench.runs, "errors": bench.errors}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, interrupted)
    if interrupted:
        return 130
    return 0 if not bench.errors and bench.runs else 1


if __name__ == "__main__":
    sys.exit(main())
