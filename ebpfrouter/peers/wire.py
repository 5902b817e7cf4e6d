"""Frames and authentication: 4-byte big-endian length, msgpack envelope, HMAC-SHA256 tag.

    frame    = length(4, big endian) || envelope || tag(32)
    envelope = msgpack {"v": version, "type": str, "ts": float, "nonce": 16 bytes, "body": map}
    tag      = HMAC-SHA256(key, envelope)

The tag is checked (constant time) before the envelope is parsed, so unauthenticated bytes
never reach the MessagePack parser.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack

from .errors import (
    AuthError,
    FrameTooLarge,
    MalformedError,
    ProtocolError,
    ReplayError,
    SchemaError,
    Truncated,
    VersionError,
)
from .messages import NONCE_BYTES, PROTOCOL_VERSION, Message, check_body

HEADER = struct.Struct(">I")
TAG_BYTES = 32
MAX_FRAME = 4096
ENVELOPE_KEYS = frozenset({"v", "type", "ts", "nonce", "body"})


def _no_ext(code: int, data: bytes) -> Any:
    raise MalformedError(f"msgpack extension type {code} not allowed")


class ReplayGuard:
    """Rejects messages outside a timestamp window or with a nonce seen before.

    The nonce cache is bounded: when full, the oldest entry is evicted and its timestamp
    becomes a floor; any later message stamped at or before the floor is refused, so an
    evicted nonce can never be replayed.
    """

    def __init__(self, window: float = 30.0, capacity: int = 65536,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.capacity = capacity
        self.clock = clock
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._floor = float("-inf")

    def check(self, ts: float, nonce: bytes) -> None:
        """Accept (and remember) or raise `ReplayError`."""
        now = self.clock()
        if abs(now - ts) > self.window:
            raise ReplayError(f"timestamp {ts:.3f} outside ±{self.window}s of now {now:.3f}")
        if ts <= self._floor:
            raise ReplayError(f"timestamp {ts:.3f} older than the replay cache floor")
        if nonce in self._seen:
            raise ReplayError(f"nonce {nonce.hex()} already seen")
        while self._seen:  # drop entries that fell out of the window anyway
            oldest_nonce, oldest_ts = next(iter(self._seen.items()))
            if oldest_ts >= now - self.window and len(self._seen) < self.capacity:
                break
            del self._seen[oldest_nonce]
            self._floor = max(self._floor, oldest_ts)
        self._seen[nonce] = ts

    def __len__(self) -> int:
        return len(self._seen)


class Codec:
    """Encodes and decodes frames for one shared key; counts rejections per reason."""

    def __init__(self, key: bytes, max_frame: int = MAX_FRAME, replay: ReplayGuard | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("peer key must be at least 16 bytes")
        self._key = key
        self.max_frame = max_frame
        self.clock = clock
        self.replay = replay if replay is not None else ReplayGuard(clock=clock)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.accepted = 0

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, msg_type: str, body: dict[str, Any], *, ts: float | None = None,
               nonce: bytes | None = None, version: int = PROTOCOL_VERSION) -> bytes:
        """A complete frame (header included) for a schema-valid message."""
        check_body(msg_type, body)
        envelope = msgpack.packb(
            {"v": version, "type": msg_type, "ts": self.clock() if ts is None else ts,
             "nonce": os.urandom(NONCE_BYTES) if nonce is None else nonce, "body": body},
            use_bin_type=True,
        )
        payload = envelope + hmac.new(self._key, envelope, hashlib.sha256).digest()
        if len(payload) > self.max_frame:
            raise ValueError(f"{msg_type} message of {len(payload)} bytes exceeds the frame limit")
        return HEADER.pack(len(payload)) + payload

    # -- decoding ---------------------------------------------------------------------------

    def frame_length(self, header: bytes) -> int:
        """Payload length announced by a 4-byte header; `ProtocolError` if out of bounds."""
        try:
            if not isinstance(header, bytes | bytearray) or len(header) != HEADER.size:
                raise Truncated(f"frame header is not {HEADER.size} bytes")
            (length,) = HEADER.unpack(bytes(header))
            if length > self.max_frame:
                raise FrameTooLarge(f"frame of {length} bytes exceeds {self.max_frame}")
            if length <= TAG_BYTES:
                raise Truncated(f"frame of {length} bytes cannot hold a tag")
        except ProtocolError as exc:
            self.rejected[exc.counter] += 1
            raise
        return length

    def decode_payload(self, payload: bytes) -> Message:
        """Authenticate, parse and check one payload (the bytes after the header)."""
        try:
            msg = self._decode(payload)
        except ProtocolError as exc:
            self.rejected[exc.counter] += 1
            raise
        self.accepted += 1
        return msg

    def decode_frame(self, frame: bytes) -> Message:
        """Decode one complete frame, header included; trailing or missing bytes are errors."""
        if not isinstance(frame, bytes | bytearray | memoryview):
            self.rejected[MalformedError.counter] += 1
            raise MalformedError(f"frame is {type(frame).__name__}, not bytes")
        frame = bytes(frame)
        length = self.frame_length(frame[: HEADER.size])
        payload = frame[HEADER.size :]
        if len(payload) != length:
            self.rejected[Truncated.counter] += 1
            raise Truncated(f"frame announces {length} bytes, holds {len(payload)}")
        return self.decode_payload(payload)

    def _decode(self, payload: bytes) -> Message:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise MalformedError("payload is not bytes")
        payload = bytes(payload)
        if len(payload) <= TAG_BYTES:
            raise Truncated(f"payload of {len(payload)} bytes cannot hold a tag")
        if len(payload) > self.max_frame:
            raise FrameTooLarge(f"payload of {len(payload)} bytes exceeds {self.max_frame}")
        envelope, tag = payload[:-TAG_BYTES], payload[-TAG_BYTES:]
        expected = hmac.new(self._key, envelope, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise AuthError("HMAC tag does not verify (wrong key or corrupted frame)")
        try:
            data = msgpack.unpackb(
                envelope, raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext,
                max_str_len=self.max_frame,
                max_bin_len=self.max_frame, max_array_len=256, max_map_len=64,
            )
        except ProtocolError:
            raise
        except Exception as exc:  # msgpack raises a zoo of types on garbage
            raise MalformedError(f"not a msgpack envelope: {type(exc).__name__}") from None
        if not isinstance(data, dict) or set(data) != ENVELOPE_KEYS:
            keys = sorted(map(repr, data)) if isinstance(data, dict) else type(data).__name__
            raise MalformedError(f"envelope must have exactly {sorted(ENVELOPE_KEYS)}, got {keys}")
        version = data["v"]
        if type(version) is not int or version != PROTOCOL_VERSION:
            raise VersionError(f"protocol version {version!r}, we speak {PROTOCOL_VERSION}")
        ts, nonce = data["ts"], data["nonce"]
        if type(ts) not in (int, float) or ts != ts:  # NaN
            raise SchemaError(f"envelope ts {ts!r} is not a number")
        if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
            raise SchemaError(f"envelope nonce must be {NONCE_BYTES} bytes")
        body = check_body(data["type"], data["body"])
        self.replay.check(float(ts), nonce)
        return Message(type=data["type"], body=body, ts=float(ts), nonce=nonce)


class FrameBuffer:
    """Accumulates stream bytes and yields complete payloads (sans-I/O framing)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._buf = bytearray()
        self._need: int | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return complete payloads. A bad header raises (close the stream)."""
        self._buf += data
        out = []
        while True:
            if self._need is None:
                if len(self._buf) < HEADER.size:
                    break
                self._need = self.codec.frame_length(bytes(self._buf[: HEADER.size]))
                del self._buf[: HEADER.size]
            if len(self._buf) < self._need:
                break
            out.append(bytes(self._buf[: self._need]))
            del self._buf[: self._need]
            self._need = None
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered toward an incomplete frame."""
        return len(self._buf)
