"""Benchmark: time of `replace_fd` into a real redis-server, idle and under redis-benchmark load.

Each sample swaps the server end of one client connection for a fresh loopback connection
(the client switches to the new end and checks redis still answers with the same session).
"Total swap" is replace_fd end to end (freeze, pidfd_getfd, options, handoff, dup3, epoll
fix-ups, thaw); "freeze-thaw" is an empty freeze for comparison. Run as root:

    python3 bench/bench_swap.py [--swaps 500]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time

from injector.errors import InjectorError
from injector.freeze import freeze
from injector.inspect import copy_socket
from injector.swap import replace_fd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"redis did not listen on {port}")


def call(sock: socket.socket, *args: str) -> bytes:
    """Send one RESP command and return the first reply line (small replies only)."""
    msg = f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)
    sock.sendall(msg.encode())
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("redis closed the connection")
        buf += chunk
    return buf


def server_fd(pid: int, client: socket.socket) -> tuple[int, int]:
    """(fd, inode) of redis's end of `client`: the fd whose socket has the mirrored 4-tuple."""
    want = (client.getsockname(), client.getpeername())
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        try:
            with copy_socket(pid, fd) as cp:
                if cp.type == socket.SOCK_STREAM and (cp.getpeername(), cp.getsockname()) == want:
                    return fd, os.fstat(cp.fileno()).st_ino
        except (InjectorError, OSError):  # not a socket, or not connected
            continue
    raise LookupError("redis end of the client connection not found")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_swaps(pid: int, port: int, n: int) -> tuple[list[float], list[float]]:
    """n swaps of one client's connection; returns (swap times, empty freeze times) in ms."""
    c = socket.create_connection(("127.0.0.1", port))
    assert call(c, "CLIENT", "SETNAME", "bench") == b"+OK\r\n"
    fd, inode = server_fd(pid, c)
    swaps, freezes = [], []
    for _ in range(n):
        with socket.create_server(("127.0.0.1", 0)) as lst:
            c2 = socket.create_connection(lst.getsockname())
            s2, _ = lst.accept()
        new_inode = os.fstat(s2.fileno()).st_ino
        t0 = time.perf_counter()
        old = replace_fd(pid, fd, s2, expected_inode=inode)
        swaps.append((time.perf_counter() - t0) * 1e3)
        s2.close()
        old.close()
        c.close()
        c, inode = c2, new_inode
        if call(c, "CLIENT", "GETNAME") != b"$5\r\nbench\r\n":
            raise RuntimeError("redis lost the client session across a swap")
        t0 = time.perf_counter()
        with freeze(pid):
            pass
        freezes.append((time.perf_counter() - t0) * 1e3)
    c.close()
    return swaps, freezes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=500)
    args = ap.parse_args()
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--protected-mode", "no", "--logfile", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rows = []
    try:
        wait_port(port)
        rows.append(("redis idle", *run_swaps(redis.pid, port, args.swaps), None))
        load = subprocess.Popen(
            ["redis-benchmark", "-p", str(port), "-c", "50", "-n", "100000000", "-t", "set,get",
             "-P", "4", "-q", "--csv"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            time.sleep(1.0)
            t0 = time.monotonic()
            swaps, freezes = run_swaps(redis.pid, port, args.swaps)
            rows.append(("redis + redis-benchmark -c 50", swaps, freezes, time.monotonic() - t0))
        finally:
            load.terminate()
            load.wait(10)
    finally:
        redis.kill()
        redis.wait(10)
    print(f"replace_fd into redis-server, {args.swaps} swaps each (ms)")
    cols = ("p50", "p99", "max", "mean")
    print(f"| {'scenario':<30} | {'what':<11} | " + " | ".join(f"{c:>6}" for c in cols) + " |")
    print(f"|{'-' * 32}|{'-' * 13}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
    for name, swaps, freezes, _ in rows:
        for what, xs in (("total swap", swaps), ("freeze-thaw", freezes)):
            print(
                f"| {name:<30} | {what:<11} | {pct(xs, 50):6.2f} | {pct(xs, 99):6.2f} "
                f"| {max(xs):6.2f} | {statistics.fmean(xs):6.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
