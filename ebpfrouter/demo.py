"""`ebpf-router demo`: the whole story on a local two-node VXLAN testbed, in one command.

1. build a testbed (2 nodes, one pod each);
2. pod-to-pod throughput over the overlay (iperf3 if installed, else a built-in stream);
3. start a router in each node's network namespace (`ebpf-router run`, shared generated key);
4. pod-to-pod throughput again, with the routers bypassing the overlay, alternating with
5. node-to-node throughput on the underlay (the limit), `rounds` times each (medians);
6. a checksummed stream through a bypassed connection: every byte must arrive unchanged;
7. a table (or one JSON object), then everything is removed, also on Ctrl-C or error.

Bypass counts come from each router's `status`; a run where nothing was bypassed says so and
reports no speed-up.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .testbed import Testbed

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CHUNK = 64 * 1024
STREAM_PORT = 7000
IPERF_PORT = 5201


class DemoError(RuntimeError):
    """A demo step failed; the message names the step."""


# -- the built-in checksummed stream --------------------------------------------------------


def _block() -> bytes:
    """A fixed pseudo-random block (same on both ends, no shared state needed)."""
    out = bytearray()
    seed = b"ebpf-router demo stream"
    while len(out) < CHUNK - 8:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[: CHUNK - 8])


def stream_serve(port: int, bind: str = "0.0.0.0", clients: int = 1) -> None:
    """Serve `clients` connections at once: hash everything each one sends, then send back
    `bytes digest\n` on it."""

    def handle(conn: socket.socket) -> None:
        with conn:
            digest, total = hashlib.sha256(), 0
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                total += len(data)
            conn.sendall(f"{total} {digest.hexdigest()}\n".encode())

    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((bind, port))
        lsock.listen(max(4, clients))
        print("listening", flush=True)
        threads = []
        for _ in range(clients):
            conn, _ = lsock.accept()
            thread = threading.Thread(target=handle, args=(conn,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()


def stream_send(host: str, port: int, seconds: float,
                stop_file: str | None = None) -> dict[str, Any]:
    """Send numbered chunks for `seconds` (or until `stop_file` exists), half-close, read the
    server's count and digest."""
    block = _block()
    digest, total, n = hashlib.sha256(), 0, 0
    with socket.create_connection((host, port), timeout=30) as sock:
        start = time.monotonic()
        deadline = start + seconds
        while time.monotonic() < deadline and not (stop_file and os.path.exists(stop_file)):
            for _ in range(16):
                chunk = n.to_bytes(8, "little") + block
                sock.sendall(chunk)
                digest.update(chunk)
                total += len(chunk)
                n += 1
        elapsed = time.monotonic() - start
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            data = sock.recv(256)
            if not data:
                break
            reply += data
    fields = reply.decode(errors="replace").split()
    got_bytes = int(fields[0]) if fields and fields[0].isdigit() else -1
    got_digest = fields[1] if len(fields) > 1 else ""
    return {"sent_bytes": total, "received_bytes": got_bytes, "sent_sha256": digest.hexdigest(),
            "received_sha256": got_digest, "seconds": elapsed,
            "bps": total * 8 / elapsed if elapsed > 0 else 0.0,
            "ok": got_bytes == total and got_digest == digest.hexdigest()}


# -- measurement helpers --------------------------------------------------------------------


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "ebpfrouter.demo", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    return env


def wait_line(proc: subprocess.Popen[str], what: str, timeout: float = 10.0) -> None:
    """Wait until a helper prints its first line (it is listening)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(TypeError):
            buf += proc.stdout.read() or ""
        if "\n" in buf:
            return
        time.sleep(0.02)
    raise DemoError(f"{what} did not start within {timeout}s")


@contextlib.contextmanager
def _process(bed: Testbed, target: str, argv: list[str], what: str,
             wait_ready: bool = False) -> Iterator[subprocess.Popen[str]]:
    proc = bed.popen(target, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                     env=child_env(), cwd=str(PACKAGE_ROOT))
    try:
        if wait_ready:
            wait_line(proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_port(bed: Testbed, target: str, host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until `host:port` is in LISTEN state inside `target` (no probe connection)."""
    deadline = time.monotonic() + timeout
    want = f":{port:04X}"
    while time.monotonic() < deadline:
        out = bed.run(target, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
        if any(want in line.split()[1] and line.split()[3] == "0A"
               for line in out.splitlines()[1:] if len(line.split()) > 3 and ":" in line):
            return
        time.sleep(0.05)
    raise DemoError(f"{target}: nothing listens on {host}:{port} after {timeout}s")


def measure_iperf3(bed: Testbed, server: str, client: str, host: str, seconds: float,
                   bind: str | None = None) -> float:
    """iperf3 throughput from `client` to `server` (received bits per second)."""
    srv_argv = ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)] + (["-B", bind] if bind else [])
    with _process(bed, server, srv_argv, f"iperf3 -s in {server}"):
        wait_port(bed, server, host, IPERF_PORT)
        res = bed.run(client, ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t",
                               str(max(1, round(seconds))), "-J"], timeout=seconds + 60)
    try:
        report = json.loads(res.stdout)
    except ValueError:
        raise DemoError(f"iperf3 from {client} to {host}: {res.stderr.strip()[:200]}") from None
    if "error" in report:
        raise DemoError(f"iperf3 from {client} to {host}: {report['error']}")
    return float(report["end"]["sum_received"]["bits_per_second"])


def measure_stream(bed: Testbed, server: str, client: str, host: str, seconds: float,
                   until: Callable[[], bool] | None = None,
                   until_timeout: float = 20.0) -> dict[str, Any]:
    """The built-in checksummed stream from `client` to `server`.

    With `until`, the stream keeps going until `until()` holds (e.g. its connection was
    bypassed) or `until_timeout` passes, then for `seconds` more: bytes cross before, during
    and after the swap however long the swap takes.
    """
    with _process(bed, server, _py("serve", str(STREAM_PORT)), f"stream server in {server}",
                  wait_ready=True), tempfile.TemporaryDirectory() as tmp:
        stop_file = os.path.join(tmp, "stop")
        argv = _py("send", host, str(STREAM_PORT), str(seconds + until_timeout + 60),
                   "--stop-file", stop_file)
        sender = bed.popen(client, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=child_env(), cwd=str(PACKAGE_ROOT))
        try:
            deadline = time.monotonic() + until_timeout
            while until is not None and not until() and time.monotonic() < deadline:
                if sender.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(seconds)
            Path(stop_file).touch()
            out, err = sender.communicate(timeout=60)
        finally:
            if sender.poll() is None:
                sender.kill()
                sender.wait()
    if sender.returncode != 0:
        raise DemoError(f"stream from {client} to {host}: {err.strip()[-300:]}")
    return json.loads(out)


# -- routers ------------------------------------------------------------------------------------


class Routers:
    """One `ebpf-router run` per node, each inside its node's network namespace."""

    def __init__(self, bed: Testbed, workdir: Path, loglevel: str = "INFO") -> None:
        self.bed = bed
        self.workdir = workdir
        self.loglevel = loglevel
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.key_file = workdir / "peer.key"

    def socket_of(self, node: str) -> str:
        """The control socket of `node`'s router."""
        return str(self.workdir / f"{node}.sock")

    def log_of(self, node: str) -> Path:
        """Where `node`'s router logs."""
        return self.workdir / f"{node}.log"

    def start(self, timeout: float = 20.0, extra_args: dict[str, list[str]] | None = None,
              pod_metadata: bool = True) -> None:
        """Start every router; wait until each answers status and sees its peers.

        Without `pod_metadata` the routers get no `--pod-metadata` file (labels come from
        elsewhere, e.g. a Kubernetes API given in `extra_args`).
        """
        self.key_file.write_text(os.urandom(24).hex())
        self.key_file.chmod(0o600)
        (self.workdir / "rules").mkdir(exist_ok=True)
        for node in self.bed.nodes:
            argv = [sys.executable, "-m", "ebpfrouter.cli", "run", "--overlay-if", "flannel.1",
                    "--host-if", "eth0", "--key-file", str(self.key_file),
                    "--control-socket", self.socket_of(node.name),
                    "--rules-dir", str(self.workdir / "rules"),
                    *(["--pod-metadata", str(self.bed.metadata_path)] if pod_metadata else []),
                    "--loglevel", self.loglevel, *(extra_args or {}).get(node.name, [])]
            with open(self.log_of(node.name), "wb") as log:
                self.procs[node.name] = self.bed.popen(node.name, argv, stdout=log,
                                                       stderr=subprocess.STDOUT, env=child_env(),
                                                       cwd=str(PACKAGE_ROOT))
        deadline = time.monotonic() + timeout
        for node in self.bed.nodes:
            while True:
                proc = self.procs[node.name]
                if proc.poll() is not None:
                    raise DemoError(f"router on {node.name} exited with {proc.returncode}: "
                                    f"{self.log_of(node.name).read_text()[-400:]}")
                with contextlib.suppress(Exception):
                    status = self.status(node.name)
                    if len(status.get("peers", [])) >= len(self.bed.nodes) - 1:
                        break
                if time.monotonic() > deadline:
                    raise DemoError(f"router on {node.name} not ready after {timeout}s")
                time.sleep(0.1)

    def status(self, node: str) -> dict[str, Any]:
        """`ebpf-router status --json` of `node`'s router."""
        from .control import query_status

        return query_status(self.socket_of(node), timeout=5)

    def bypassed(self) -> int:
        """Connections bypassed so far, counted once (at the client side's router)."""
        return sum(int(self.status(n.name)["counters"].get("bypassed_client", 0))
                   for n in self.bed.nodes)

    def stop(self) -> dict[str, int | None]:
        """SIGTERM every router, wait (kill after 10 s); exit codes by node."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes[name] = None
        self.procs.clear()
        return codes


# -- the demo -----------------------------------------------------------------------------------


def _fmt_bps(bps: float | None) -> str:
    return "-" if bps is None else f"{bps / 1e9:7.2f} Gbit/s"


def run_demo(seconds: float = 5.0, as_json: bool = False, builtin: bool = False,
             rounds: int = 3) -> int:
    """Run the demo; print a table (or JSON); 0 if bypass happened and integrity held."""
    use_iperf = shutil.which("iperf3") is not None and not builtin
    tool = "iperf3" if use_iperf else "built-in stream"

    def progress(text: str) -> None:
        print(f"[demo] {text}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"tool": tool, "seconds": seconds, "overlay_bps": None,
                              "bypass_bps": None, "host_bps": None, "bypassed_connections": 0,
                              "integrity_ok": False}
    if not use_iperf and not builtin:
        from .tools import describe_missing

        progress("iperf3 is not installed: measuring with the built-in stream instead (for "
                 f"iperf3 figures: {describe_missing(['iperf3'])})")
    workdir = Path(tempfile.mkdtemp(prefix="ebpf-router-demo-"))
    bed: Testbed | None = None
    routers: Routers | None = None
    interrupted = False
    try:
        progress("building a 2-node testbed (netns, veth underlay, VXLAN overlay)")
        bed = Testbed.up(2, 1)
        server, client = bed.pods[0], bed.pods[1]
        n1, n2 = bed.nodes[0], bed.nodes[1]
        result["testbed"] = bed.run_id

        def measure(label: str, srv: str, cli: str, host: str, bind: str | None = None) -> float:
            progress(f"{label}: {tool} {cli} -> {host} for {seconds:g}s")
            if use_iperf:
                bps = measure_iperf3(bed, srv, cli, host, seconds, bind)
            else:
                bps = float(measure_stream(bed, srv, cli, host, seconds)["bps"])
            progress(f"{label}: {_fmt_bps(bps)}")
            return bps

        result["overlay_bps"] = measure("overlay (no router)", server.name, client.name,
                                        server.ip)
        progress("starting a router in each node's network namespace")
        routers = Routers(bed, workdir)
        routers.start()
        # Bypass and node-to-node runs alternate, so that drift in the machine's load hits
        # both alike; the medians are reported.
        bypass_runs: list[float] = []
        host_runs: list[float] = []
        measured_bypass = vx_bytes = 0
        moved = 0.0
        for i in range(rounds):
            tag = f" ({i + 1}/{rounds})" if rounds > 1 else ""
            before = routers.bypassed()
            vx_before = bed.link_stats(n2.name, "flannel.1")["tx_bytes"]
            started = time.monotonic()
            bps = measure("with bypass" + tag, server.name, client.name, server.ip)
            elapsed = time.monotonic() - started
            bypass_runs.append(bps)
            vx_bytes += bed.link_stats(n2.name, "flannel.1")["tx_bytes"] - vx_before
            measured_bypass += routers.bypassed() - before
            # an upper bound of the data those runs moved (rate × length)
            moved += bps * min(elapsed, seconds) / 8
            host_runs.append(measure("node to node (underlay)" + tag, n1.name, n2.name,
                                     n1.underlay_ip, bind=n1.underlay_ip))
        result["bypass_bps"] = statistics.median(bypass_runs)
        result["host_bps"] = statistics.median(host_runs)
        result["bypass_runs_bps"], result["host_runs_bps"] = bypass_runs, host_runs
        # how much of the bypass runs' data still crossed the VXLAN device
        result["bypass_run"] = {"bypassed_connections": measured_bypass,
                                "overlay_tx_bytes": vx_bytes,
                                "overlay_fraction": round(min(1.0, vx_bytes / max(1.0, moved)),
                                                          4)}
        progress(f"connections bypassed during those runs: {measured_bypass}; "
                 f"{vx_bytes / 1e6:.1f} MB still went through flannel.1")
        progress("integrity: checksummed stream through the bypass")
        before = routers.bypassed()
        link_before = bed.link_stats(n2.name, "flannel.1")["tx_bytes"]
        stream = measure_stream(bed, server.name, client.name, server.ip, max(1.0, seconds / 2),
                                until=lambda: routers.bypassed() > before)
        link_after = bed.link_stats(n2.name, "flannel.1")["tx_bytes"]
        stream_bypassed = routers.bypassed() - before
        result["integrity_ok"] = bool(stream["ok"])
        result["integrity"] = {k: stream[k] for k in ("sent_bytes", "received_bytes",
                                                      "sent_sha256", "received_sha256")}
        result["integrity"]["bypassed"] = stream_bypassed
        result["integrity"]["overlay_tx_bytes"] = link_after - link_before
        result["bypassed_connections"] = measured_bypass + stream_bypassed
        statuses = {n.name: routers.status(n.name) for n in bed.nodes}
        result["traced_to_swapped_ms_p50"] = max(
            (s.get("traced_to_swapped_ms_p50") or 0.0 for s in statuses.values()), default=None)
        result["traced_to_swapped_ms_p99"] = max(
            (s.get("traced_to_swapped_ms_p99") or 0.0 for s in statuses.values()), default=None)
        result["freeze_ms_p99"] = max(
            (s.get("freeze_ms_p99") or 0.0 for s in statuses.values()), default=None)
        result["router_exit_codes"] = routers.stop()
    except KeyboardInterrupt:
        interrupted = True
        result["error"] = "interrupted"
    except Exception as exc:  # noqa: BLE001 - reported, then cleaned up
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if routers is not None:
            with contextlib.suppress(Exception):
                routers.stop()
        if bed is not None:
            progress("removing the testbed")
            bed.down()
        shutil.rmtree(workdir, ignore_errors=True)

    bypassed = result["bypassed_connections"]
    run = result.get("bypass_run") or {}
    # a speed-up is only claimed when that run's data really left the overlay
    result["bypass_effective"] = bool(run.get("bypassed_connections")
                                      and run.get("overlay_fraction", 1.0) < 0.5)
    if result["bypass_effective"] and result["bypass_bps"] and result["host_bps"]:
        result["bypass_host_ratio"] = result["bypass_bps"] / result["host_bps"]
    else:
        result["bypass_host_ratio"] = None
    if as_json:
        print(json.dumps(result))
    else:
        _print_table(result)
    if interrupted:
        return 130
    return 0 if bypassed and result["integrity_ok"] and "error" not in result else 1


def _print_table(r: dict[str, Any]) -> None:
    bypassed = r["bypassed_connections"]
    effective = r.get("bypass_effective")
    rows = [
        ("pod to pod over the overlay", _fmt_bps(r["overlay_bps"])),
        ("pod to pod with bypass" if effective else "pod to pod, router on (NOT bypassed)",
         _fmt_bps(r["bypass_bps"])),
        ("node to node (the limit)", _fmt_bps(r["host_bps"])),
    ]
    runs = len(r.get("bypass_runs_bps") or [])
    rounds = f", median of {runs} alternating bypass/node runs" if runs > 1 else ""
    print(f"\nebpf-router demo ({r['tool']}, {r['seconds']:g}s per run{rounds})")
    for label, value in rows:
        print(f"  {label:<38} {value}")
    print(f"  {'connections bypassed':<38} {bypassed:>7}")
    verdict = "not run" if "integrity" not in r else "OK" if r["integrity_ok"] else "FAILED"
    print(f"  {'stream integrity (sha256, every byte)':<38} {verdict:>7}")
    if effective and r.get("bypass_host_ratio"):
        print(f"  {'bypass / node-to-node':<38} {r['bypass_host_ratio']:7.2f}")
        if r.get("traced_to_swapped_ms_p50"):
            print(f"  {'connect() to swapped, p50 (ms)':<38} "
                  f"{r['traced_to_swapped_ms_p50']:7.1f}")
        if r.get("traced_to_swapped_ms_p99"):
            print(f"  {'connect() to swapped, p99 (ms)':<38} "
                  f"{r['traced_to_swapped_ms_p99']:7.1f}")
        if r.get("freeze_ms_p99"):
            print(f"  {'app frozen, p99 (ms)':<38} {r['freeze_ms_p99']:7.1f}")
    elif not bypassed:
        print("  nothing was bypassed: no speed-up is claimed")
    else:
        print("  the throughput run was not bypassed: no speed-up is claimed")
    if "error" in r:
        print(f"  error: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    """Helpers run inside pods: `serve PORT`, `send HOST PORT SECONDS`."""
    parser = argparse.ArgumentParser(prog="python -m ebpfrouter.demo")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("port", type=int)
    serve.add_argument("--clients", type=int, default=1, help="connections to serve at once")
    send = sub.add_parser("send")
    send.add_argument("host")
    send.add_argument("port", type=int)
    send.add_argument("seconds", type=float)
    send.add_argument("--stop-file", help="stop sending early once this file exists")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        stream_serve(args.port, clients=args.clients)
        return 0
    result = stream_send(args.host, args.port, args.seconds, args.stop_file)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
