"""`ebpf-router bench [KEYS...] [--quick] [--out DIR] [--repeat N]` (also
`python3 -m ebpfrouter.bench`): overlay vs bypass vs host on the local testbed."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from . import report
from .harness import BenchError
from .process import interrupt_on
from .report import MODES
from .workloads import WORKLOADS


def _fill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("keys", nargs="*", metavar="KEY",
                        help=f"workloads (default: all): {', '.join(WORKLOADS)}")
    parser.add_argument("--quick", action="store_true",
                        help="short runs, 1 repeat, fewer message sizes (CI smoke, < 3 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: bench/out/<UTC timestamp>)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeats per workload and mode (default 3; 1 with --quick)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset of overlay,bypass,host")
    parser.add_argument("--rule", action="append", type=Path, default=[], metavar="FILE",
                        help="rule file for the routers (repeatable; default: no rules)")
    parser.add_argument("--require-bypass", action="store_true",
                        help="exit 1 if a bypass run bypassed nothing")
    parser.add_argument("--order", choices=("grouped", "phased"), default=None,
                        help="grouped: per workload overlay, host, then bypass with fresh "
                             "routers (default); phased: all overlay+host runs, then routers "
                             "once for all bypass runs (default with --quick)")
    parser.add_argument("--router-loglevel", default="WARNING",
                        help="ROUTER_LOGLEVEL of the routers (default WARNING)")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `bench` to the CLI; the handler is `run_bench(args) -> int` (also `args.func`)."""
    parser = subparsers.add_parser("bench", help="benchmarks: overlay vs bypass vs host")
    _fill(parser)
    parser.set_defaults(func=run_bench)
    return parser


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench for parsed args; write JSON, Markdown and PNGs; print the table.

    0: every run produced numbers without client errors (and, with --require-bypass, every
    bypass run bypassed); 1 otherwise; 2 on bad arguments or missing tools; 130 if interrupted.
    """
    from .runner import BenchOptions, run_suite

    keys = args.keys or list(WORKLOADS)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if repeat < 1:
        print("ebpf-router bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("bench/out") / stamp
    given = getattr(args, "argv", None)
    if given is None:
        given = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    command = shlex.join(["ebpf-router", "bench", *given])
    opts = BenchOptions(keys=keys, quick=args.quick, repeat=repeat,
                        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
                        rule_files=args.rule, command=command,
                        router_loglevel=args.router_loglevel,
                        order=args.order or ("phased" if args.quick else "grouped"))
    if importlib.util.find_spec("matplotlib") is None:
        _progress("[bench] matplotlib is not installed: results.json and results.md only, no "
                  "PNG plots (for plots: pip install 'ebpf-router[bench]')")
    try:
        with interrupt_on(signal.SIGTERM):  # SIGTERM = Ctrl-C: the runner cleans up
            result = run_suite(opts, _progress)
    except BenchError as exc:
        print(f"ebpf-router bench: {exc}", file=sys.stderr)
        return 2
    paths = report.write(result, out)
    print((out / "results.md").read_text())
    _progress(f"[bench] wrote {', '.join(str(p) for p in paths.values())}")
    if result.get("plots_skipped"):
        _progress(f"[bench] no plots: {result['plots_skipped']}")
    if result["interrupted"]:
        return 130
    failed = result["error"] or any(s["failure"] or s["errors"] for s in result["samples"])
    if args.require_bypass and any(s["bypass_state"] == "not bypassed"
                                   for s in result["samples"]):
        failed = True
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry for `python3 -m ebpfrouter.bench`."""
    parser = argparse.ArgumentParser(prog="python3 -m ebpfrouter.bench", description=__doc__)
    _fill(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_bench(args)
