"""Small C targets (tests/injector/_ctarget.c, built once per session with gcc) and /proc
helpers for the freeze/remote tests. Every target is killed when its test ends."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def build_ctarget(tmp_dir: Path) -> Path:
    """Compile _ctarget.c into tmp_dir; skip the test if there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build the test target")
    out = tmp_dir / "ctarget"
    subprocess.run(
        [cc, "-O1", "-Wall", "-o", str(out), str(HERE / "_ctarget.c"), "-lpthread"], check=True
    )
    return out


class Target:
    """A running target process with a line-oriented stdout and a writable stdin."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self._buf = b""

    def readline(self, timeout: float = 5.0) -> str:
        """Next stdout line, or raise TimeoutError."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"pid {self.pid}: no output within {timeout}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"pid {self.pid} exited ({self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def has_output(self, wait: float) -> bool:
        """True if a line (or EOF) is available within `wait` seconds."""
        assert self.proc.stdout is not None
        if b"\n" in self._buf:
            return True
        return bool(select.select([self.proc.stdout.fileno()], [], [], wait)[0])

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL and reap (works on stopped and traced targets too)."""
        if self.proc.poll() is None:
            with _suppress():
                os.kill(self.pid, signal.SIGKILL)
            with _suppress():
                self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            with _suppress():
                f.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def parse(line: str) -> dict[str, int]:
    """`a=1 b=-2 c=x` -> {'a': 1, 'b': -2} (non-integer values dropped)."""
    out = {}
    for word in line.split():
        key, _, value = word.partition("=")
        if value.lstrip("-").isdigit():
            out[key] = int(value)
    return out


def task_states(pid: int) -> dict[int, str]:
    """tid -> one-letter state of every thread."""
    states = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except OSError:  # the thread just exited
            continue
        states[int(tid)] = data[data.rindex(")") + 2]
    return states


def status_field(pid: int, name: str, tid: int | None = None) -> str:
    """One field of /proc/PID[/task/TID]/status."""
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def tracers(pid: int) -> dict[int, int]:
    """tid -> TracerPid for every thread (0 = not traced)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with _suppress():
            out[int(tid)] = int(status_field(pid, "TracerPid", int(tid)))
    return out


def signal_state(pid: int) -> dict[int, tuple[str, str, str]]:
    """tid -> (SigBlk, SigIgn, SigCgt): must be identical before and after a freeze."""
    return {
        tid: tuple(status_field(pid, k, tid) for k in ("SigBlk", "SigIgn", "SigCgt"))
        for tid in task_states(pid)
    }  # (for targets whose threads do not come and go)


def wait_state(pid: int, wanted: str, timeout: float = 5.0, tid: int | None = None) -> bool:
    """Wait until the thread (default: main) has one of the states in `wanted`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if task_states(pid).get(tid or pid) in tuple(wanted):
            return True
        time.sleep(0.005)
    return False


def wait_blocked(pid: int, timeout: float = 5.0) -> None:
    """Wait until every thread is asleep (S) so it sits inside its blocking syscall."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if set(task_states(pid).values()) == {"S"}:
            time.sleep(0.02)  # let the syscall get past its setup
            return
        time.sleep(0.005)
    raise TimeoutError(f"pid {pid} never blocked: {task_states(pid)}")
