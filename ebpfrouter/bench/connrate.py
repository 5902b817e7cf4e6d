"""Connection-setup load generator of this project (not a third-party tool): short TCP
connections, one after another, each `connect` + 1-byte request + 1-byte reply + close.

    python3 -m ebpfrouter.bench.connrate serve PORT
    python3 -m ebpfrouter.bench.connrate client HOST PORT SECONDS

The client prints one JSON object: connections, errors, rate (per second), latency p50/p99 (µs).
The server closes first, so TIME_WAIT stays on the server and the client never runs out of ports.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any


def serve(port: int) -> None:
    """Accept forever: read one byte, answer one byte, close."""
    with socket.socket() as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(("0.0.0.0", port))
        lsock.listen(512)
        print("listening", flush=True)
        while True:
            conn, _ = lsock.accept()
            with conn:
                try:
                    if conn.recv(1):
                        conn.sendall(b"y")
                except OSError:
                    pass


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def client(host: str, port: int, seconds: float) -> dict[str, Any]:
    """Open short connections for `seconds`; count errors; time each from connect to close."""
    lat: list[float] = []
    errors, first_error = 0, ""
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"x")
                reply = b""
                while True:
                    data = sock.recv(16)
                    if not data:
                        break
                    reply += data
            if reply != b"y":
                raise OSError(f"bad reply {reply!r}")
            lat.append((time.perf_counter() - t0) * 1e6)
        except OSError as exc:
            errors += 1
            first_error = first_error or str(exc)
    elapsed = time.monotonic() - start
    return {"connections": len(lat), "errors": errors, "first_error": first_error,
            "seconds": elapsed, "per_second": len(lat) / elapsed if elapsed else 0.0,
            "p50_us": _pct(lat, 0.5), "p99_us": _pct(lat, 0.99)}


def main(argv: Sequence[str] | None = None) -> int:
    """`serve PORT` or `client HOST PORT SECONDS`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"] and len(args) == 2:
        serve(int(args[1]))
        return 0
    if args[:1] == ["client"] and len(args) == 4:
        print(json.dumps(client(args[1], int(args[2]), float(args[3]))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
