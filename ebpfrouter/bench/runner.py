"""One bench run: testbed up, every workload in every mode (repeated), routers for the bypass
mode, counters and CPU time around each measurement, then everything torn down.

Each sample carries a `cpu` dict (`cpu.CpuMeter`): the machine's CPU-seconds by kind
(user, system, softirq...), the load's, the routers' and the harness's, and the cost per
unit of the run's work (per GB, per 1,000 requests or connections) where it has one.

Order (`make_plan`): by default per workload its overlay and host runs, then a router per
node is started for its bypass runs and stopped after; `phased` (the --quick default) runs
every overlay and host run first and starts the routers once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import tools
from ..testbed import Testbed, TestbedError
from .cpu import CpuMeter
from .harness import BenchError, Harness, RouterSet
from .report import MODES, fmt
from .sysinfo import machine_info
from .workloads import WORKLOADS, Outcome, Workload

Progress = Callable[[str], None]


@dataclasses.dataclass
class BenchOptions:
    """What to run and how often."""

    keys: Sequence[str]
    quick: bool = False
    repeat: int = 3
    modes: Sequence[str] = MODES
    rule_files: Sequence[Path] = ()
    command: str = "ebpf-router bench"
    router_loglevel: str = "WARNING"
    order: str = "grouped"


def make_workloads(opts: BenchOptions) -> list[Workload]:
    """Instantiate the selected workloads; unknown keys name the known ones, and every missing
    tool is named with the packages to install (before anything runs)."""
    unknown = [k for k in opts.keys if k not in WORKLOADS]
    if unknown:
        raise BenchError(f"unknown workload {', '.join(unknown)} (known: {', '.join(WORKLOADS)})")
    bad_modes = [m for m in opts.modes if m not in MODES]
    if bad_modes:
        raise BenchError(f"unknown mode {', '.join(bad_modes)} (known: {', '.join(MODES)})")
    workloads = [WORKLOADS[k](opts.quick) for k in dict.fromkeys(opts.keys)]
    absent = tools.missing(t for w in workloads for t in w.tools())
    if absent:
        who = {t: [w.key for w in workloads if t in w.tools()] for t in absent}
        raise BenchError("missing tools (" + "; ".join(f"{t}: {', '.join(k)}"
                                                      for t, k in who.items()) + "): "
                         + tools.describe_missing(absent)
                         + "; or leave those workloads out (ebpf-router bench KEY...)")
    return workloads


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    counters = {k: after["counters"][k] - before["counters"][k] for k in after["counters"]}
    return {"seen": counters["seen"], "bypassed": counters["bypassed_client"],
            "bypassed_either_side": counters["bypassed"], "failed": counters["failed"],
            "pending_after": after["counters"]["pending"],
            "status_errors": before["errors"] + after["errors"]}


def classify(delta: dict[str, Any]) -> str:
    """`not bypassed` (nothing swapped), `partly bypassed` (some connections were left on
    the overlay), or `bypassed`."""
    if delta["bypassed"] <= 0:
        return "not bypassed"
    return "partly bypassed" if delta["failed"] > 0 else "bypassed"


def measure(h: Harness, w: Workload, mode: str, repeat: int,
            routers: RouterSet | None) -> dict[str, Any]:
    """One measurement with router counters and CPU time around it; never raises BenchError.

    The CPU meter is the innermost wrapper, so the routers' status queries before and after
    (their counters) are not in the CPU figures; everything between the server's start and
    its stop is."""
    sample: dict[str, Any] = {"workload": w.key, "mode": mode, "repeat": repeat, "values": {},
                              "errors": 0, "error_text": "", "failure": None, "raw": {},
                              "router": None, "router_cpu_s": None, "bypass_state": None}
    before = routers.snapshot() if routers else None
    meter = CpuMeter(routers.pids if routers else lambda: ())
    work: dict[str, float] = {}
    start = time.monotonic()
    meter.start()
    try:
        outcome: Outcome = w.run(h, h.endpoints(mode))
        sample.update(values=outcome.values, errors=outcome.errors,
                      error_text=outcome.error_text, raw=outcome.raw)
        work = outcome.work
        if not outcome.values:
            sample["failure"] = outcome.error_text or "no numbers in the output"
    except BenchError as exc:
        sample["failure"] = str(exc)
    sample["cpu"] = meter.stop(work)
    sample["wall_s"] = time.monotonic() - start
    if routers and before is not None:
        after = routers.snapshot()
        delta = _delta(before, after)
        sample["router"] = delta
        sample["router_cpu_s"] = after["cpu_s"] - before["cpu_s"]
        sample["bypass_state"] = classify(delta)
        dead = routers.alive()
        if dead:
            sample["failure"] = (sample["failure"] or "") + f" router exited on {', '.join(dead)}"
    return sample


def describe(sample: dict[str, Any], w: Workload) -> str:
    """A short progress text for one sample."""
    if sample["failure"]:
        text = f"FAILED: {sample['failure'][:200]}"
    else:
        units = {m.name: m.unit for m in w.metrics()}
        names = list(sample["values"])
        if len(names) > 3:
            names = [names[0], names[-1]]
        text = ", ".join(f"{n} {fmt(sample['values'][n])} {units.get(n, '')}" for n in names)
        cost = (sample.get("cpu") or {}).get("per_unit")
        if cost:
            text += f"; CPU {fmt(cost['total'])} {cost['unit']}"
    if sample["errors"]:
        text += f"; {sample['errors']} client errors"
    if sample["router"] is not None:
        r = sample["router"]
        text += (f"; bypassed {r['bypassed']}" if r["bypassed"] else "; NOT BYPASSED")
        text += f", left on overlay {r['failed']}" if r["failed"] else ""
        text += f", router CPU {sample['router_cpu_s']:.2f}s"
    return f"{text} ({sample['wall_s']:.1f}s)"


def _testbed_up(pods: int, attempts: int = 2) -> Testbed:
    """Testbed.up, once more if a namespace vanished under a concurrent cleanup."""
    for attempt in range(attempts):
        try:
            return Testbed.up(2, pods)
        except (TestbedError, OSError) as exc:
            if attempt == attempts - 1:
                raise BenchError(f"testbed: cannot build: {exc}") from None
            time.sleep(1)
    raise AssertionError("unreachable")


def _log_tails(workdir: Path, limit: int = 4000) -> dict[str, str]:
    """The end of every router and server log (kept in the JSON; the workdir is removed)."""
    tails = {}
    for path in sorted(workdir.rglob("*.log")):
        with contextlib.suppress(OSError):
            text = path.read_text(errors="replace")
            tails[str(path.relative_to(workdir))] = text[-limit:]
    return tails


Step = tuple[str, Workload | None, str, int]


def make_plan(workloads: Sequence[Workload], modes: Sequence[str], repeat: int,
              order: str) -> list[Step]:
    """The steps: ("start"|"stop", workload-or-None, "", 0) and ("measure", w, mode, rep).

    `grouped`: per workload, its overlay and host runs, then fresh routers for its bypass
    runs (modes measured close together in time; one workload's router state never leaks
    into the next). `phased`: all overlay and host runs, then routers once for every bypass
    run (fewer router starts: what --quick uses).
    """
    ordered = [m for m in ("overlay", "host", "bypass") if m in modes]
    if order not in ("grouped", "phased"):
        raise BenchError(f"unknown order {order!r} (grouped or phased)")
    plan: list[Step] = []
    if order == "grouped":
        for w in workloads:
            for mode in ordered:
                if mode == "bypass":
                    plan.append(("start", w, "", 0))
                plan += [("measure", w, mode, r) for r in range(repeat)]
                if mode == "bypass":
                    plan.append(("stop", w, "", 0))
        return plan
    for mode in ordered:
        if mode == "bypass":
            plan.append(("start", None, "", 0))
        plan += [("measure", w, mode, r) for w in workloads for r in range(repeat)]
        if mode == "bypass":
            plan.append(("stop", None, "", 0))
    return plan


def run_suite(opts: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Run everything; returns the result (samples, machine, router statuses). Cleans up
    the testbed, routers and temporary files on success, failure and KeyboardInterrupt."""
    workloads = make_workloads(opts)
    modes = [m for m in ("overlay", "host", "bypass") if m in opts.modes]
    make_plan(workloads, modes, 1, opts.order)  # check the order name before building
    result: dict[str, Any] = {
        "bench_format": 1, "command": opts.command, "quick": opts.quick, "repeat": opts.repeat,
        "modes": modes, "started": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"),
        "machine": machine_info(),
        "workloads": {w.key: {"title": w.title, "params": w.params(),
                              "metrics": [dataclasses.asdict(m) for m in w.metrics()]}
                      for w in workloads},
        "samples": [], "routers": {}, "interrupted": False, "error": None,
    }
    workdir = Path(tempfile.mkdtemp(prefix="ebpf-router-bench-"))
    bed: Testbed | None = None
    routers: RouterSet | None = None
    t0 = time.monotonic()

    def step(i: int, n: int, text: str) -> None:
        elapsed = int(time.monotonic() - t0)
        progress(f"[bench {i:>2}/{n} +{elapsed // 60}:{elapsed % 60:02d}] {text}")

    try:
        pods = max(w.pods_per_node for w in workloads)
        step(0, 0, f"building a 2-node testbed ({pods} pod(s) per node, VXLAN overlay)")
        bed = _testbed_up(pods)
        result["testbed"] = {"id": bed.run_id, "nodes": len(bed.nodes), "pods": len(bed.pods)}
        step(0, 0, f"testbed {bed.run_id} up: " + ", ".join(
            f"{p.name} {p.ip} on {p.node}" for p in bed.pods))
        h = Harness(bed, workdir, opts.quick)
        for workload in workloads:
            workload.prepare(h)
        plan = make_plan(workloads, modes, opts.repeat, opts.order)
        result["order"] = opts.order
        result["routers"] = {}
        n = sum(1 for p in plan if p[0] == "measure")
        i = 0
        for action, w, mode, rep in plan:
            if action == "start":
                step(i + 1, n, "starting a router in each node's network namespace")
                group = w.key if w is not None else "all"
                routers = RouterSet(bed, workdir / f"routers-{group}", opts.rule_files,
                                    opts.router_loglevel)
                routers.group = group
                routers.start()
            elif action == "stop" and routers is not None:
                result["routers"][routers.group] = routers.statuses()
                routers.stop()
                routers = None
            elif action == "measure":
                assert w is not None  # make_plan gives every measurement its workload
                i += 1
                sample = measure(h, w, mode, rep, routers if mode == "bypass" else None)
                result["samples"].append(sample)
                step(i, n, f"{w.key} {mode} #{rep + 1}: {describe(sample, w)}")
    except KeyboardInterrupt:
        result["interrupted"] = True
        progress("[bench] interrupted: cleaning up")
    except BenchError as exc:
        result["error"] = str(exc)
        progress(f"[bench] error: {exc}")
    finally:
        if routers is not None:
            with contextlib.suppress(Exception):
                result["routers"][routers.group] = routers.statuses()
            with contextlib.suppress(Exception):
                routers.stop()
        result["logs"] = _log_tails(workdir)
        if bed is not None:
            step(0, 0, "removing the testbed")
            bed.down()
        shutil.rmtree(workdir, ignore_errors=True)
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result["elapsed_s"] = time.monotonic() - t0
    return result
