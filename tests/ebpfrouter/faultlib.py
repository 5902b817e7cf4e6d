"""Helpers for the fault-injection tests and the soak: checked streams and a peer-message watch.

Run as a script inside a pod (stdlib only, so it needs no PYTHONPATH):

    faultlib.py serve PORT                  accept forever; verify each stream byte by byte
    faultlib.py send HOST PORT --conns N    N patterned streams until --stop-file exists
    faultlib.py short HOST PORT --seconds S short connections as fast as they go

A stream carries a fixed pattern (byte i of a connection is `PATTERN[i % PERIOD]`); the
receiver compares every byte with it, counts them, and on EOF answers `<total> ok` or
`<total> bad@<offset>`. The sender compares the answer with what it sent. Nothing about the
path (overlay or host network) is assumed: the stream must arrive intact either way.

Imported by the tests, `PeerWatch` sniffs the daemons' peer messages on a node's underlay
device (AF_PACKET with a classic BPF filter for TCP port ROUTER_PORT) and runs a callback the
moment a chosen swap message is seen: that is how a fault is timed to a step of the two-phase
swap from outside the daemons.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERIOD = 65521  # prime: a shifted or repeated chunk never lines up with the pattern again
CHUNK = 16384


def _pattern() -> bytes:
    out, seed = bytearray(), b"ebpf-router fault stream"
    while len(out) < PERIOD:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:PERIOD])


PATTERN = _pattern()
_DOUBLE = PATTERN + PATTERN


def expected(offset: int, size: int) -> bytes:
    """The pattern bytes at stream offset `offset` (size <= PERIOD)."""
    start = offset % PERIOD
    return _DOUBLE[start:start + size]


# -- the receiving side --------------------------------------------------------------------------


def verify_stream(conn: socket.socket) -> dict[str, Any]:
    """Read to EOF comparing every byte with the pattern; answer the sender; return the tally."""
    total, bad = 0, -1
    error = None
    try:
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            if bad < 0 and data != expected(total, len(data)):
                want = expected(total, len(data))
                bad = total + next(i for i in range(len(data)) if data[i] != want[i])
            total += len(data)
        conn.sendall(f"{total} {'ok' if bad < 0 else f'bad@{bad}'}\n".encode())
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror or exc}"
    return {"received": total, "bad_at": bad, "error": error}


def serve(port: int) -> None:
    """Accept forever; one thread per connection; one JSON line per finished connection."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(1024)
    print("listening", flush=True)
    lock = threading.Lock()

    def handle(conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            tally = verify_stream(conn)
        tally["peer"] = f"{peer[0]}:{peer[1]}"
        with lock:
            print(json.dumps(tally), flush=True)

    while True:
        conn, peer = lsock.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


# -- the sending side ----------------------------------------------------------------------------


def send_one(sock: socket.socket, stop: Callable[[], bool], rate: float) -> dict[str, Any]:
    """Send the pattern until `stop()`, half-close, read and check the receiver's answer."""
    sent, error, reply = 0, None, ""
    start = time.monotonic()
    try:
        while not stop():
            size = CHUNK - sent % 7  # uneven chunks: every offset gets exercised
            sock.sendall(expected(sent, size))
            sent += size
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(60)
        buf = b""
        while not buf.endswith(b"\n"):
            data = sock.recv(256)
            if not data:
                break
            buf += data
        reply = buf.decode(errors="replace").strip()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc.strerror or exc}"
    fields = reply.split()
    received = int(fields[0]) if fields and fields[0].isdigit() else -1
    verdict = fields[1] if len(fields) > 1 else ""
    return {"sent": sent, "received": received, "verdict": verdict, "error": error,
            "ok": error is None and received == sent and verdict == "ok"}


def send(host: str, port: int, conns: int, seconds: float, stop_file: str | None,
         rate: float, close_first: int = 0) -> list[dict[str, Any]]:
    """`conns` streams from one process, each in its own thread; their results in order.

    `close_first`: that many connections are opened and closed at once before the streams
    (closed between the router's connect event and its swap; their fd numbers get reused).
    """
    for _ in range(close_first):
        socket.create_connection((host, port), timeout=30).close()
    deadline = time.monotonic() + seconds
    socks = [socket.create_connection((host, port), timeout=30) for _ in range(conns)]
    print(json.dumps({"connected": conns, "fds": [s.fileno() for s in socks]}), flush=True)

    def stop() -> bool:
        return time.monotonic() > deadline or bool(stop_file and os.path.exists(stop_file))

    results: list[dict[str, Any]] = [{} for _ in socks]

    def run(i: int) -> None:
        with socks[i]:
            results[i] = send_one(socks[i], stop, rate)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def short(host: str, port: int, seconds: float, size: int = 200) -> dict[str, Any]:
    """Short connections back to back: connect, send `size` bytes, half-close, check, close."""
    ok, errors, last = 0, 0, ""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                good = _short_one(sock, size)
            if good:
                ok += 1
            else:
                errors += 1
        except OSError as exc:
            errors += 1
            last = f"{type(exc).__name__}: {exc.strerror or exc}"
    elapsed = time.monotonic() - start
    return {"ok": ok, "errors": errors, "seconds": elapsed, "last_error": last}


def _short_one(sock: socket.socket, size: int) -> bool:
    sock.sendall(expected(0, size))
    sock.shutdown(socket.SHUT_WR)
    buf = b""
    while not buf.endswith(b"\n"):
        data = sock.recv(64)
        if not data:
            break
        buf += data
    return buf == f"{size} ok\n".encode()


# -- watching the peer protocol from outside -----------------------------------------------------

ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26


def _tcp_port_filter(port: int) -> list[tuple[int, int, int, int]]:
    """Classic BPF: IPv4, TCP, first fragment, source or destination port `port`."""
    return [
        (0x28, 0, 0, 12),        # ldh [12]            ethertype
        (0x15, 0, 10, 0x0800),   # jne IPv4 -> drop
        (0x30, 0, 0, 23),        # ldb [23]            protocol
        (0x15, 0, 8, 6),         # jne TCP -> drop
        (0x28, 0, 0, 20),        # ldh [20]            fragment offset
        (0x45, 6, 0, 0x1FFF),    # jset -> drop
        (0xB1, 0, 0, 14),        # ldxb 4*([14]&0xf)   IP header length
        (0x48, 0, 0, 14),        # ldh [x+14]          source port
        (0x15, 2, 0, port),      # jeq -> accept
        (0x48, 0, 0, 16),        # ldh [x+16]          destination port
        (0x15, 0, 1, port),      # jeq -> accept else drop
        (0x06, 0, 0, 0x40000),   # accept
        (0x06, 0, 0, 0),         # drop
    ]


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """SO_ATTACH_FILTER with a classic BPF program."""
    raw = b"".join(struct.pack("HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@dataclass
class PeerMsg:
    """One peer message seen on the wire."""

    t: float
    src: str
    dst: str
    type: str
    stage: str | None
    attempt: int | None
    cid: bytes | None

    @property
    def step(self) -> str:
        """`prepare/check`, `ready/replaced`, `commit`, `done`, ... (type, then stage)."""
        name = self.type.removeprefix("swap_")
        return f"{name}/{self.stage}" if self.stage else name


@dataclass
class _Flow:
    next_seq: int | None = None
    buf: bytearray = field(default_factory=bytearray)


class PeerWatch:
    """Sniff peer frames on `ifname` inside netns `netns`; `arm()` a callback on a step."""

    def __init__(self, netns: str, ifname: str = "eth0", port: int = 1234) -> None:
        from ebpfrouter.testbed import netns_context

        with netns_context(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        attach_filter(self.sock, _tcp_port_filter(port))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.1)
        self.port = port
        self.messages: list[PeerMsg] = []
        self.flows: dict[tuple[str, int, str, int], _Flow] = {}
        self.lock = threading.Condition()
        self._armed: list[tuple[Callable[[PeerMsg], bool], Callable[[PeerMsg], None]]] = []
        self.fired: list[PeerMsg] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="peerwatch", daemon=True)
        self.thread.start()

    def arm(self, when: Callable[[PeerMsg], bool], action: Callable[[PeerMsg], None]) -> None:
        """Run `action(msg)` on the sniffer thread for the first message matching `when`."""
        with self.lock:
            self._armed.append((when, action))

    def disarm(self) -> None:
        """Drop every armed action that has not fired."""
        with self.lock:
            self._armed.clear()

    def wait(self, when: Callable[[PeerMsg], bool], timeout: float) -> PeerMsg | None:
        """The first message (seen so far or arriving within `timeout`) matching `when`."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                for msg in self.messages:
                    if when(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def steps(self) -> list[str]:
        """Every swap message seen, as `step` names."""
        with self.lock:
            return [m.step for m in self.messages if m.type.startswith("swap_")]

    def close(self) -> None:
        """Stop the sniffer thread and close the socket."""
        self._stop = True
        self.thread.join(2)
        self.sock.close()

    def _run(self) -> None:
        while not self._stop:
            try:
                frame = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError as exc:
                if exc.errno == errno.ENETDOWN and not self._stop:  # the link was cut: wait
                    time.sleep(0.01)
                    continue
                return
            with contextlib.suppress(Exception):
                self._packet(frame)

    def _packet(self, frame: bytes) -> None:
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            return
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
        tcp = 14 + ihl
        sport, dport, seq = struct.unpack_from(">HHI", frame, tcp)
        flags = frame[tcp + 13]
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4:14 + total]
        key = (src, sport, dst, dport)
        flow = self.flows.setdefault(key, _Flow())
        if flags & 0x02:  # SYN: a new connection
            self.flows[key] = flow = _Flow(next_seq=(seq + 1) & 0xFFFFFFFF)
            return
        if not payload:
            return
        if flow.next_seq is None:
            flow.next_seq = seq  # first seen mid-stream: assume a frame starts here
        delta = (seq - flow.next_seq) & 0xFFFFFFFF
        if delta >= 0x80000000:  # a retransmission overlapping what we have
            skip = (flow.next_seq - seq) & 0xFFFFFFFF
            if skip >= len(payload):
                return
            payload, seq = payload[skip:], flow.next_seq
        elif delta:
            flow.buf.clear()  # a gap (a missed packet): resynchronise at this segment
        flow.buf += payload
        flow.next_seq = (seq + len(payload)) & 0xFFFFFFFF
        self._frames(flow, src, dst)

    def _frames(self, flow: _Flow, src: str, dst: str) -> None:
        import msgpack

        while len(flow.buf) >= 4:
            (length,) = struct.unpack_from(">I", flow.buf, 0)
            if length > 1 << 20:
                flow.buf.clear()
                return
            if len(flow.buf) < 4 + length:
                return
            payload = bytes(flow.buf[4:4 + length])
            del flow.buf[:4 + length]
            with contextlib.suppress(Exception):
                env = msgpack.unpackb(payload[:-32], raw=False)  # tag not checked: we only look
                body = env.get("body") or {}
                msg = PeerMsg(time.monotonic(), src, dst, str(env.get("type")),
                              body.get("stage"), body.get("attempt"), body.get("cid"))
                self._seen(msg)

    def _seen(self, msg: PeerMsg) -> None:
        with self.lock:
            self.messages.append(msg)
            for entry in list(self._armed):
                when, action = entry
                if when(msg):
                    self._armed.remove(entry)
                    self.fired.append(msg)
                    action(msg)
            self.lock.notify_all()


# -- process state -------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (None if the process is gone or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat[stat.rindex(")") + 2]
    return None if state in "ZX" else state


def tracer_of(pid: int) -> int:
    """TracerPid of `pid` (0: nobody ptraces it, or it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next(x for x in status.splitlines() if x.startswith("TracerPid:"))
    return int(line.split()[1])


def stopped(pid: int) -> bool:
    """True if `pid` is left in a stop (`t` traced or `T` stopped) with nobody to wake it."""
    state = proc_state(pid)
    return state is not None and state in "tT" and tracer_of(pid) == 0


def stuck(pid: int, seconds: float = 3.0) -> bool:
    """True if `pid` stays in a stop (`t`/`T`) for `seconds` (frozen by a live daemon, or
    left stopped by a dead one); a swap in progress freezes for milliseconds, not seconds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = proc_state(pid)
        if state is None or state not in "tT":
            return False
        time.sleep(0.05)
    return True


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (0 if gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0 kB")
    return int(line.split()[1])


# -- script entry --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`serve`, `send` or `short` (run inside a pod)."""
    parser = argparse.ArgumentParser(prog="faultlib.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("port", type=int)
    p = sub.add_parser("send")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--stop-file")
    p.add_argument("--rate", type=float, default=0.0, help="bytes/s per connection (0: no cap)")
    p.add_argument("--close-first", type=int, default=0)
    p = sub.add_parser("short")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port)
        return 0
    if args.cmd == "send":
        results = send(args.host, args.port, args.conns, args.seconds, args.stop_file, args.rate,
                       args.close_first)
        print(json.dumps({"results": results}), flush=True)
        return 0 if all(r["ok"] for r in results) else 1
    print(json.dumps(short(args.host, args.port, args.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
