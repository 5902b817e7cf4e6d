"""Process plumbing shared by the benchmark harness and the bench/ scripts (soak, bounds):
turning SIGTERM/SIGINT into KeyboardInterrupt for clean-up, and a process's resource figures."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def interrupt_on(*signals: signal.Signals) -> Iterator[None]:
    """While inside, each of `signals` raises KeyboardInterrupt in this process, so `finally`
    blocks remove testbeds and routers (SIGINT is ignored by a shell's background job, hence
    worth listing). A forked child that inherited the handler (pyroute2's netns helpers) dies
    as the signal would have killed it. The previous handlers come back on the way out."""
    main_pid = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def usage(pid: int) -> dict[str, int]:
    """VmRSS (KiB), threads and open fds of `pid`; zeros if it is gone."""
    out = {"rss_kib": 0, "threads": 0, "fds": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out
