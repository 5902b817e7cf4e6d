"""Peer protocol: framing, HMAC, schemas, replay protection, fuzzing, real loopback TCP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import random
import socket
import struct
import time

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebpfrouter.peers import (
    MESSAGE_TYPES,
    AuthError,
    Codec,
    FrameBuffer,
    FrameTooLarge,
    MalformedError,
    ProtocolError,
    ReplayError,
    ReplayGuard,
    SchemaError,
    Truncated,
    VersionError,
)
from ebpfrouter.peers.transport import PeerClient, PeerServer

KEY = b"0123456789abcdef-shared-key"
CID = bytes(range(16))
# raise for long fuzzing runs, e.g. PEERS_FUZZ_EXAMPLES=1000000
FUZZ = int(os.environ.get("PEERS_FUZZ_EXAMPLES", "400"))
TUPLE = {"client_addr": "10.244.2.7", "client_port": 40000,
         "server_addr": "10.244.1.5", "server_port": 5201}
SAMPLES = {
    "hello": {"node": "node1", "host_addr": "192.168.77.1"},
    "listener_add": {"overlay_addr": "10.244.1.5", "overlay_port": 5201,
                     "host_addr": "192.168.77.1", "host_port": 40123},
    "listener_remove": {"overlay_addr": "10.244.1.5", "overlay_port": 5201},
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


def sign(envelope: bytes, key: bytes = KEY) -> bytes:
    payload = envelope + hmac.new(key, envelope, hashlib.sha256).digest()
    return struct.pack(">I", len(payload)) + payload


def envelope(**overrides: object) -> bytes:
    data = {"v": 1, "type": "conn_closed", "ts": time.time(), "nonce": os.urandom(16),
            "body": {"cid": CID}}
    data.update(overrides)
    return msgpack.packb(data, use_bin_type=True)


def test_every_type_has_a_sample_and_roundtrips() -> None:
    assert set(SAMPLES) == MESSAGE_TYPES
    codec = Codec(KEY)
    for msg_type, body in SAMPLES.items():
        msg = codec.decode_frame(codec.encode(msg_type, body))
        assert (msg.type, msg.body) == (msg_type, body)
    assert codec.accepted == len(SAMPLES) and not codec.rejected


@pytest.mark.parametrize(
    "body",
    [
        {"cid": CID, "extra": 1},  # extra key
        {},  # missing key
        {"cid": CID[:15]},  # too short
        {"cid": "0123456789abcdef"},  # str, not bytes
    ],
)
def test_schema_rejects(body: dict) -> None:
    codec = Codec(KEY)
    with pytest.raises(SchemaError):
        codec.decode_frame(sign(envelope(body=body)))
    assert codec.rejected["bad_schema"] == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("server_port", 0), ("server_port", 70000), ("server_port", True), ("server_port", 1.5),
     ("client_addr", "10.244.2.300"), ("client_addr", "x" * 60), ("client_addr", 7)],
)
def test_schema_field_bounds(field: str, value: object) -> None:
    codec = Codec(KEY)
    body = {**SAMPLES["bind"], field: value}
    with pytest.raises(SchemaError, match=f"bind.{field}"):
        codec.decode_frame(sign(envelope(type="bind", body=body)))
    with pytest.raises(SchemaError):
        codec.encode("bind", body)  # the sender refuses too


@pytest.mark.parametrize("msg_type", ["swap_prepare", "swap_ready"])
@pytest.mark.parametrize("value", [-1, 64 * 2**20 + 1, 2**63 - 1, True, 1.0, "1", None])
def test_migrate_len_bounds(msg_type: str, value: object) -> None:
    """The unread-byte count a peer asks us to bounce is bounded (64 MiB) and an integer."""
    codec = Codec(KEY)
    body = {**SAMPLES[msg_type], "migrate_len": value}
    with pytest.raises(SchemaError, match=f"{msg_type}.migrate_len"):
        codec.decode_frame(sign(envelope(type=msg_type, body=body)))
    for good in (0, 64 * 2**20):
        assert codec.decode_frame(codec.encode(msg_type, {**body, "migrate_len": good})).body[
            "migrate_len"] == good
    without = {k: v for k, v in SAMPLES[msg_type].items() if k != "migrate_len"}
    with pytest.raises(SchemaError, match="missing keys \\['migrate_len'\\]"):
        codec.decode_frame(sign(envelope(type=msg_type, body=without)))


def test_wrong_key_version_type_envelope() -> None:
    codec = Codec(KEY)
    with pytest.raises(AuthError):
        codec.decode_frame(Codec(b"another-key-0123456").encode("conn_closed", {"cid": CID}))
    with pytest.raises(VersionError):
        codec.decode_frame(sign(envelope(v=2)))
    with pytest.raises(VersionError):
        codec.decode_frame(sign(envelope(v=True)))
    with pytest.raises(SchemaError, match="unknown message type"):
        codec.decode_frame(sign(envelope(type="exec")))
    with pytest.raises(MalformedError):
        codec.decode_frame(sign(envelope(pid=1)))  # extra envelope key
    with pytest.raises(MalformedError):
        codec.decode_frame(sign(b"\xc1garbage"))
    with pytest.raises(MalformedError):
        codec.decode_frame(sign(msgpack.packb(msgpack.ExtType(1, b"x"))))
    assert codec.rejected == {"bad_auth": 1, "bad_version": 2, "bad_schema": 1, "malformed": 3}


@pytest.mark.parametrize("junk", [None, 7, "text", [1, 2], b""])
def test_decoder_rejects_non_bytes(junk: object) -> None:
    codec = Codec(KEY)
    with pytest.raises(ProtocolError):
        codec.decode_frame(junk)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        codec.decode_payload(junk)  # type: ignore[arg-type]


def test_sizes() -> None:
    codec = Codec(KEY, max_frame=256)
    with pytest.raises(FrameTooLarge):
        codec.decode_frame(struct.pack(">I", 257) + b"x" * 257)
    with pytest.raises(Truncated):
        codec.decode_frame(struct.pack(">I", 10) + b"x" * 10)
    frame = codec.encode("conn_closed", {"cid": CID})
    with pytest.raises(Truncated):
        codec.decode_frame(frame[:-1])
    with pytest.raises(Truncated):
        codec.decode_frame(frame[:3])
    with pytest.raises(ValueError, match="frame limit"):
        Codec(KEY, max_frame=100).encode("error", {"code": "x", "detail": "y" * 200})


def test_replay_nonce_window_and_floor() -> None:
    now = [1000.0]
    codec = Codec(KEY, replay=ReplayGuard(window=30, capacity=4, clock=lambda: now[0]),
                  clock=lambda: now[0])
    frame = codec.encode("conn_closed", {"cid": CID})
    codec.decode_frame(frame)
    with pytest.raises(ReplayError, match="already seen"):
        codec.decode_frame(frame)
    with pytest.raises(ReplayError, match="outside"):
        codec.decode_frame(codec.encode("conn_closed", {"cid": CID}, ts=now[0] - 31))
    with pytest.raises(ReplayError, match="outside"):
        codec.decode_frame(codec.encode("conn_closed", {"cid": CID}, ts=now[0] + 31))
    # fill the bounded cache; evicted nonces cannot come back: their timestamps are the floor
    frames = [codec.encode("conn_closed", {"cid": CID}, ts=now[0] + i) for i in range(1, 7)]
    for f in frames:
        codec.decode_frame(f)
    assert len(codec.replay) <= 4
    for f in frames:
        with pytest.raises(ReplayError):
            codec.decode_frame(f)
    assert codec.rejected["replayed"] == 3 + len(frames)


def test_framebuffer_splits_stream() -> None:
    codec = Codec(KEY)
    stream = b"".join(codec.encode(t, b) for t, b in SAMPLES.items())
    buf = FrameBuffer(codec)
    payloads = []
    for i in range(0, len(stream), 7):
        payloads += buf.feed(stream[i : i + 7])
    assert [codec.decode_payload(p).type for p in payloads] == list(SAMPLES)
    assert buf.pending == 0
    with pytest.raises(FrameTooLarge):
        FrameBuffer(codec).feed(b"\xff\xff\xff\xff")


@settings(max_examples=FUZZ * 5, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_raw_bytes(data: bytes) -> None:
    codec = Codec(KEY)
    with pytest.raises(ProtocolError):
        codec.decode_frame(data)
    with pytest.raises(ProtocolError):
        codec.decode_frame(sign(data))  # authenticated garbage reaches the parser


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["v", "type", "body", "cid"]),
                      children, max_size=5),
    max_leaves=20,
)


def _packable(value: object) -> bytes | None:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


@settings(max_examples=FUZZ, deadline=None)
@given(
    st.sampled_from(sorted(MESSAGE_TYPES)) | st.text(max_size=10),
    st.dictionaries(st.sampled_from(sorted({k for b in SAMPLES.values() for k in b})),
                    msgpack_values, max_size=6)
    | msgpack_values,
    msgpack_values,
)
def test_fuzz_signed_envelopes(msg_type: object, body: object, junk: object) -> None:
    codec = Codec(KEY)
    for value in ({"v": 1, "type": msg_type, "ts": time.time(), "nonce": os.urandom(16),
                   "body": body}, junk):
        packed = _packable(value)
        if packed is None:
            continue
        try:
            msg = codec.decode_frame(sign(packed))
        except ProtocolError:
            continue
        # anything accepted re-validates and re-encodes cleanly
        assert msg.type in MESSAGE_TYPES
        codec.encode(msg.type, msg.body)


def test_100k_mutated_frames_quickly() -> None:
    total = int(os.environ.get("PEERS_MUTATED_FRAMES", "100000"))
    codec = Codec(KEY, replay=ReplayGuard(window=1e9, capacity=1 << 20))
    rng = random.Random(1234)
    bases = [codec.encode(t, b) for t, b in SAMPLES.items()]
    accepted = errors = 0
    start = time.monotonic()
    for i in range(total):
        frame = bytearray(rng.choice(bases))
        op = i % 4
        if op == 0:  # bit flips anywhere
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation / extension
            frame = frame[: rng.randrange(len(frame))] + bytes(rng.randrange(3))
        elif op == 2:  # re-signed envelope mutation: exercises the parser and schemas
            env = bytearray(frame[4:-32])
            for _ in range(rng.randint(1, 3)):
                env[rng.randrange(len(env))] = rng.randrange(256)
            frame = bytearray(sign(bytes(env)))
        else:  # random bytes
            frame = bytearray(rng.randbytes(rng.randrange(1, 80)))
        try:
            codec.decode_frame(bytes(frame))
            accepted += 1
        except ProtocolError:
            errors += 1
    elapsed = time.monotonic() - start
    assert accepted + errors == total
    assert errors > total * 0.9  # mutated frames overwhelmingly rejected...
    assert sum(codec.rejected.values()) == errors  # ...and every rejection counted
    assert elapsed < 30 * total / 100_000, elapsed


# -- real loopback TCP -------------------------------------------------------------------------


async def _raw_send(port: int, data: bytes, close: bool = True) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if close:
        writer.close()
    await asyncio.wait_for(reader.read(), 5)  # the server closes on a bad frame
    writer.close()


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_transport_rejects_bad_peers_and_keeps_serving() -> None:
    async def main() -> None:
        got: list[tuple[str, str]] = []
        server = PeerServer(Codec(KEY), lambda peer, msg: got.append((peer.node, msg.type)),
                            host="127.0.0.1", port=0, handshake_timeout=2)
        await server.start()
        good = PeerClient(Codec(KEY), "127.0.0.1", server.port, SAMPLES["hello"])
        good.start()
        good.send("listener_add", SAMPLES["listener_add"])
        await _wait_for(lambda: len(got) == 2)

        sender = Codec(KEY)
        hello = sender.encode("hello", {"node": "evil", "host_addr": "192.168.77.9"})
        await _raw_send(server.port, Codec(b"wrong-key-0123456789").encode(*_hello("evil")))
        await _raw_send(server.port, b"GET / HTTP/1.1\r\n\r\n")
        await _raw_send(server.port, struct.pack(">I", 1 << 30))
        await _raw_send(server.port, hello[:20])  # truncated, then EOF
        await _raw_send(server.port, hello + hello)  # replayed on the same stream
        replay_frame = sender.encode("conn_closed", {"cid": CID})
        hello2 = sender.encode("hello", {"node": "evil2", "host_addr": "192.168.77.9"})
        await _raw_send(server.port, hello2 + replay_frame + replay_frame)
        await _raw_send(server.port, sender.encode("conn_closed", {"cid": CID}))  # no hello
        await _wait_for(lambda: sum(server.rejected.values()) >= 7)
        assert server.rejected["bad_auth"] == 1
        assert server.rejected["oversized"] == 2  # "GET " read as a length is huge too
        assert server.rejected["truncated"] >= 1
        assert server.rejected["replayed"] == 2
        assert server.rejected["no_hello"] == 1

        before = len(got)
        good.send("swap_ready", SAMPLES["swap_ready"])
        await _wait_for(lambda: len(got) == before + 1)
        assert got[-1] == ("node1", "swap_ready")
        assert ("evil", "hello") in got  # its hello was fine, its replay was not
        assert [t for n, t in got if n == "evil2"] == ["hello", "conn_closed"]
        await good.close()
        await server.close()

    asyncio.run(main())


def _hello(node: str) -> tuple[str, dict]:
    return "hello", {"node": node, "host_addr": "192.168.77.9"}


def test_client_reconnects_with_backoff() -> None:
    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        got: list[str] = []
        states: list[bool] = []
        client = PeerClient(Codec(KEY), "127.0.0.1", port, SAMPLES["hello"],
                            backoff_min=0.02, backoff_max=0.1, on_state=states.append)
        client.start()
        await asyncio.sleep(0.2)
        assert client.stats["failures"] >= 2 and not client.connected.is_set()
        server = PeerServer(Codec(KEY), lambda p, m: got.append(m.type), "127.0.0.1", port)
        await server.start()
        await asyncio.wait_for(client.connected.wait(), 5)
        client.send("conn_closed", {"cid": CID})
        await _wait_for(lambda: got == ["hello", "conn_closed"])
        await server.close()  # peer goes away: the client notices and reconnects later
        await _wait_for(lambda: not client.connected.is_set())
        server = PeerServer(Codec(KEY), lambda p, m: got.append(m.type), "127.0.0.1", port)
        await server.start()
        await asyncio.wait_for(client.connected.wait(), 5)
        client.send("conn_closed", {"cid": CID})
        await _wait_for(lambda: got[-2:] == ["hello", "conn_closed"] and len(got) == 4)
        assert states[:3] == [True, False, True]
        await client.close()
        await server.close()

    asyncio.run(main())


def test_server_port_in_use_is_named() -> None:
    async def main() -> None:
        first = PeerServer(Codec(KEY), lambda p, m: None, "127.0.0.1", 0)
        await first.start()
        second = PeerServer(Codec(KEY), lambda p, m: None, "127.0.0.1", first.port)
        with pytest.raises(OSError, match=f"127.0.0.1:{first.port}"):
            await second.start()
        await first.close()

    asyncio.run(main())


# -- peer discovery from overlay routes ----------------------------------------------------


def test_peer_map_lookup() -> None:
    import ipaddress

    from ebpfrouter.peers.discovery import OverlayRoute, PeerMap

    net = ipaddress.ip_network
    pm = PeerMap([OverlayRoute(net("10.244.2.0/24"), "192.168.77.2", "10.244.2.0"),
                  OverlayRoute(net("10.244.0.0/16"), "192.168.77.9", "10.244.0.1")],
                 "192.168.77.1", [net("10.244.1.0/24")])
    assert pm.peer_of("10.244.1.7") == "192.168.77.1"
    assert pm.peer_of("10.244.2.7") == "192.168.77.2"  # longest prefix first
    assert pm.peer_of("10.244.3.7") == "192.168.77.9"
    assert pm.peer_of("::ffff:10.244.2.7") == "192.168.77.2"
    assert pm.peer_of("8.8.8.8") is None and pm.peer_of("nonsense") is None
    assert pm.peers() == ["192.168.77.2", "192.168.77.9"]


@pytest.mark.root
def test_peer_map_from_testbed_routes() -> None:
    import uuid

    from pyroute2 import NetNS

    from ebpfrouter.peers.discovery import DiscoveryError, PeerMap
    from ebpfrouter.testbed import PREFIX, Testbed

    with Testbed.up(nodes=3, pods_per_node=1, run_id=PREFIX + uuid.uuid4().hex[:6]) as bed:
        with NetNS(bed.node("node1").netns, flags=0) as ipr:
            pm = PeerMap.from_interface("flannel.1", "192.168.77.1", ipr)
            with pytest.raises(DiscoveryError, match="'nosuch0'"):
                PeerMap.from_interface("nosuch0", "x", ipr)
        assert pm.peers() == ["192.168.77.2", "192.168.77.3"]
        assert pm.peer_of("10.244.1.2") == "192.168.77.1"
        assert pm.peer_of("10.244.3.2") == "192.168.77.3"
        assert pm.peer_of("192.168.77.2") is None
