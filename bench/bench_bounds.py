"""Daemon resources over many short connections: RSS, fds and tables of each router.

Builds a 2-node testbed (one pod per node), starts one `ebpf-router run` per node, opens a few
long connections from n2p0 to n1p0 that the routers swap (each a checked echo: 8 numbered
bytes every 0.1 s, each echo compared), waits until they are bypassed, then floods with
short connections (`ebpfrouter.bench.connrate`: connect, 1-byte request, 1-byte reply,
close; `--clients` client processes in n2p0, one server in n1p0) until `--connections` are
done. About every 10% of the way, halfway through a round of clients (so while they run),
it samples each router process: VmRSS and threads (`/proc/PID/status`), open fds
(`/proc/PID/fd`) and its status (engine connections, young, waiting for a listener, waiting
for a bind, daemon socket copies, traced sockets not yet copied, tracer drops,
seen/short/short_in_kernel/bypassed/failed/pending). After the flood it waits until the
tables are back to what the long connections hold (an accept waits up to `bind_wait`, 10 s,
for its bind), samples again 11 s after the flood (every accept's timer has fired), closes
the long connections and waits until every table is empty.

It prints the samples, the RSS and fd growth from the first sample after `--warmup`
connections to the end of the flood, and whether the tables emptied; `--out FILE` writes
everything as JSON. Exit status 0 when there was no client error, the long connections were
bypassed and intact, and every table emptied. Everything is removed in every case
(Ctrl-C/SIGTERM included). Run as root, about a minute for the default:

    python3 bench/bench_bounds.py [--connections 100000] [--clients 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpfrouter.bench.process import interrupt_on, usage  # noqa: E402
from ebpfrouter.demo import PACKAGE_ROOT, Routers, child_env, wait_line, wait_port  # noqa: E402
from ebpfrouter.testbed import Testbed  # noqa: E402

CONNRATE_PORT, ECHO_PORT = 7210, 7211
NODES = ("node1", "node2")
TABLES = ("connections", "young", "waiting_listener", "waiting_bind", "daemon_socks",
          "traced_uncopied")
def progress(text: str) -> None:
    print(f"[bounds] {text}", file=sys.stderr, flush=True)


# -- the long connections (run inside the pods) --------------------------------------------------


def echo_serve(port: int) -> None:
    """Echo every connection back, one thread each, until killed."""

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("0.0.0.0", port))
        lsock.listen(16)
        print("listening", flush=True)
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


def echo_send(host: str, port: int, count: int, stop_file: str) -> dict[str, Any]:
    """`count` connections; every 0.1 s each sends its next 8-byte number and checks the echo,
    until `stop_file` exists. Prints how many round trips, mismatches and errors."""
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(count)]
    rounds, bad, errors, first_error = 0, 0, 0, ""
    while not os.path.exists(stop_file):
        for sock in socks:
            want = rounds.to_bytes(8, "little")
            try:
                sock.sendall(want)
                got = b""
                while len(got) < 8:
                    data = sock.recv(8 - len(got))
                    if not data:
                        raise OSError("EOF")
                    got += data
                bad += got != want
            except OSError as exc:
                errors += 1
                first_error = first_error or str(exc)
        rounds += 1
        time.sleep(0.1)
    for sock in socks:
        sock.close()
    return {"connections": count, "rounds": rounds, "mismatches": bad, "errors": errors,
            "first_error": first_error}


# -- the measurement ------------------------------------------------------------------------------


class Bounds:
    """The testbed, routers and helpers of one run; `close()` removes them."""

    def __init__(self, clients: int, long_conns: int) -> None:
        self.clients = clients
        self.long_conns = long_conns
        self.workdir = Path(tempfile.mkdtemp(prefix="bounds-"))
        self.stop_file = self.workdir / "stop-echo"
        self.bed: Testbed | None = None
        self.routers: Routers | None = None
        self.helpers: list[subprocess.Popen[Any]] = []
        self.echo: subprocess.Popen[str] | None = None
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.done = 0
        self.flood_seconds = 0.0
        self.long_result: dict[str, Any] | None = None

    def _py(self, *args: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), *args]

    def up(self) -> None:
        progress("building the testbed and starting the routers")
        self.bed = Testbed.up(2, 1)
        self.routers = Routers(self.bed, self.workdir, loglevel="WARNING")
        self.routers.start()
        bed, server = self.bed, self.bed.pod("n1p0")
        for argv in (self._py("echo-serve", str(ECHO_PORT)),
                     [sys.executable, "-m", "ebpfrouter.bench.connrate", "serve",
                      str(CONNRATE_PORT)]):
            proc = bed.popen(server.name, argv, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=child_env(),
                             cwd=str(PACKAGE_ROOT))
            self.helpers.append(proc)
            wait_line(proc, f"{argv[-2]} in {server.name}")
        wait_port(bed, server.name, server.ip, CONNRATE_PORT)

    def start_long(self) -> None:
        """The long connections; wait until the client side has bypassed them all."""
        assert self.bed is not None and self.routers is not None
        routers = self.routers
        deadline = time.monotonic() + 10
        while not any(lst["overlay"].endswith(f":{ECHO_PORT}") and not lst["host"].endswith(":0")
                      for lst in routers.status("node1")["listeners"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no host listener announced for port {ECHO_PORT}")
            time.sleep(0.1)
        before = routers.status("node2")["counters"]["bypassed_client"]
        self.echo = self.bed.popen("n2p0", self._py(
            "echo-send", self.bed.pod("n1p0").ip, str(ECHO_PORT), str(self.long_conns),
            str(self.stop_file)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=child_env(), cwd=str(PACKAGE_ROOT))
        deadline = time.monotonic() + 20
        while routers.status("node2")["counters"]["bypassed_client"] - before < self.long_conns:
            if self.echo.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.long_conns} long connections were not bypassed "
                                   f"within 20 s: {routers.status('node2')['counters']}")
            time.sleep(0.1)
        progress(f"{self.long_conns} long connections bypassed")

    def stop_long(self) -> None:
        if self.echo is None:
            return
        self.stop_file.touch()
        out, err = self.echo.communicate(timeout=30)
        try:
            self.long_result = json.loads(out)
        except ValueError:
            self.long_result = {"error": (err or out).strip()[-300:]}
        res = self.long_result
        if self.echo.returncode != 0 or res.get("errors") or res.get("mismatches") \
                or "error" in res:
            self.errors.append(f"long connections: rc {self.echo.returncode}: {res}")
        self.echo = None

    def sample(self, phase: str, done: int | None = None) -> dict[str, Any]:
        assert self.routers is not None
        row: dict[str, Any] = {"phase": phase, "done": self.done if done is None else done,
                               "t": round(self.flood_seconds, 1)}
        for node, proc in self.routers.procs.items():
            fig = usage(proc.pid) if proc.poll() is None else {}
            try:
                st = self.routers.status(node)
            except Exception as exc:  # noqa: BLE001 - recorded: the row shows the node is gone
                self.errors.append(f"{node}: status: {exc}")
                st = {}
            eng, cnt = st.get("engine", {}), st.get("counters", {})
            row[node] = {
                **fig,
                **{k: eng.get(k) for k in ("connections", "young", "waiting_listener",
                                           "waiting_bind")},
                "daemon_socks": st.get("daemon_socks"),
                "traced_uncopied": st.get("traced_uncopied"),
                "tracer_lost": st.get("tracer_lost"),
                **{k: cnt.get(k) for k in ("seen", "short", "short_in_kernel", "bypassed",
                                           "failed", "pending")},
            }
        self.samples.append(row)
        return row

    def traced(self) -> int:
        """Connections node2's router traced so far: reported, or forgotten in the kernel
        because they closed young (the kernel filter)."""
        assert self.routers is not None
        cnt = self.routers.status("node2")["counters"]
        return int(cnt["seen"]) + int(cnt.get("short_in_kernel", 0))

    def flood(self, total: int, every: int) -> None:
        """Short connections in rounds of at most 2 s until `total` are done. Each time
        another `every` are about to be done, a sample halfway through the round, while the
        clients run (`done` then counts the connections node2's router traced so far)."""
        assert self.bed is not None and self.routers is not None
        host = self.bed.pod("n1p0").ip
        next_mark, rate = every, 0.0
        while self.done < total:
            left = total - self.done
            seconds = 2.0 if rate == 0 else max(0.3, min(2.0, left / rate))
            sample = rate == 0 or self.done + rate * seconds >= min(next_mark, total)
            seen0 = self.traced() if sample else 0
            procs = [self.bed.popen("n2p0", [sys.executable, "-m", "ebpfrouter.bench.connrate",
                                             "client", host, str(CONNRATE_PORT), f"{seconds:.2f}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=child_env(), cwd=str(PACKAGE_ROOT))
                     for _ in range(self.clients)]
            if sample:
                time.sleep(seconds / 2)
                row = self.sample("flood", self.done + self.traced() - seen0)
                progress(f"{row['done']} connections; " + "; ".join(
                    f"{n} rss {row[n]['rss_kib'] / 1024:.1f} MiB fds {row[n]['fds']} "
                    f"young {row[n]['young']} waiting_bind {row[n]['waiting_bind']}"
                    for n in NODES))
            made = 0
            for proc in procs:
                out, err = proc.communicate(timeout=seconds + 30)
                try:
                    res = json.loads(out)
                except ValueError:
                    self.errors.append(f"connrate client: rc {proc.returncode}: {err[-300:]}")
                    continue
                made += res["connections"]
                self.flood_seconds += res["seconds"] / self.clients
                if res["errors"]:
                    self.errors.append(f"connrate client: {res['errors']} errors, first: "
                                       f"{res['first_error']}")
            if made == 0:
                raise RuntimeError(f"no connection made in a {seconds:.1f} s round")
            self.done += made
            rate = self.done / self.flood_seconds
            while next_mark <= self.done:
                next_mark += every

    def wait_tables(self, connections: int, timeout: float) -> tuple[bool, float]:
        """Wait until each node's tables hold only `connections` (swapped, long) connections
        and their sockets; (reached, seconds waited)."""
        assert self.routers is not None
        t0 = time.monotonic()
        while True:
            ok = True
            for node in NODES:
                st = self.routers.status(node)
                eng = st["engine"]
                ok &= (eng["connections"] == connections and eng["young"] == 0
                       and eng["waiting_listener"] == 0 and eng["waiting_bind"] == 0
                       and st["traced_uncopied"] == 0 and st["counters"]["pending"] == 0)
            if ok or time.monotonic() - t0 > timeout:
                return ok, time.monotonic() - t0
            time.sleep(0.5)

    def close(self) -> None:
        if self.echo is not None:
            self.stop_file.touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.echo.wait(5)
            self.helpers.append(self.echo)
        for proc in self.helpers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if self.routers is not None:
            for node, code in self.routers.stop().items():
                if code != 0:
                    self.errors.append(f"router on {node} stopped with {code}")
        if self.bed is not None:
            progress("removing the testbed")
            self.bed.down()
        shutil.rmtree(self.workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    """The whole measurement; (result, interrupted)."""
    bounds = Bounds(args.clients, args.long)
    result: dict[str, Any] = {"connections_wanted": args.connections, "clients": args.clients,
                              "long_connections": args.long, "warmup": args.warmup}
    interrupted = False
    try:
        bounds.up()
        bounds.start_long()
        bounds.sample("start")
        progress(f"flooding: {args.connections} short connections, {args.clients} clients")
        bounds.flood(args.connections, max(1, args.connections // 10))
        progress("flood over; waiting for the tables to drain (bind_wait is 10 s)")
        # each long connection: a client row on node2, a server row on node1
        drained, waited = bounds.wait_tables(args.long, 20)
        bounds.sample("after flood")
        result["drained_with_long_open"] = drained
        result["drain_seconds"] = round(waited, 1)
        time.sleep(max(0.0, 11 - waited))  # every accept's bind_wait timer has fired
        bounds.sample("+11 s")
        bounds.stop_long()
        empty, waited = bounds.wait_tables(0, 15)
        bounds.sample("all closed")
        result["empty_after_close"] = empty
        result["empty_seconds"] = round(waited, 1)
        result["long"] = bounds.long_result
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: cleaning up")
    except Exception as exc:  # noqa: BLE001 - reported, then cleaned up
        bounds.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            bounds.close()
    result["connections_done"] = bounds.done
    result["flood_seconds"] = round(bounds.flood_seconds, 1)
    result["per_second"] = round(bounds.done / bounds.flood_seconds) if bounds.flood_seconds else 0
    result["samples"] = bounds.samples
    result["errors"] = bounds.errors
    result["growth"] = growth(bounds.samples, args.warmup)
    return result, interrupted


def growth(samples: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """RSS (KiB) and fd change per node from the first flood sample at or after `warmup`
    connections to the sample taken once the flood was over (every connection done)."""
    base = next((s for s in samples if s["phase"] == "flood" and s["done"] >= warmup), None)
    end = next((s for s in samples if s["phase"] == "after flood"), None)
    if base is None or end is None:
        return {}
    during = [s for s in samples if s["phase"] in ("flood", "after flood")]
    return {"from_done": base["done"], "to_done": end["done"],
            **{node: {"rss_kib": [base[node]["rss_kib"], end[node]["rss_kib"]],
                      "fds": [base[node]["fds"], end[node]["fds"]],
                      "rss_max_kib": max(s[node]["rss_kib"] for s in during),
                      "fds_max": max(s[node]["fds"] for s in during)}
               for node in NODES}}


COLUMNS = (("rss_kib", "RSS MiB"), ("fds", "fds"), ("threads", "thr"), ("connections", "conns"),
           ("young", "young"), ("waiting_listener", "w_lst"), ("waiting_bind", "w_bind"),
           ("daemon_socks", "socks"), ("traced_uncopied", "uncop"), ("tracer_lost", "lost"),
           ("seen", "seen"), ("short", "short"), ("short_in_kernel", "k_short"),
           ("bypassed", "byp"), ("failed", "fail"),
           ("pending", "pend"))


def print_table(result: dict[str, Any], interrupted: bool) -> None:
    print(f"\nbench_bounds: {result['connections_done']} short connections in "
          f"{result['flood_seconds']} s ({result['per_second']}/s), {result['clients']} clients, "
          f"{result['long_connections']} long connections swapped meanwhile"
          f"{' (interrupted)' if interrupted else ''}")
    head = ["phase", "done", "node"] + [title for _, title in COLUMNS]
    print("  ".join(f"{h:>11}" for h in head))
    for row in result["samples"]:
        for node in NODES:
            fig = row.get(node, {})
            cells = [row["phase"], row["done"], node]
            for key, _ in COLUMNS:
                value = fig.get(key)
                cells.append(f"{value / 1024:.1f}" if key == "rss_kib" and value else value)
            print("  ".join(f"{'-' if c is None else c!s:>11}" for c in cells))
    g = result["growth"]
    if g:
        print(f"\ngrowth from {g['from_done']} to {g['to_done']} connections:")
        for node in NODES:
            (r0, r1), (f0, f1) = g[node]["rss_kib"], g[node]["fds"]
            print(f"  {node}: RSS {r0 / 1024:.1f} -> {r1 / 1024:.1f} MiB ({(r1 - r0) / 1024:+.1f}; "
                  f"max {g[node]['rss_max_kib'] / 1024:.1f}), fds {f0} -> {f1} ({f1 - f0:+d}; "
                  f"max {g[node]['fds_max']})")
    if "drained_with_long_open" in result:
        print(f"tables back to the long connections only after the flood: "
              f"{'yes' if result['drained_with_long_open'] else 'NO'} "
              f"(in {result['drain_seconds']} s)")
    if "empty_after_close" in result:
        print(f"every table empty once the long connections closed: "
              f"{'yes' if result['empty_after_close'] else 'NO'} (in {result['empty_seconds']} s)")
    if result.get("long"):
        print(f"long connections: {result['long']}")
    print(f"errors: {len(result['errors'])}")
    for err in result["errors"][:20]:
        print(f"  {err}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["echo-serve"]:  # helpers run inside the pods
        echo_serve(int(argv[1]))
        return 0
    if argv[:1] == ["echo-send"]:
        res = echo_send(argv[1], int(argv[2]), int(argv[3]), argv[4])
        print(json.dumps(res), flush=True)
        return 0 if not res["errors"] and not res["mismatches"] else 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=2, help="connrate client processes")
    parser.add_argument("--long", type=int, default=4, help="long connections swapped meanwhile")
    parser.add_argument("--warmup", type=int, default=10_000,
                        help="growth is measured from the first sample after this many")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_bounds: needs root", file=sys.stderr)
        return 2
    with interrupt_on(signal.SIGTERM, signal.SIGINT):
        result, interrupted = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result, interrupted)
    if interrupted:
        return 130
    ok = (not result["errors"] and result.get("empty_after_close")
          and result.get("drained_with_long_open"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
