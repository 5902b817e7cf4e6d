"""Benchmark the injector core: freeze-to-thaw time and per-syscall injection time.

Targets: an idle Python process (blocked reading stdin), a Python process with one thread
spinning on the CPU, and redis-server (if installed) while redis-benchmark hammers it.
For each: N freeze/thaw cycles with nothing inside (p50/p99 of the whole `with freeze()`),
N cycles with one getpid inside, and the time of one injected getpid / one scratch
mmap+munmap pair measured inside a single freeze. Run as root:

    python3 bench/bench_freeze.py [--cycles 300] [--calls 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from injector.freeze import freeze  # noqa: E402

IDLE = "import sys; print('ready', flush=True); sys.stdin.read()"
SPIN = """
import sys, threading
def spin():
    x = 0
    while True:
        x += 1
threading.Thread(target=spin, daemon=True).start()
print('ready', flush=True)
sys.stdin.read()
"""


def pct(samples: list[float], p: float) -> float:
    """The p-th percentile (nearest rank), in microseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6


@contextmanager
def python_target(code: str) -> Iterator[int]:
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def redis_under_load() -> Iterator[int]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", d, "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        load = None
        try:
            deadline = time.monotonic() + 5
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            load = subprocess.Popen(
                ["redis-benchmark", "-p", str(port), "-q", "-n", "100000000", "-c", "20",
                 "-t", "set,get", "-d", "64"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            time.sleep(0.3)
            yield server.pid
        finally:
            for p in (load, server):
                if p is not None:
                    p.kill()
                    p.wait()


def measure(pid: int, cycles: int, calls: int) -> dict[str, float]:
    """Timings (µs) for one target."""
    empty: list[float] = []
    one: list[float] = []
    for i in range(cycles):
        t0 = time.perf_counter()
        with freeze(pid) as proc:
            if i % 2:
                proc.syscall("getpid")
        (one if i % 2 else empty).append(time.perf_counter() - t0)
    per_call: list[float] = []
    per_scratch: list[float] = []
    with freeze(pid) as proc:
        threads = len(proc.tids)
        for _ in range(calls):
            t0 = time.perf_counter()
            proc.syscall("getpid")
            per_call.append(time.perf_counter() - t0)
        for _ in range(calls // 4):
            t0 = time.perf_counter()
            with proc.scratch(4096):
                pass
            per_scratch.append(time.perf_counter() - t0)
    return {
        "threads": threads,
        "freeze p50": pct(empty, 50), "freeze p99": pct(empty, 99),
        "+getpid p50": pct(one, 50), "+getpid p99": pct(one, 99),
        "syscall p50": pct(per_call, 50), "syscall p99": pct(per_call, 99),
        "scratch p50": pct(per_scratch, 50),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (ptrace)")
    targets: list[tuple[str, Callable[[], AbstractContextManager[int]]]] = [
        ("idle python", lambda: python_target(IDLE)),
        ("spinning python thread", lambda: python_target(SPIN)),
    ]
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        targets.append(("redis-server + redis-benchmark", redis_under_load))
    cols = ["threads", "freeze p50", "freeze p99", "+getpid p50", "+getpid p99",
            "syscall p50", "syscall p99", "scratch p50"]
    print(f"all times in µs; {args.cycles} freeze/thaw cycles, {args.calls} getpid per target")
    print(f"{'target':32}" + "".join(f"{c:>13}" for c in cols))
    for name, make in targets:
        with make() as pid:
            row = measure(pid, args.cycles, args.calls)
        print(f"{name:32}" + "".join(f"{row[c]:>13.0f}" for c in cols))


if __name__ == "__main__":
    main()
