"""The guardian: a small process that resumes the apps the tracer stopped if the daemon dies.

The eager swap stops an app (SIGSTOP from a BPF program) at `connect()`/`accept()` return, and
only the daemon resumes it. A group-stopped process stays stopped when its tracer dies, so a
daemon killed at the wrong moment would leave apps stopped for good. The daemon starts this
guardian with the tracer's ``stops`` map (pid -> when stopped; the programs add, the daemon
removes on resume) and a pipe whose write end only the daemon holds. When the pipe reaches
EOF (the daemon exited, however), the guardian sends SIGCONT to every process in the map that
is still stopped, and exits. The tracer's programs are detached when the daemon's fds close,
so nothing is stopped after that. The map itself is the record, so nothing is lost between
a stop and the daemon reading its event.

    python -m ebpfrouter.guardian MAP_FD PIPE_FD
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from bpf_asm.maps import Map


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def resume_stopped(stops: Map, settle: float = 0.0) -> list[int]:
    """SIGCONT every process in `stops` that is still stopped; empty the map; the pids.

    `settle`: keep at it for up to that long while any of them is still stopped. A dying
    daemon closes its fds (our EOF) before the kernel detaches its tracees, so a process it
    had seized may still show "t" (tracing stop) at first; SIGCONT ends the group stop at once
    (the detach then lets it run), and the loop makes sure."""
    pids = {int.from_bytes(key, "little"): key for key in list(stops.keys())}
    resumed: set[int] = set()
    deadline = time.monotonic() + settle
    while True:
        stopped = [pid for pid in pids if process_state(pid) in ("T", "t")]
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                resumed.add(pid)
        if not stopped or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for key in pids.values():
        with contextlib.suppress(Exception):
            stops.delete(key)
    return sorted(resumed)


class Guardian:
    """The daemon's handle on its guardian process."""

    def __init__(self, stops: Map) -> None:
        read_end, self._write_end = os.pipe()
        os.set_inheritable(read_end, True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ebpfrouter.guardian", str(stops.fd), str(read_end)],
            pass_fds=(stops.fd, read_end), start_new_session=True, env=env,
            stdin=subprocess.DEVNULL)
        os.close(read_end)

    @property
    def pid(self) -> int:
        """The guardian's pid."""
        return self.proc.pid

    def alive(self) -> bool:
        """It still runs."""
        return self.proc.poll() is None

    def close(self) -> None:
        """The daemon is done: let the guardian resume what is left and exit."""
        if self._write_end >= 0:
            os.close(self._write_end)
            self._write_end = -1
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def main(argv: list[str]) -> int:
    """Wait for the daemon to go, then resume every process it left stopped."""
    map_fd, pipe_fd = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the daemon's business
    stops = Map.from_fd(map_fd)
    while True:
        try:
            if not os.read(pipe_fd, 64):
                break
        except InterruptedError:
            continue
    resumed = resume_stopped(stops, settle=2.0)
    if resumed:
        print(f"ebpf-router guardian: resumed {len(resumed)} stopped processes: "
              f"{' '.join(map(str, resumed))}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
