"""Results of a bench run: statistics per metric and mode, the Markdown table, PNG plots, JSON.

Ratios compare medians. A bypass column whose runs bypassed nothing is labelled
"not bypassed" and gets no ratio: it is never shown as a speed-up.

CPU (`cpu_summary`) is measured per run, not per metric (one iperf3 run holds both the 1-
and the 4-stream client), so it has a table of its own: per workload and mode the machine's
CPU per unit of work with its user/system/softirq split and the routers' share. Results
written before CPU accounting existed have no `cpu` in their samples and simply no CPU table.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("overlay", "bypass", "host")
COLOURS = {"overlay": "#d95f02", "bypass": "#1b9e77", "host": "#7570b3"}


def stats(values: Sequence[float]) -> dict[str, float] | None:
    """Median, min, max and quartiles of the samples (None without samples)."""
    if not values:
        return None
    vals = sorted(values)
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[::2] if len(vals) > 1
              else (vals[0], vals[0]))
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "q1": q1,
            "q3": q3, "n": len(vals)}


def bypass_state(samples: Sequence[dict[str, Any]]) -> str | None:
    """Over the bypass runs: `bypassed` if every run moved every connection it saw,
    `not bypassed` if no run moved any, `partly bypassed` otherwise; None without runs."""
    states = [s.get("bypass_state") for s in samples if s["mode"] == "bypass"]
    if not states:
        return None
    if all(st == "bypassed" for st in states):
        return "bypassed"
    if all(st == "not bypassed" for st in states):
        return "not bypassed"
    return "partly bypassed"


def summarize(workloads: dict[str, dict[str, Any]],
              samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload and metric: stats per mode, ratios, bypass state, errors."""
    rows = []
    for key, info in workloads.items():
        mine = [s for s in samples if s["workload"] == key]
        state = bypass_state(mine)
        for metric in info["metrics"]:
            name = metric["name"]
            row: dict[str, Any] = {"workload": key, "metric": name, "unit": metric["unit"],
                                   "higher_is_better": metric["higher_is_better"],
                                   "size": metric.get("size"), "in_table": metric["in_table"],
                                   "bypass_state": state}
            for mode in MODES:
                row[mode] = stats([s["values"][name] for s in mine
                                   if s["mode"] == mode and name in s.get("values", {})])
            med = {m: row[m]["median"] if row[m] else None for m in MODES}
            ok = state in ("bypassed", "partly bypassed") and med["bypass"] is not None
            row["bypass_host"] = (med["bypass"] / med["host"]
                                  if ok and med["host"] else None)
            row["bypass_overlay"] = (med["bypass"] / med["overlay"]
                                     if ok and med["overlay"] else None)
            rows.append(row)
    return rows


CPU_PARTS = ("total", "user", "system", "softirq", "unsampled", "routers")


def cpu_summary(workloads: dict[str, dict[str, Any]],
                samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload whose runs have a per-unit CPU cost (`cpu.per_unit`).

    Per mode: stats of each part's cost over the runs that did not fail (each part has its
    own median, so the medians of the parts need not add up to the median total) and of the
    routers' share of the total. `bypass_host` and `bypass_overlay` compare the median
    totals, only where the bypass runs bypassed something (as in `summarize`);
    `saving_vs_overlay` is 1 - bypass_overlay."""
    rows = []
    for key in workloads:
        mine = [s for s in samples if s["workload"] == key]
        costs = [(s["mode"], s["cpu"]["per_unit"]) for s in mine
                 if not s.get("failure") and (s.get("cpu") or {}).get("per_unit")]
        if not costs:
            continue
        state = bypass_state(mine)
        row: dict[str, Any] = {"workload": key, "unit": costs[0][1]["unit"],
                               "bypass_state": state}
        for mode in MODES:
            here = [c for m, c in costs if m == mode]
            if not here:
                row[mode] = None
                continue
            row[mode] = {part: stats([c.get(part, 0.0) for c in here]) for part in CPU_PARTS}
            row[mode]["routers_share"] = stats([c["routers"] / c["total"] for c in here
                                                if c["total"] > 0])
        med = {m: row[m]["total"]["median"] if row[m] else None for m in MODES}
        ok = state in ("bypassed", "partly bypassed") and med["bypass"] is not None
        row["bypass_host"] = med["bypass"] / med["host"] if ok and med["host"] else None
        row["bypass_overlay"] = (med["bypass"] / med["overlay"]
                                 if ok and med["overlay"] else None)
        row["saving_vs_overlay"] = (1 - row["bypass_overlay"]
                                    if row["bypass_overlay"] is not None else None)
        rows.append(row)
    return rows


def fmt(value: float | None) -> str:
    """A number with about three significant digits, no exponent."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) >= 0.01 else f"{value:.2g}"


def _cell(st: dict[str, float] | None) -> str:
    if st is None:
        return "-"
    if st["n"] > 1:
        return f"{fmt(st['median'])} ({fmt(st['min'])}–{fmt(st['max'])})"
    return fmt(st["median"])


def _ratio(row: dict[str, Any], key: str) -> str:
    if row[key] is not None:
        return f"{row[key]:.2f}" + ("*" if row["bypass_state"] == "partly bypassed" else "")
    if row["bypass"] is not None and row["bypass_state"] != "bypassed":
        return f"n/a ({row['bypass_state']})"
    return "-"


def _median(st: dict[str, float] | None) -> str:
    return fmt(st["median"]) if st else "-"


def cpu_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The CPU section (starting with a blank line) with one comparison line per workload;
    no lines without rows."""
    if not rows:
        return []
    out = ["", "## CPU per unit of work", "",
           "| workload | mode | CPU, machine total | user | sys | softirq | unsampled | "
           "routers | routers' share |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for mode in MODES:
            st = row[mode]
            if st is None:
                continue
            label = mode
            if mode == "bypass" and row["bypass_state"] != "bypassed":
                label += f" **{row['bypass_state']}**"
            share = st["routers_share"]
            routers = (f"{_median(st['routers'])}" if mode == "bypass" else "-")
            pct = f"{100 * share['median']:.1f}%" if mode == "bypass" and share else "-"
            out.append(f"| {row['workload']} ({row['unit']}) | {label} | {_cell(st['total'])} "
                       f"| {_median(st['user'])} | {_median(st['system'])} "
                       f"| {_median(st['softirq'])} | {_median(st['unsampled'])} "
                       f"| {routers} | {pct} |")
    out += ["", "CPU-seconds of the whole machine (all cores, from /proc/stat: the run's "
            "time × CPUs − idle − iowait − steal) over each run, per GB (10^9 bytes) the run "
            "moved (s/GB) or in milliseconds per 1,000 requests or connections (ms/1k); "
            "median of the runs (min–max), each part its own median. user, sys (with hard "
            "irq) and softirq are tick-sampled; unsampled is the busy time no tick saw "
            "(bursts shorter than a tick between idle periods). softirq (packet processing: "
            "veth, VXLAN encap/decap) is not split by process in /proc/stat, so it is "
            "machine-wide. routers: both routers' processes (threads, guardians) per unit, "
            "and their share of the machine total.", ""]
    for row in rows:
        ratio, saving = row["bypass_host"], row["saving_vs_overlay"]
        if ratio is None:
            why = (f"bypass {row['bypass_state']}" if row["bypass"] is not None
                   else "no bypass runs")
            out.append(f"- {row['workload']}: no bypass comparison ({why}).")
            continue
        star = "*" if row["bypass_state"] == "partly bypassed" else ""
        text = (f"- {row['workload']}: bypass uses {ratio:.2f}{star}× the host's CPU per unit "
                f"({100 * (ratio - 1):+.0f}%)")
        if saving is not None:
            text += (f", {100 * saving:.0f}% less than the overlay" if saving >= 0 else
                     f", {-100 * saving:.0f}% more than the overlay")
        out.append(text + ".")
    return out


def _accounting(machine: dict[str, Any]) -> str:
    acc = machine.get("cpu_accounting")
    if not acc or acc.get("irq_time_accounting") is None:
        return ""
    kind = ("irq time accounted apart from tasks" if acc["irq_time_accounting"] else
            "softirq ticks also count as system time of the task they interrupt")
    how = "tick-based" if acc.get("tick_accounting") else "virtual (precise)"
    return (f" CPU accounting: {how}, CONFIG_HZ {acc.get('config_hz')}, "
            f"USER_HZ {acc['clk_tck']}, {kind}.")


def _source(source: dict[str, Any] | None) -> str:
    if not source or not source.get("commit"):
        return ""
    text = f" Code: {source['commit'][:10]}"
    if source.get("modified"):
        text += f" plus uncommitted changes in {', '.join(source['modified'])}"
    return text + "."


def markdown(result: dict[str, Any]) -> str:
    """The results table, the router-overhead table and how the numbers were made."""
    rows = result["summary"]
    lines = ["| workload | metric | overlay | bypass | host | bypass/host | bypass/overlay |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row["in_table"]:
            continue
        bypass = _cell(row["bypass"])
        if row["bypass"] is not None and row["bypass_state"] != "bypassed":
            bypass += f" **{row['bypass_state']}**"
        better = "↑" if row["higher_is_better"] else "↓"
        lines.append(f"| {row['workload']} | {row['metric']} ({row['unit']}, {better}) | "
                     f"{_cell(row['overlay'])} | {bypass} | {_cell(row['host'])} | "
                     f"{_ratio(row, 'bypass_host')} | {_ratio(row, 'bypass_overlay')} |")
    out = ["## Results", "", *lines, "",
           "Median of the repeats (min–max in brackets). ↑ higher is better, ↓ lower is "
           "better. `bypass` = pods with a router per node; `host` = node to node on the "
           "underlay (the limit); `overlay` = pods over VXLAN, no router. "
           "**not bypassed**: the routers swapped no connection during those runs, so no "
           "ratio is given; * partly bypassed: some connections stayed on the overlay "
           "(counts below). For `connect`, bypass means the router is running (short "
           "connections mostly end before a swap): it shows the cost of tracing.", ""]
    out += ["## Router overhead and correctness", "",
            "| workload | mode | connections bypassed | sides seen / swapped / left on overlay "
            "| client errors | router CPU s/run | router CPU % of one core |",
            "|---|---|---|---|---|---|---|"]
    for key in result["workloads"]:
        for mode in MODES:
            mine = [s for s in result["samples"] if s["workload"] == key and s["mode"] == mode]
            if not mine:
                continue
            errors = sum(int(s.get("errors", 0)) for s in mine)
            failed_runs = sum(1 for s in mine if s.get("failure"))
            err = f"{errors}" + (f" ({failed_runs} runs failed)" if failed_runs else "")
            if mode == "bypass":
                routed = [s["router"] for s in mine if s.get("router")]
                bypassed = sum(r["bypassed"] for r in routed)
                sides = "{} / {} / {}".format(*(sum(r[k] for r in routed) for k in
                                                ("seen", "bypassed_either_side", "failed")))
                cpu = [s["router_cpu_s"] for s in mine if s.get("router_cpu_s") is not None]
                pct = [100 * s["router_cpu_s"] / s["wall_s"] for s in mine
                       if s.get("router_cpu_s") is not None and s.get("wall_s")]
                label = str(bypassed) if bypassed else "0 (not bypassed)"
                out.append(f"| {key} | {mode} | {label} | {sides} | {err} | "
                           f"{fmt(statistics.median(cpu)) if cpu else '-'} | "
                           f"{fmt(statistics.median(pct)) if pct else '-'} |")
            else:
                out.append(f"| {key} | {mode} | - | - | {err} | - | - |")
    out += cpu_markdown(result.get("cpu_summary")
                        or cpu_summary(result["workloads"], result["samples"]))
    failures = [s for s in result["samples"] if s.get("failure")]
    if failures:
        out += ["", "## Failed runs", ""]
        out += [f"- {s['workload']} {s['mode']} #{s['repeat'] + 1}: "
                f"{' '.join(re.sub('-{3,}', ' ', s['failure']).split())[:300]}"
                for s in failures]
    m = result["machine"]
    out += ["", f"Machine: {m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, "
            f"Python {m['python']}. Command: `{result['command']}` "
            f"({'quick, ' if result['quick'] else ''}{result['repeat']} repeat(s), "
            f"{result['started']})." + _source(m.get("source")) + _accounting(m), ""]
    return "\n".join(out)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """bars.png (every non-MPI table metric, three modes) and one PNG per MPI workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    rows = result["summary"]
    bar_rows = [r for r in rows if r["in_table"] and r["size"] is None]
    if bar_rows:
        ncols = min(4, len(bar_rows))
        nrows = (len(bar_rows) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.9 * nrows),
                                 squeeze=False)
        for ax, row in zip(axes.flat, bar_rows, strict=False):
            for i, mode in enumerate(MODES):
                st = row[mode]
                if st is None:
                    continue
                hatch = "//" if mode == "bypass" and row["bypass_state"] != "bypassed" else ""
                err = ([[st["median"] - st["q1"]], [st["q3"] - st["median"]]]
                       if st["n"] > 1 else None)
                ax.bar(i, st["median"], color=COLOURS[mode], hatch=hatch, yerr=err, capsize=3)
                if hatch:
                    ax.text(i, 0, row["bypass_state"], ha="center", va="bottom", fontsize=7,
                            rotation=90, bbox={"facecolor": "white", "alpha": 0.8,
                                               "linewidth": 0})
            ax.set_xticks(range(len(MODES)), MODES, fontsize=8)
            ax.set_title(f"{row['workload']}: {row['metric']}", fontsize=9)
            ax.set_ylabel(row["unit"], fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for ax in list(axes.flat)[len(bar_rows):]:
            ax.axis("off")
        fig.suptitle("median of the repeats; error bars: interquartile range", fontsize=9)
        fig.tight_layout()
        path = out_dir / "bars.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for key in result["workloads"]:
        series = [r for r in rows if r["workload"] == key and r["size"] is not None]
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for mode in MODES:
            pts = [(r["size"], r[mode]) for r in series if r[mode] is not None]
            if not pts:
                continue
            label = mode
            if mode == "bypass" and series[0]["bypass_state"] != "bypassed":
                label += f" ({series[0]['bypass_state']})"
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1]["median"] for p in pts], marker="o", ms=3, label=label,
                    color=COLOURS[mode])
            ax.fill_between(xs, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts],
                            color=COLOURS[mode], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(series[0]["unit"])
        ax.set_title(result["workloads"][key]["title"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and the plots into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["summary"] = summarize(result["workloads"], result["samples"])
    result["cpu_summary"] = cpu_summary(result["workloads"], result["samples"])
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))  # first: never lost
    paths["markdown"].write_text(markdown(result))
    try:
        pngs = plot(result, out_dir)
    except ImportError as exc:  # matplotlib is the optional `bench` extra
        pngs = []
        result["plots_skipped"] = (f"{exc}; install it with pip install 'ebpf-router[bench]' "
                                   "(or matplotlib) for the PNG plots")
    for i, png in enumerate(pngs):
        paths[f"png{i}"] = png
    result["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=1, default=str))
    return paths
