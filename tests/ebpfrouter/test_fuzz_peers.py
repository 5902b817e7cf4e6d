"""Peer protocol hardening: the fuzz harness (bench/fuzz_peers.py) on a bounded budget, the
rejection classes it must sort inputs into, and properties the existing peer tests leave out
(tag before parse, stream resynchronisation, hostile messages against engines mid-swap,
transport-level rejections of stale, wrong-version and schema-violating frames).

The million-input run is `python3 bench/fuzz_peers.py --count 1000000`.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import struct
import sys
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebpfrouter.engine import Action, Engine, EngineConfig, Event, Freeze, PeerMessage
from ebpfrouter.peers import (
    SCHEMAS,
    AuthError,
    Codec,
    FrameBuffer,
    ProtocolError,
    ReplayGuard,
)
from ebpfrouter.peers import wire as wire_module
from ebpfrouter.peers.transport import PeerClient, PeerServer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from enginesim import CLIENT, SERVER, World  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "fuzz_peers", os.path.join(HERE, "..", "..", "bench", "fuzz_peers.py"))
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_peers"] = fuzz
_spec.loader.exec_module(fuzz)

KEY = fuzz.KEY
CID = fuzz.CID
EXAMPLES = int(os.environ.get("PEERS_FUZZ_EXAMPLES", "150"))
RUN = int(os.environ.get("FUZZ_HARNESS_INPUTS", "12000"))


# -- the harness, bounded --------------------------------------------------------------------


@pytest.fixture(scope="module")
def report() -> object:
    return fuzz.run(RUN, seed=2)


def test_harness_run_has_no_escape_no_corruption_every_rejection_counted(report) -> None:
    assert report.inputs == RUN
    assert report.escapes == 0, report.examples
    assert report.corruptions == 0, report.examples
    assert report.uncounted == 0
    assert report.engine_messages == report.accepted > RUN // 10  # engines really got fed
    assert report.host_binds > 50  # and host listeners got binds from a third node
    assert sum(report.rejected.values()) + report.accepted <= report.frames + RUN


@pytest.mark.parametrize(("kind", "expected"), [
    ("valid", {"accepted"}),
    ("wrong_key", {"bad_auth"}),
    ("wrong_version", {"bad_version"}),
    ("stale", {"replayed"}),
    ("oversized", {"oversized", "bad_auth", "incomplete", "truncated"}),
    ("truncate", {"incomplete"}),
    ("raw_msgpack", {"malformed"}),
    ("random", {"oversized", "truncated", "incomplete", "bad_auth"}),
])
def test_each_kind_rejected_for_its_reason(report, kind: str, expected: set[str]) -> None:
    outcomes = report.by_kind[kind]
    assert sum(outcomes.values()) > 50
    assert set(outcomes) <= expected, outcomes


def test_replays_rejected_except_the_very_first(report) -> None:
    outcomes = report.by_kind["replay"]
    assert outcomes["replayed"] > 50 and outcomes.get("accepted", 0) <= 1, outcomes


def test_nothing_hostile_is_accepted_unless_validly_signed(report) -> None:
    for kind in ("bitflip", "truncate", "length_lie", "random", "wrong_key", "stale",
                 "wrong_version", "deep_nesting", "raw_msgpack", "huge_int", "oversized"):
        assert report.by_kind[kind].get("accepted", 0) == 0, (kind, report.by_kind[kind])


def test_harness_sees_an_escape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: a decoder leaking a KeyError is caught and reported."""
    real = Codec._decode

    def leaky(self: Codec, payload: bytes) -> object:
        if payload[:1] == b"\x85":
            raise KeyError("leaked")
        return real(self, payload)

    monkeypatch.setattr(Codec, "_decode", leaky)
    rep = fuzz.run(800, seed=3, engine=False)
    assert rep.escapes > 0 and "KeyError" in rep.examples[0]


def test_harness_sees_a_corruption(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness can fail: an engine freezing a pid named by nobody is reported."""
    real = Engine.handle

    def rogue(self: Engine, ev: Event) -> list[Action]:
        out = real(self, ev)
        if isinstance(ev, PeerMessage) and ev.type == "error":
            out.append(Freeze(999_999, 4242))
        return out

    monkeypatch.setattr(Engine, "handle", rogue)
    rep = fuzz.run(1500, seed=4)
    assert rep.corruptions > 0 and "4242" in rep.examples[0]


# -- decoder properties ----------------------------------------------------------------------


def test_tag_is_checked_before_msgpack_sees_a_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unauthenticated bytes never reach the parser: no tag, zero tag, tag of another key."""
    codec = Codec(KEY)
    frame = codec.encode("conn_closed", {"cid": CID})
    envelope = frame[4:-32]
    calls = []
    monkeypatch.setattr(wire_module.msgpack, "unpackb",
                        lambda *a, **k: calls.append(a) or msgpack.unpackb(*a, **k))
    for bad in (fuzz.sign(envelope, b"k" * 32), struct.pack(">I", len(envelope) + 32)
                + envelope + bytes(32), struct.pack(">I", len(envelope)) + envelope):
        with pytest.raises(AuthError):
            codec.decode_frame(bad)
    assert calls == [] and codec.rejected["bad_auth"] == 3


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.sampled_from(sorted(SCHEMAS)), min_size=1, max_size=6),
       st.lists(st.integers(1, 60), max_size=20))
def test_any_chunking_yields_the_same_messages(types: list[str], cuts: list[int]) -> None:
    codec = Codec(KEY)
    stream = b"".join(codec.encode(t, fuzz.SAMPLES[t]) for t in types)
    buf, got, pos = FrameBuffer(codec), [], 0
    for step in [*cuts, len(stream)]:
        got += buf.feed(stream[pos : pos + step])
        pos += step
    got += buf.feed(stream[pos:])
    assert [codec.decode_payload(p).type for p in got] == types and buf.pending == 0


nested = st.recursive(st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=17)
                      | st.text(max_size=5) | st.none() | st.booleans(),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                         c, max_size=3),
                      max_leaves=30)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(sorted(SCHEMAS)), st.data())
def test_one_field_of_any_type_never_escapes(msg_type: str, data: st.DataObject) -> None:
    """Every field of every message, replaced by any msgpack value: accepted only if it still
    fits the schema, otherwise a counted ProtocolError."""
    body = dict(fuzz.SAMPLES[msg_type])
    name = data.draw(st.sampled_from(sorted(body)))
    body[name] = data.draw(nested)
    codec = Codec(KEY)
    frame = fuzz.sign(fuzz.pack({"v": 1, "type": msg_type, "ts": time.time(),
                                 "nonce": os.urandom(16), "body": body}))
    try:
        msg = codec.decode_frame(frame)
    except ProtocolError:
        assert sum(codec.rejected.values()) == 1
        return
    assert msg.body == body
    codec.encode(msg.type, msg.body)  # accepted means the sender's check passes too


@pytest.mark.parametrize("depth", [100, 1000, 100_000])
def test_deep_nesting_is_malformed_not_a_crash(depth: int) -> None:
    codec = Codec(KEY, max_frame=1 << 20)
    with pytest.raises(ProtocolError):
        codec.decode_frame(fuzz.sign(b"\x91" * depth + b"\xc0"))


def test_replay_window_is_enforced_at_both_edges() -> None:
    now = [5000.0]
    codec = Codec(KEY, replay=ReplayGuard(window=30, clock=lambda: now[0]), clock=lambda: now[0])
    for ts, ok in ((now[0] - 30, True), (now[0] + 30, True), (now[0] - 30.001, False),
                   (now[0] + 30.001, False), (float("inf"), False), (float("-inf"), False)):
        frame = codec.encode("conn_closed", {"cid": CID}, ts=ts)
        if ok:
            codec.decode_frame(frame)
        else:
            with pytest.raises(ProtocolError):
                codec.decode_frame(frame)
    assert codec.rejected == {"replayed": 4}


# -- engines under hostile messages ------------------------------------------------------------


def _body(msg_type: str, data: st.DataObject, cids: list[bytes]) -> dict:
    body = dict(fuzz.SAMPLES[msg_type])
    if "cid" in body:
        body["cid"] = data.draw(st.sampled_from(cids) if cids else st.binary(min_size=16,
                                                                             max_size=16))
    for key in ("attempt",):
        if key in body:
            body[key] = data.draw(st.integers(0, 1000))
    if "stage" in body:
        body["stage"] = data.draw(st.sampled_from(SCHEMAS[msg_type]["stage"].choices))
    return body


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_third_key_holder_cannot_steer_a_swap(data: st.DataObject) -> None:
    """Messages from a node that is not the connection's peer, naming the live connection ids,
    at any point of the swap: the swap ends the same way (swapped), nothing frozen, no side
    one-sided, no connection created."""
    world = World(n=data.draw(st.integers(1, 2)))
    for _ in range(data.draw(st.integers(0, 60))):
        if not world.step_default():
            break
    for _ in range(data.draw(st.integers(1, 20))):
        cids = [c for d in world.daemons.values() for c in d.engine.conns]
        msg_type = data.draw(st.sampled_from(sorted(SCHEMAS)))
        node = data.draw(st.sampled_from([CLIENT, SERVER]))
        before = set(world.daemons[node].engine.conns)
        world.feed(node, PeerMessage("node3", msg_type, _body(msg_type, data, cids)))
        assert set(world.daemons[node].engine.conns) <= before
    world.drain()
    assert world.check_final() == ["swapped"] * world.n


def test_listener_announcements_from_a_peer_are_bounded() -> None:
    engine = Engine(EngineConfig(CLIENT), lambda ip: SERVER if ip.startswith("10.244.2.")
                    else CLIENT)
    limit = engine.config.max_remote_listeners
    for i in range(limit + 500):
        engine.handle(PeerMessage(SERVER, "listener_add", {
            "overlay_addr": f"10.244.2.{i % 250 + 1}", "overlay_port": i // 250 + 1,
            "host_addr": "192.168.77.2", "host_port": 41000}))
    assert len(engine.remote_listeners) == limit
    assert engine.stats["remote_listeners_full"] == 500
    # A refresh of a known listener still goes through when full.
    engine.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.1", "overlay_port": 1, "host_addr": "192.168.77.2",
        "host_port": 42000}))
    assert engine.remote_listeners[("10.244.2.1", 1)][2] == 42000


# -- transport: each rejection closes that connection only and is counted ----------------------


async def _send_and_wait_close(port: int, data: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    await asyncio.wait_for(reader.read(), 5)
    writer.close()


def test_transport_counts_stale_version_schema_and_silent_peers() -> None:
    async def main() -> None:
        got: list[tuple[str, str]] = []
        server = PeerServer(Codec(KEY), lambda peer, msg: got.append((peer.node, msg.type)),
                            host="127.0.0.1", port=0, handshake_timeout=0.5, max_connections=4)
        await server.start()
        sender = Codec(KEY)
        hello = fuzz.SAMPLES["hello"]
        env = {"v": 1, "type": "hello", "ts": time.time(), "nonce": os.urandom(16), "body": hello}
        await _send_and_wait_close(server.port, sender.encode("hello", hello,
                                                              ts=time.time() - 3600))
        await _send_and_wait_close(server.port, fuzz.sign(fuzz.pack({**env, "v": 2})))
        await _send_and_wait_close(server.port, fuzz.sign(fuzz.pack(
            {**env, "body": {**hello, "pid": 1}})))
        await _send_and_wait_close(server.port, b"")  # says nothing: handshake timeout
        await _send_and_wait_close(server.port, sender.encode("hello", hello)[:10])  # stalls
        assert server.rejected["replayed"] == 1
        assert server.rejected["bad_version"] == 1
        assert server.rejected["bad_schema"] == 1
        assert server.rejected["handshake_timeout"] == 1  # nothing at all
        assert server.rejected["truncated"] == 1  # a frame started, never finished
        # idle connections beyond max_connections are turned away, the server stays up
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(6)]
        deadline = time.monotonic() + 5
        while server.stats["refused_too_many"] < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert server.stats["refused_too_many"] == 2
        for _, w in idle:
            w.close()
        await asyncio.sleep(0.7)  # the rest time out
        good = PeerClient(Codec(KEY), "127.0.0.1", server.port, hello)
        good.start()
        good.send("conn_closed", {"cid": CID})
        while len(got) < 2 and time.monotonic() < deadline + 5:
            await asyncio.sleep(0.02)
        assert got == [("node3", "hello"), ("node3", "conn_closed")]
        await good.close()
        await server.close()

    asyncio.run(main())


def test_transport_survives_generated_hostile_streams() -> None:
    """600 generated inputs, each on its own TCP connection to a real PeerServer (half of them
    after a valid hello): no handler raises, every connection is closed by the server or ends
    at EOF, and a good peer is served afterwards."""
    import random

    async def main() -> None:
        errors: list[object] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        got: list[str] = []
        codec = Codec(KEY, clock=time.time)
        server = PeerServer(codec, lambda peer, msg: got.append(msg.type), host="127.0.0.1",
                            port=0, handshake_timeout=0.3)
        await server.start()
        rng = random.Random(5)
        gen = fuzz.Generator(rng, time.time, [CID])
        sender = Codec(KEY)
        for i in range(600):
            kind = fuzz.KINDS[i % len(fuzz.KINDS)]
            data = gen.make(kind)
            if i % 2:
                data = sender.encode("hello", fuzz.SAMPLES["hello"]) + data
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                writer.write(data)
                writer.write_eof()
                await asyncio.wait_for(reader.read(), 5)  # the server closes: EOF...
            except ConnectionResetError:
                pass  # ...or a reset, when it closed with our bytes unread
            writer.close()
        before = len(got)
        good = PeerClient(Codec(KEY), "127.0.0.1", server.port, fuzz.SAMPLES["hello"])
        good.start()
        good.send("conn_closed", {"cid": CID})
        deadline = time.monotonic() + 5
        while len(got) < before + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await good.close()
        await server.close()
        assert errors == []
        assert got[before:] == ["hello", "conn_closed"]
        assert server.stats["connections"] >= 600
        assert sum(server.rejected.values()) > 300

    asyncio.run(main())
