"""Helpers shared by the tracer's kernel tests (test_tracer.py, test_tracer_bounds.py).

`NetnsChild` runs a Python script as a child process inside a test network namespace and
talks to it over its stdin and stdout; `collect` reads the tracer's events until a condition
holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ebpfrouter.tracer import SocketEvent, Tracer

# Runs before the child's own script: enter the network namespace named by argv[1].
ENTER_NETNS = "import sys\nfrom pyroute2 import netns\nnetns.setns(sys.argv[1], flags=0)\n"


class NetnsChild:
    """A Python child process running `script` in the network namespace `netns_name`.

    The script starts inside the namespace, sees its name as `sys.argv[1]` and `args` after
    it, and must first print one JSON line about itself with its "pid" (kept in `info`).
    `proc` has text pipes on stdin and stdout.
    """

    def __init__(self, script: str, netns_name: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENTER_NETNS + script, netns_name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.kill()
            raise RuntimeError(f"child in netns {netns_name} failed to start")
        self.info: dict[str, Any] = json.loads(line)
        self.pid: int = self.info["pid"]

    def send(self, line: str) -> None:
        """Write `line` and a newline to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def readline(self) -> str:
        """The child's next line of output ("" once it has closed its stdout)."""
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def kill(self) -> None:
        """Kill the child if it still runs, reap it and close the pipes (idempotent)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def collect(
    tracer: Tracer,
    until: Callable[[list[SocketEvent]], bool],
    timeout: float = 3.0,
    *,
    pid: int | None = None,
    poll: float = 0.1,
) -> list[SocketEvent]:
    """Read events (only `pid`'s, if given) until `until(events)` is true or `timeout` passes.

    Each read waits at most `poll` seconds; once `until` holds, one more read lets stragglers
    that must NOT be there show up too.
    """
    events: list[SocketEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += [e for e in tracer.read(timeout=poll) if pid is None or e.pid == pid]
        if until(events):
            events += [e for e in tracer.read(timeout=poll) if pid is None or e.pid == pid]
            break
    return events
