"""Fuzz the peer protocol: the decoder (FrameBuffer + Codec) and the engine's message handling.

    python3 bench/fuzz_peers.py --count 1000000 [--seed 1] [--json]

Every generated input is a byte string as it would arrive on ROUTER_PORT: random bytes, valid
frames mutated (bit flips, truncation, extension, length-field lies), re-signed envelopes with
msgpack type confusion, schema violations, huge integers and deep nesting, replays, stale
timestamps, wrong versions, wrong keys, oversized frames, and valid messages. Each is fed to a
fresh `FrameBuffer` in random chunks and every payload it yields is decoded by one long-lived
`Codec` (so replays are seen). An exception other than the `ProtocolError` family is an
*escape*. Every rejection must be counted in `Codec.rejected` exactly once.

Every message the codec accepts is handed to a real `Engine` running inside the simulated
two-node world of `tests/ebpfrouter/enginesim.py` (a test double for processes and sockets),
caught at a random point of a swap, as a message from a third key holder (`node3`) or from the
real peer naming connection ids it does not own. After each action the engine asks for, and
after every batch once the world has settled, the invariants are checked: Freeze, Thaw,
CheckQueues and ReplaceFd name only the pid and fds this daemon traced; the connection table
holds only connections the engine created from its own traced events; once settled nothing is
frozen, nothing is one-sided, no swap is left half done. A broken invariant is a *corruption*.

Exit status 0 only with no escape, no corruption and every rejection counted.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "ebpfrouter"))

import msgpack  # noqa: E402

from ebpfrouter.engine import (  # noqa: E402
    CheckQueues,
    Freeze,
    HostAccepted,
    PeerMessage,
    ReplaceFd,
    Thaw,
)
from ebpfrouter.peers import (  # noqa: E402
    SCHEMAS,
    Codec,
    FrameBuffer,
    ProtocolError,
    ReplayGuard,
)
from ebpfrouter.peers.wire import MAX_FRAME  # noqa: E402

KEY = b"fuzz-shared-key-0123456789abcdef"
WRONG_KEY = b"fuzz-wrong-key--0123456789abcdef"
CID = bytes(range(16))
TUPLE = {"client_addr": "10.244.1.2", "client_port": 40000,
         "server_addr": "10.244.2.2", "server_port": 5201}
SAMPLES: dict[str, dict[str, Any]] = {
    "hello": {"node": "node3", "host_addr": "192.168.77.3"},
    "listener_add": {"overlay_addr": "10.244.2.2", "overlay_port": 5201,
                     "host_addr": "192.168.77.2", "host_port": 41000},
    "listener_remove": {"overlay_addr": "10.244.2.2", "overlay_port": 5201},
    "bind": {"cid": CID, **TUPLE},
    "swap_prepare": {"cid": CID, "attempt": 1, "stage": "check", "migrate_len": 0,
                     **TUPLE},
    "swap_ready": {"cid": CID, "attempt": 1, "stage": "checked", "migrate_len": 4096},
    "swap_commit": {"cid": CID, "attempt": 1},
    "swap_abort": {"cid": CID, "attempt": 1, "reason": "busy", "final": False},
    "swap_done": {"cid": CID, "attempt": 1},
    "conn_closed": {"cid": CID},
    "error": {"code": "bad", "detail": "something"},
}
STRS = ["10.244.1.2", "10.244.2.2", "10.244.3.3", "192.168.77.2", "::1", "freeze", "check",
        "frozen", "checked", "migrate", "replaced", "", "x" * 300, "10.244.2.300", "1.2.3.4\x00",
        "fe80::1%eth0"]
# values of every msgpack type for type confusion (huge ints, floats, nesting, bytes vs str)
CONFUSION: list[Any] = [None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5,
                        float("inf"), float("-inf"), float("nan"), "", "x", b"", b"x" * 16,
                        "0123456789abcdef", [], [1], {}, {"cid": CID}, [[[[]]]],
                        {"a": {"b": {"c": {}}}}, 65536, 1001, 5201.0]
KINDS = ["random", "bitflip", "truncate", "extend", "length_lie", "type_confusion",
         "schema", "huge_int", "deep_nesting", "raw_msgpack", "replay", "stale",
         "wrong_version", "wrong_key", "oversized", "valid"]


def sign(envelope: bytes, key: bytes = KEY) -> bytes:
    """A frame around `envelope` with a correct tag under `key` (no checks)."""
    payload = envelope + hmac.new(key, envelope, hashlib.sha256).digest()
    return struct.pack(">I", len(payload)) + payload


def pack(value: Any) -> bytes:
    """msgpack bytes (bin type for bytes)."""
    return msgpack.packb(value, use_bin_type=True)


class Generator:
    """Makes one hostile (or valid) input per call, tagged with its kind."""

    def __init__(self, rng: random.Random, clock: Any, cids: list[bytes]) -> None:
        self.rng = rng
        self.clock = clock
        self.cids = cids  # connection ids live in the engines (refreshed by the runner)
        self.sent: collections.deque[bytes] = collections.deque(maxlen=256)
        self.encoder = Codec(KEY, clock=clock)
        self.wrong = Codec(WRONG_KEY, clock=clock)

    def body(self, msg_type: str) -> dict[str, Any]:
        """A schema-valid body with random field values."""
        rng = self.rng
        body: dict[str, Any] = {}
        for name, field in SCHEMAS[msg_type].items():
            if name == "cid":
                body[name] = rng.choice(self.cids) if self.cids and rng.random() < 0.6 \
                    else rng.randbytes(16)
            elif field.choices:
                body[name] = rng.choice(field.choices)
            elif field.kind is bool:
                body[name] = rng.random() < 0.5
            elif field.kind is int:
                body[name] = rng.choice([int(field.min or 0), int(field.max or 1),
                                         rng.randint(int(field.min or 0), int(field.max or 1))])
            elif field.ip:
                body[name] = rng.choice(STRS[:5])
            else:
                body[name] = rng.choice(["node1", "node2", "node3", "busy", "x"])
        return body

    def envelope(self, **overrides: Any) -> dict[str, Any]:
        """A valid envelope dict (random type), with overrides."""
        msg_type = self.rng.choice(sorted(SCHEMAS))
        env = {"v": 1, "type": msg_type, "ts": self.clock(), "nonce": self.rng.randbytes(16),
               "body": self.body(msg_type)}
        env.update(overrides)
        return env

    def valid(self) -> bytes:
        """A fresh valid frame."""
        msg_type = self.rng.choice(sorted(SCHEMAS))
        return self.encoder.encode(msg_type, self.body(msg_type), nonce=self.rng.randbytes(16))

    def make(self, kind: str) -> bytes:
        """One input of `kind`."""
        rng = self.rng
        if kind == "random":
            return rng.randbytes(rng.choice([0, 1, 3, 4, 5, 36, rng.randrange(300)]))
        if kind == "valid":
            frame = self.valid()
            self.sent.append(frame)  # sent intact: replaying it must be refused
            return frame
        if kind == "replay":
            return rng.choice(self.sent) if self.sent else self.make("valid")
        frame = bytearray(self.valid() if kind in ("bitflip", "truncate", "extend",
                                                    "length_lie") else b"")
        if kind == "bitflip":
            for bit in rng.sample(range(len(frame) * 8), rng.randint(1, 8)):  # distinct bits
                frame[bit // 8] ^= 1 << (bit % 8)
            return bytes(frame)
        if kind == "truncate":
            return bytes(frame[: rng.randrange(len(frame))])
        if kind == "extend":
            extra = rng.choice([b"\x00", rng.randbytes(rng.randrange(1, 64)), b"\x00\x00\x00",
                                struct.pack(">I", 2**31), self.valid()[:-1]])
            return bytes(frame) + extra
        if kind == "length_lie":
            length = rng.choice([0, 1, 32, 33, len(frame) - 5, len(frame) - 3, len(frame) + 1,
                                 MAX_FRAME, MAX_FRAME + 1, 2**31, 2**32 - 1])
            return struct.pack(">I", length) + bytes(frame[4:])
        if kind == "type_confusion":
            env = self.envelope()
            where = rng.choice(["v", "type", "ts", "nonce", "body", "field", "envelope"])
            value = rng.choice(CONFUSION)
            if where == "field":
                name = rng.choice(sorted(env["body"]))
                env["body"][name] = value
            elif where == "envelope":
                env = value
            else:
                env[where] = value
            return sign(pack(env))
        if kind == "schema":
            env = self.envelope()
            body = env["body"]
            op = rng.randrange(5)
            if op == 0:
                body[rng.choice(["pid", "fd", "extra", "cid", "path"])] = rng.choice(CONFUSION)
            elif op == 1 and body:
                del body[rng.choice(sorted(body))]
            elif op == 2:
                env["type"] = rng.choice(["exec", "freeze", "Hello", "", "bind ", "x" * 100])
            elif op == 3:
                env["body"] = {**body, **{k: rng.choice(STRS) for k in body}}
            else:
                env[rng.choice(["pid", "fd", "sig"])] = 1  # extra envelope key
            return sign(pack(env))
        if kind == "huge_int":
            env = self.envelope()
            value = rng.choice([2**64 - 1, -(2**63), 2**63, 2**32, -1, 10**18])
            target = rng.choice(["v", "ts", "body"])
            if target == "body" and env["body"]:
                env["body"][rng.choice(sorted(env["body"]))] = value
            else:
                env[target] = value
            return sign(pack(env))
        if kind == "deep_nesting":
            depth = rng.choice([64, 512, 1024, 5000, 100_000])
            opener = rng.choice([b"\x91", b"\x81\xa1a"])  # [x] or {"a": x}
            nested = opener * depth + b"\xc0"
            if rng.random() < 0.5:  # the whole envelope, or one body field
                return sign(nested)
            env = pack(self.envelope())
            # envelope maps end with "body": {...}; put the nest where a field's value would be
            return sign(env[:-1] + nested) if len(env) > 1 else sign(nested)
        if kind == "raw_msgpack":
            raw = rng.choice([
                b"\xc1", b"\xd4\x01\x00", b"\xc7\x00\x05", b"\x80", b"\x90",
                b"\xdf\xff\xff\xff\xff",
                b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                b"\x82\x01\x02\x03\x04",  # int keys
                b"\x81\x91\x01\x02",  # array key
                b"\x85" + pack("v") + b"\x01" + pack("v") + b"\x02",  # duplicate, short map
                pack(self.envelope())[:-rng.randint(1, 5)],
                pack([1, "conn_closed", 1.0, b"x" * 16, {}]),
                pack(self.envelope()) + b"\x00",  # trailing data after the envelope
            ])
            return sign(raw)
        if kind == "stale":
            skew = rng.choice([-1e9, -31.0, 31.0, 1e9, float("inf"), float("-inf")])
            msg_type = rng.choice(sorted(SCHEMAS))
            return self.encoder.encode(msg_type, self.body(msg_type), ts=self.clock() + skew)
        if kind == "wrong_version":
            return sign(pack(self.envelope(v=rng.choice([0, 2, 255, -1, 2**32, 1.0, "1", True]))))
        if kind == "wrong_key":
            msg_type = rng.choice(sorted(SCHEMAS))
            return self.wrong.encode(msg_type, self.body(msg_type))
        if kind == "oversized":
            env = self.envelope(type="error", body={"code": "x", "detail": "y" * 200})
            env["body"]["detail"] = "y" * rng.choice([MAX_FRAME, MAX_FRAME * 4])
            frame = sign(pack(env))
            return frame if rng.random() < 0.5 else struct.pack(">I", 100) + frame[4:]
        raise ValueError(f"unknown input kind {kind!r}")


@dataclasses.dataclass
class Report:
    """What a run saw."""

    inputs: int = 0
    frames: int = 0
    accepted: int = 0
    seconds: float = 0.0
    escapes: int = 0
    corruptions: int = 0
    uncounted: int = 0
    engine_messages: int = 0
    host_binds: int = 0
    worlds: int = 0
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_kind: dict[str, collections.Counter[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    examples: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {"inputs": self.inputs, "frames": self.frames, "accepted": self.accepted,
                "seconds": round(self.seconds, 2),
                "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else 0,
                "escapes": self.escapes, "corruptions": self.corruptions,
                "uncounted_rejections": self.uncounted,
                "engine_messages": self.engine_messages, "engine_worlds": self.worlds,
                "host_binds": self.host_binds,
                "rejected": dict(sorted(self.rejected.items())),
                "outcomes_by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
                "examples": self.examples[:10]}


class EngineHarness:
    """A simulated two-node world whose engines receive the fuzzer's accepted messages."""

    def __init__(self, rng: random.Random, report: Report) -> None:
        from enginesim import CLIENT, SERVER, World  # the test double (tests/ebpfrouter)

        self.rng = rng
        self.report = report
        self.client, self.server = CLIENT, SERVER
        self.World = World
        self.world: Any = None
        self.fed = 0
        self.new_world()

    def new_world(self) -> None:
        """A fresh world stopped at a random point of its swaps (and checks the old one)."""
        if self.world is not None:
            self.settle()
        self.report.worlds += 1
        self.world = self.World(n=self.rng.randint(1, 2))
        for _ in range(self.rng.randrange(40)):
            if not self.world.step_default():
                break
        for node, daemon in self.world.daemons.items():
            self._watch(node, daemon)
        self.fed = 0

    def _watch(self, node: str, daemon: Any) -> None:
        engine, world = daemon.engine, self.world
        proc = world.procs[node]
        traced_fds = set(proc.fds)
        handle = engine.handle

        def checked(event: Any) -> list[Any]:
            actions = handle(event)
            for act in actions:
                if isinstance(act, Freeze | Thaw | CheckQueues | ReplaceFd) and act.pid != proc.pid:
                    self.corrupt(f"{node}: {act} names pid {act.pid}, traced {proc.pid}")
                if isinstance(act, CheckQueues | ReplaceFd) and act.fd not in traced_fds:
                    self.corrupt(f"{node}: {act} names untraced fd {act.fd}")
            return actions

        engine.handle = checked

    def corrupt(self, what: str) -> None:
        """Record a broken invariant."""
        self.report.corruptions += 1
        if len(self.report.examples) < 20:
            self.report.examples.append("corruption: " + what)

    def cids(self) -> list[bytes]:
        """Connection ids the engines know (hostile messages aim at these)."""
        return [cid for d in self.world.daemons.values() for cid in d.engine.conns]

    def feed(self, msg: Any) -> None:
        """Deliver one accepted message to one engine, as node3 or as the real peer."""
        world, rng = self.world, self.rng
        node = rng.choice([self.client, self.server])
        own = set(self.cids())
        cid = msg.body.get("cid")
        if rng.random() < 0.5 or (cid is not None and cid in own):
            sender = "node3"  # another key holder, or someone replaying a hello's name
        else:
            sender = self.client if node == self.server else self.server
        try:
            world.feed(node, PeerMessage(sender, msg.type, dict(msg.body)))
        except AssertionError as exc:  # enginesim.Violation: impossible action
            self.corrupt(f"{node} <- {sender} {msg.type}: {exc}")
        for daemon in world.daemons.values():
            unknown = [c for c in daemon.engine.conns if c not in self.made_cids()]
            if unknown:
                self.corrupt(f"{daemon.node}: connections from a peer message: {unknown}")
        if msg.type == "bind":
            self.host_bind(msg.body)
        self.report.engine_messages += 1
        self.fed += 1
        if self.fed >= 200:
            self.new_world()

    def host_bind(self, bind: dict[str, Any]) -> None:
        """The same bind arriving on the server's host listener from a third node: refused,
        its socket released, no connection created."""
        from enginesim import Sock

        world = self.world
        daemon = world.daemons[self.server]
        listener = next((r for r, k in daemon.handles.items() if k.kind == "listener"), -1)
        sock = Sock("host", self.server, next(world.inodes), -1)
        ref = world._hold(self.server, sock)
        before = set(daemon.engine.conns)
        try:
            world.feed(self.server, HostAccepted(listener, ref, sock.inode, "node3", dict(bind)))
        except AssertionError as exc:
            self.corrupt(f"bind from node3: {exc}")
        if set(daemon.engine.conns) != before:
            self.corrupt(f"bind from node3 created a connection: {bind}")
        if ref in daemon.handles:
            self.corrupt("bind from node3: its host socket was kept")
        self.report.host_binds += 1

    def made_cids(self) -> set[bytes]:
        """Connection ids the client engine generated (the world's id sequence)."""
        n = self.world.n
        return {bytes([i]) * 16 for i in range(1, 64 * n + 1)}

    def settle(self) -> None:
        """Run the world to quiescence and check its final invariants."""
        try:
            self.world.drain()
            self.world.check_final()
        except AssertionError as exc:
            self.corrupt(f"after settling: {exc}")


def run(count: int, seed: int = 1, engine: bool = True, progress: bool = False) -> Report:
    """Generate and check `count` inputs; see the module docstring."""
    rng = random.Random(seed)
    logging.disable(logging.WARNING)  # the engine logs every hostile message it ignores
    now = [1_700_000_000.0]

    def clock() -> float:
        return now[0]

    report = Report()
    codec = Codec(KEY, replay=ReplayGuard(window=30.0, capacity=4096, clock=clock), clock=clock)
    harness = EngineHarness(rng, report) if engine else None
    gen = Generator(rng, clock, harness.cids() if harness else [CID])
    weights = {k: 1 for k in KINDS}
    weights["valid"] = 3
    kinds = [k for k, w in weights.items() for _ in range(w)]
    start = time.monotonic()
    for i in range(count):
        now[0] += 0.001
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        if harness is not None and i % 64 == 0:
            gen.cids = harness.cids() or [CID]
        try:
            data = gen.make(kind)
        except (ValueError, OverflowError, TypeError) as exc:  # the generator itself
            raise RuntimeError(f"generator {kind}: {exc}") from exc
        report.inputs += 1
        outcome = _one(codec, data, rng, report, kind, harness)
        report.by_kind[kind][outcome] += 1
        if progress and i and i % 100_000 == 0:
            rate = i / (time.monotonic() - start)
            print(f"  {i:>9,} inputs, {rate:,.0f}/s, escapes {report.escapes}", file=sys.stderr)
    if harness is not None:
        harness.settle()
    report.seconds = time.monotonic() - start
    report.accepted = codec.accepted
    report.rejected = collections.Counter(codec.rejected)
    return report


def _one(codec: Codec, data: bytes, rng: random.Random, report: Report, kind: str,
         harness: EngineHarness | None) -> str:
    """Feed one input; return its outcome (accepted, a rejection reason, or escape)."""
    buf = FrameBuffer(codec)
    cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 3))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    outcome = "incomplete"
    try:
        for piece in pieces:
            for payload in buf.feed(piece):
                report.frames += 1
                before = sum(codec.rejected.values())
                try:
                    msg = codec.decode_payload(payload)
                except ProtocolError as exc:
                    if sum(codec.rejected.values()) != before + 1:
                        report.uncounted += 1
                    outcome = exc.counter
                    continue
                outcome = "accepted"
                if harness is not None:
                    harness.feed(msg)
    except ProtocolError as exc:  # a bad header closes the stream
        outcome = exc.counter
    except Exception as exc:  # noqa: BLE001 - the point: nothing else may escape
        report.escapes += 1
        if len(report.examples) < 20:
            report.examples.append(f"escape {kind}: {type(exc).__name__}: {exc!s:.200} "
                                   f"input={data[:80].hex()}")
        return "escape"
    if buf.pending and outcome == "incomplete":
        outcome = "incomplete"  # the transport counts this as truncated when the stream ends
    return outcome


def atheris_main(runs: int) -> int:
    """Coverage-guided fuzzing of the decoder with atheris (optional dependency).

    The first input byte picks the path: raw stream bytes, or the rest signed with the right
    key (so the mutator explores the msgpack envelope and schemas behind the tag).
    """
    import atheris  # noqa: PLC0415 - optional

    from ebpfrouter.peers import messages, wire  # noqa: PLC0415

    for owner, name in ((wire.Codec, "_decode"), (wire.Codec, "frame_length"),
                        (wire.FrameBuffer, "feed"), (wire.ReplayGuard, "check"),
                        (messages.Field, "check")):
        setattr(owner, name, atheris.instrument_func(getattr(owner, name)))
    messages.check_body = atheris.instrument_func(messages.check_body)
    wire.check_body = messages.check_body
    logging.disable(logging.WARNING)
    codec = Codec(KEY, replay=ReplayGuard(window=1e12, capacity=1 << 16))

    seeds = tempfile.mkdtemp(prefix="fuzz_peers_seeds.")
    calls = [0]

    def one(data: bytes) -> None:
        calls[0] += 1
        if calls[0] == len(SAMPLES) + 1:  # libFuzzer has read the seeds; atheris never returns
            shutil.rmtree(seeds, ignore_errors=True)
        if not data:
            return
        body = data[1:] if data[0] & 1 else sign(data[1:])
        try:
            for payload in FrameBuffer(codec).feed(body):
                codec.decode_payload(payload)
        except ProtocolError:
            pass

    paths = []
    for msg_type, body in SAMPLES.items():
        paths.append(os.path.join(seeds, msg_type))
        with open(paths[-1], "wb") as f:
            f.write(b"\x00" + Codec(KEY).encode(msg_type, body)[4:-32])
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-seed_inputs=" + ",".join(paths)], one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-engine", action="store_true", help="decoder only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--atheris", action="store_true",
                        help="coverage-guided decoder fuzzing instead (pip install atheris)")
    args = parser.parse_args(argv)
    if args.atheris:
        return atheris_main(args.count)
    report = run(args.count, args.seed, engine=not args.no_engine, progress=not args.json)
    out = report.as_dict()
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"inputs {out['inputs']:,}  frames {out['frames']:,}  accepted {out['accepted']:,}"
              f"  in {out['seconds']}s = {out['inputs_per_s']:,} inputs/s")
        print(f"engine: {out['engine_messages']:,} messages into {out['engine_worlds']:,} "
              f"simulated worlds, {out['host_binds']:,} binds on host listeners")
        print("rejected by reason:")
        for reason, n in out["rejected"].items():
            print(f"  {reason:<14} {n:>10,}")
        print("outcome by input kind:")
        for kind, outcomes in out["outcomes_by_kind"].items():
            print(f"  {kind:<15} " + ", ".join(f"{k} {v:,}" for k, v in
                                                sorted(outcomes.items())))
        print(f"escapes {out['escapes']}  corruptions {out['corruptions']}  "
              f"uncounted rejections {out['uncounted_rejections']}")
        for line in out["examples"]:
            print("  " + line)
    ok = report.escapes == 0 and report.corruptions == 0 and report.uncounted == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
