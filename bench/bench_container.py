"""Demo figures with the routers in the chart's containers vs as plain processes.

Builds the image (`scripts/build-image`, unique tags, removed at the end) unless `--image` is
given, renders the chart for it, builds a 2-node testbed (one pod per node) and, for each of
`--rounds` rounds, measures pod-to-pod iperf3 throughput in four modes in turn (so the modes
alternate and drift hits all alike):

| mode | routers |
|---|---|
| `overlay` | none: over the VXLAN overlay |
| `process` | one `ebpf-router run` per node, a plain process (as `ebpf-router demo` starts it) |
| `container` | the chart's router container per node, run with podman (`ebpfrouter.chartbed`) |
| `host` | none: node to node on the underlay (the limit) |

Routers are started fresh for each run and stopped after it. Per router run: throughput,
connections bypassed, the share of the run's bytes still sent through flannel.1, both
routers' CPU seconds during the run, and connect()-to-swapped p50 and app-freeze p99 from
their status; then a SHA-256-checked stream through a bypassed connection. Prints the
medians over the rounds (`--json`: one object). No timing is asserted anywhere. Root, about
`rounds * (4 * seconds + 15)` s plus the image build (~20 s, ~75 s with a fresh base):

    python3 bench/bench_container.py [--rounds 3] [--seconds 5] [--image TAG] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ebpfrouter.bench.process import interrupt_on  # noqa: E402
from ebpfrouter.chartbed import ChartRouters, render_chart  # noqa: E402
from ebpfrouter.demo import Routers, measure_iperf3, measure_stream  # noqa: E402
from ebpfrouter.k8s.podman import podman  # noqa: E402
from ebpfrouter.testbed import Testbed  # noqa: E402

MODES = ("overlay", "process", "container", "host")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def progress(text: str) -> None:
    print(f"[bench_container] {text}", file=sys.stderr, flush=True)


def helm_path() -> str:
    """helm from EBPF_ROUTER_HELM or charts/tools/get-helm.py (as the tests find it)."""
    if os.environ.get("EBPF_ROUTER_HELM"):
        return os.environ["EBPF_ROUTER_HELM"]
    spec = importlib.util.spec_from_file_location("get_helm", ROOT / "charts/tools/get-helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.get_helm())


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def router_pids(routers: Routers | ChartRouters) -> list[int]:
    if isinstance(routers, ChartRouters):
        return [c.pid() for c in routers.containers.values()]
    return [p.pid for p in routers.procs.values()]


def routed_run(mode: str, bed: Testbed, docs: list[dict[str, Any]], workdir: Path,
               seconds: float, round_no: int) -> dict[str, Any]:
    """Start routers of `mode`, measure iperf3 and a checked stream, stop them."""
    server, client = bed.pods[0], bed.pods[1]
    client_node = bed.pods[1].node
    routers: Routers | ChartRouters
    run_dir = workdir / f"{mode}{round_no}"
    run_dir.mkdir()
    if mode == "process":
        routers = Routers(bed, run_dir, loglevel="WARNING")  # the chart's default level
    else:
        routers = ChartRouters(bed, docs, run_dir, f"bench-{bed.run_id}-{round_no}")
    started = time.monotonic()
    try:
        routers.start()
        startup = time.monotonic() - started
        pids = router_pids(routers)
        cpu_before = sum(cpu_seconds(p) for p in pids)
        vx_before = bed.link_stats(client_node, "flannel.1")["tx_bytes"]
        before = routers.bypassed()
        t0 = time.monotonic()
        bps = measure_iperf3(bed, server.name, client.name, server.ip, seconds)
        elapsed = time.monotonic() - t0
        vx = bed.link_stats(client_node, "flannel.1")["tx_bytes"] - vx_before
        cpu = sum(cpu_seconds(p) for p in pids) - cpu_before
        bypassed = routers.bypassed() - before
        statuses = [routers.status(n.name) for n in bed.nodes]
        mark = routers.bypassed()
        stream = measure_stream(bed, server.name, client.name, server.ip, 1.0,
                                until=lambda: routers.bypassed() > mark)
        return {"bps": bps, "bypassed": bypassed, "startup_s": startup,
                "overlay_fraction": min(1.0, vx / max(1.0, bps * min(elapsed, seconds) / 8)),
                "router_cpu_s": cpu,
                "swapped_ms_p50": max((s.get("traced_to_swapped_ms_p50") or 0.0)
                                      for s in statuses),
                "freeze_ms_p99": max((s.get("freeze_ms_p99") or 0.0) for s in statuses),
                "integrity_ok": bool(stream["ok"]) and routers.bypassed() > mark}
    finally:
        routers.stop()


def build_image() -> tuple[str, list[str]]:
    """Build the image under unique tags; (image, tags to remove afterwards)."""
    run = uuid.uuid4().hex[:8]
    tag, base = f"localhost/ebpf-router-bench-{run}:b", f"localhost/ebpf-router-bench-base-{run}:b"
    progress("building the image (scripts/build-image)")
    proc = subprocess.run([str(ROOT / "scripts/build-image"), "--tag", tag, "--base-tag", base,
                           "--rebuild-base", "--no-layer-cache"],
                          capture_output=True, text=True, timeout=900)
    for line in proc.stderr.splitlines():
        if line.startswith("build-image:"):
            progress(line)
    if proc.returncode != 0:
        raise RuntimeError(f"build-image failed: {proc.stderr[-1500:]}")
    return tag, [tag, base]


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def table(result: dict[str, Any]) -> str:
    med = result["medians"]
    rows = [("pod to pod (Gbit/s)", "bps", 1e-9, "{:.2f}"),
            ("connections bypassed per run", "bypassed", 1, "{:.0f}"),
            ("bytes still on the overlay", "overlay_fraction", 100, "{:.1f}%"),
            ("routers' CPU per run (s)", "router_cpu_s", 1, "{:.2f}"),
            ("connect() to swapped p50 (ms)", "swapped_ms_p50", 1, "{:.0f}"),
            ("app frozen p99 (ms)", "freeze_ms_p99", 1, "{:.1f}"),
            ("router start to ready (s)", "startup_s", 1, "{:.1f}")]
    lines = [f"ebpf-router: routers in containers vs plain processes (iperf3, "
             f"{result['seconds']:g} s per run, median of {result['rounds']} rounds)",
             f"  {'':<32}" + "".join(f"{m:>12}" for m in MODES)]
    for label, key, scale, fmt in rows:
        cells = []
        for mode in MODES:
            value = med[mode].get(key)
            cells.append("-" if value is None else fmt.format(value * scale))
        lines.append(f"  {label:<32}" + "".join(f"{c:>12}" for c in cells))
    ok = {m: all(r["integrity_ok"] for r in result["runs"][m]) for m in ("process", "container")}
    lines.append(f"  {'stream integrity (sha256)':<32}{'':>12}" +
                 "".join(f"{'OK' if ok[m] else 'FAILED':>12}" for m in ("process", "container")))
    if med["host"].get("bps"):
        lines.append(f"  {'bypass / node-to-node':<32}{'':>12}" + "".join(
            f"{med[m]['bps'] / med['host']['bps']:>12.2f}" for m in ("process", "container")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--image", help="use this image (built from the Dockerfile) as it is")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_container: run as root", file=sys.stderr)
        return 2
    for tool in ("podman", "runc", "iperf3"):
        if shutil.which(tool) is None:
            print(f"bench_container: {tool} is missing: apt-get install {tool}", file=sys.stderr)
            return 2
    remove: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="ebpf-router-bench-container-"))
    bed: Testbed | None = None
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        with interrupt_on(signal.SIGINT, signal.SIGTERM):
            image = args.image
            if image is None:
                image, remove = build_image()
            repository, tag = image.rsplit(":", 1)
            docs = render_chart(helm_path(), ROOT / "charts" / "ebpf-router", "--set",
                                f"image.repository={repository}", "--set", f"image.tag={tag}")
            progress("building a 2-node testbed")
            bed = Testbed.up(2, 1)
            server, client = bed.pods[0], bed.pods[1]
            n1, n2 = bed.nodes[0], bed.nodes[1]
            for i in range(args.rounds):
                for mode in MODES:
                    progress(f"round {i + 1}/{args.rounds}: {mode}")
                    if mode == "overlay":
                        runs[mode].append({"bps": measure_iperf3(
                            bed, server.name, client.name, server.ip, args.seconds)})
                    elif mode == "host":
                        runs[mode].append({"bps": measure_iperf3(
                            bed, n1.name, n2.name, n1.underlay_ip, args.seconds,
                            bind=n1.underlay_ip)})
                    else:
                        runs[mode].append(routed_run(mode, bed, docs, workdir, args.seconds, i))
                    progress(f"  {runs[mode][-1]}")
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        if bed is not None:
            bed.down()
        for image_tag in remove:
            podman("rmi", "--force", image_tag, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    keys = ("bps", "bypassed", "overlay_fraction", "router_cpu_s", "swapped_ms_p50",
            "freeze_ms_p99", "startup_s")
    result = {"rounds": args.rounds, "seconds": args.seconds, "runs": runs,
              "medians": {m: {k: median(runs[m], k) for k in keys} for m in MODES}}
    print(json.dumps(result) if args.json else table(result))
    routed_ok = all(r["bypassed"] and r["integrity_ok"] for m in ("process", "container")
                    for r in runs[m])
    return 0 if routed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
