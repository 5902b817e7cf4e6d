"""Small servers and clients run inside testbed pods by `realservers.py` (stdlib only, so any
Python 3.11 a non-root user may execute can run it; nothing here imports the project).

Every server speaks the demo's checked stream protocol: the client sends numbered chunks of a
fixed pseudo-random block, half-closes, and the server answers `bytes sha256\\n` over all it
received. The client compares that with what it sent: every byte, in order.

    serve HOST PORT                 one thread per connection
    fork-serve HOST PORT            accept, fork; the parent closes its copy at once, the child
                                    serves (PostgreSQL's postmaster does the same)
    prefork-serve HOST PORT N       listen, fork N workers that each accept on the inherited
                                    listener (one thread per connection)
    send HOST PORT STOP_FILE [--seconds S] [--mbps R] [--fork]
                                    send until STOP_FILE exists (or S seconds), paced at R
                                    Mbit/s (0: as fast as it goes); with --fork: connect, fork,
                                    the parent closes its copy, the child does the traffic
    http-get HOST PORT PATH SIZE SHA256 SECONDS
                                    GET PATH again and again on one keep-alive connection,
                                    checking status, length and SHA-256 of every response

Servers print one line once they listen (the prefork server lists its workers' pids); clients
print one JSON object (the forking client first prints `{"forked": PID}`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

CHUNK = 64 * 1024


def block() -> bytes:
    """The fixed pseudo-random block every chunk carries (the same on both ends)."""
    out = bytearray()
    seed = b"ebpf-router real servers"
    while len(out) < CHUNK - 8:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[: CHUNK - 8])


def serve_one(conn: socket.socket) -> None:
    """Hash everything the client sends until it half-closes; answer `bytes digest\\n`."""
    with conn:
        digest, total = hashlib.sha256(), 0
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            total += len(data)
        conn.sendall(f"{total} {digest.hexdigest()}\n".encode())


def listener(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), backlog=128)


def serve(host: str, port: int) -> None:
    with listener(host, port) as lsock:
        print(f"listening uid={os.getuid()}", flush=True)
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


def fork_serve(host: str, port: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    with listener(host, port) as lsock:
        print(f"listening uid={os.getuid()}", flush=True)
        while True:
            conn, _ = lsock.accept()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    lsock.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    serve_one(conn)
                    code = 0
                finally:
                    os._exit(code)
            conn.close()  # the parent's copy goes at once, as a postmaster's does


def prefork_serve(host: str, port: int, workers: int) -> None:
    lsock = listener(host, port)
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    conn, _ = lsock.accept()
                    threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
            finally:
                os._exit(1)
        pids.append(pid)
    lsock.close()  # only the workers accept
    print(f"listening uid={os.getuid()} workers={','.join(map(str, pids))}", flush=True)
    while pids:
        pid, _ = os.wait()
        pids = [p for p in pids if p != pid]


def _stream(sock: socket.socket, stop_file: str, seconds: float, mbps: float) -> dict[str, Any]:
    payload = block()
    digest, total, n = hashlib.sha256(), 0, 0
    start = time.monotonic()
    deadline = start + seconds
    per_chunk = CHUNK * 8 / (mbps * 1e6) if mbps > 0 else 0.0
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        for _ in range(16):
            chunk = n.to_bytes(8, "little") + payload
            sock.sendall(chunk)
            digest.update(chunk)
            total += len(chunk)
            n += 1
            if per_chunk:
                ahead = start + n * per_chunk - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
    elapsed = time.monotonic() - start
    peer = sock.getpeername()[:2]
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while not reply.endswith(b"\n"):
        data = sock.recv(256)
        if not data:
            break
        reply += data
    fields = reply.decode(errors="replace").split()
    got_bytes = int(fields[0]) if fields and fields[0].isdigit() else -1
    got_digest = fields[1] if len(fields) > 1 else ""
    return {"pid": os.getpid(), "sent_bytes": total, "received_bytes": got_bytes,
            "sent_sha256": digest.hexdigest(), "received_sha256": got_digest,
            "seconds": elapsed, "bps": total * 8 / elapsed if elapsed > 0 else 0.0,
            "app_peer": list(peer), "ok": got_bytes == total and got_digest == digest.hexdigest()}


def send(host: str, port: int, stop_file: str, seconds: float, mbps: float, fork: bool) -> int:
    sock = socket.create_connection((host, port), timeout=60)
    if not fork:
        with sock:
            result = _stream(sock, stop_file, seconds, mbps)
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(go_w)
            os.read(go_r, 1)  # the parent has closed its copy
            with sock:
                result = _stream(sock, stop_file, seconds, mbps)
            print(json.dumps(result), flush=True)
            code = 0 if result["ok"] else 1
        finally:
            os._exit(code)
    os.close(go_r)
    print(json.dumps({"forked": pid}), flush=True)
    sock.close()  # the parent's copy goes before the child sends anything
    os.write(go_w, b"g")
    os.close(go_w)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def http_get(host: str, port: int, path: str, size: int, sha256: str, seconds: float) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    requests = bad = 0
    sockets: set[int] = set()
    first_bad = ""
    peer: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert conn.sock is not None
        sockets.add(id(conn.sock))
        peer = list(conn.sock.getpeername()[:2])
        requests += 1
        if resp.status != 200 or len(body) != size or hashlib.sha256(body).hexdigest() != sha256:
            bad += 1
            first_bad = first_bad or f"status {resp.status}, {len(body)} bytes"
    conn.close()
    print(json.dumps({"requests": requests, "bad": bad, "first_bad": first_bad,
                      "connections": len(sockets), "app_peer": peer}), flush=True)
    return 0 if requests and not bad else 1


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        serve(args[0], int(args[1]))
    elif cmd == "fork-serve":
        fork_serve(args[0], int(args[1]))
    elif cmd == "prefork-serve":
        prefork_serve(args[0], int(args[1]), int(args[2]))
    elif cmd == "send":
        opts = {"--seconds": "3600", "--mbps": "0"}
        rest = list(args[3:])
        fork = "--fork" in rest
        rest = [a for a in rest if a != "--fork"]
        for key, value in zip(rest[::2], rest[1::2], strict=True):
            opts[key] = value
        return send(args[0], int(args[1]), args[2], float(opts["--seconds"]),
                    float(opts["--mbps"]), fork)
    elif cmd == "http-get":
        return http_get(args[0], int(args[1]), args[2], int(args[3]), args[4], float(args[5]))
    else:
        print(f"unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
