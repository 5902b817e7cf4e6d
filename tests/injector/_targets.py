"""The line-driven `_fd_target.py` program as a test object."""

from __future__ import annotations

import select
import socket
import subprocess
import sys

from _swap_support import HERE, free_port, stop


class FdTarget:
    """A running `_fd_target.py`; `cmd()` sends one command and returns its reply line."""

    def __init__(self, prefix: list[str] | None = None) -> None:
        self.port = free_port()
        argv = [*(prefix or []), sys.executable, "-u", str(HERE / "_fd_target.py"), str(self.port)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert self.readline() == "ready"
        self.pid = self.proc.pid
        self.epfds = [int(x) for x in self.cmd("epfds").split()]

    def readline(self, timeout: float = 10.0) -> str:
        """One reply line; the protocol is one line per command, so select() is safe here."""
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"fd target pid {self.proc.pid}: no reply within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError(f"fd target exited ({self.proc.poll()})")
        return line.strip()

    def cmd(self, *words: object) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def connect(self) -> tuple[socket.socket, int]:
        """A client connection to the target; returns (client socket, target's fd)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("accept\n")
        self.proc.stdin.flush()
        c = socket.create_connection(("127.0.0.1", self.port))
        return c, int(self.readline())

    def close(self) -> None:
        stop(self.proc)
