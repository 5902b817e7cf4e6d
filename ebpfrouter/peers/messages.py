"""Peer message types and their strict schemas (exact keys, types, ranges, lengths).

Messages name connections only by connection id (`cid`, 16 random bytes chosen by the client
side) and the overlay 4-tuple; never by pid or fd.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from .errors import SchemaError

PROTOCOL_VERSION = 1
CID_BYTES = 16
NONCE_BYTES = 16


@dataclasses.dataclass(frozen=True)
class Field:
    """One field: a Python type plus bounds (string/bytes length, integer range, choices)."""

    kind: type
    min: int | float | None = None
    max: int | float | None = None
    choices: tuple[str, ...] | None = None
    ip: bool = False

    def check(self, where: str, value: Any) -> None:
        """Raise `SchemaError` unless `value` fits."""
        # bool is an int subclass: keep them apart both ways
        if type(value) is not self.kind and not (self.kind is float and type(value) is int):
            raise SchemaError(f"{where}: expected {self.kind.__name__}, got {type(value).__name__}")
        size = len(value) if isinstance(value, str | bytes | list) else value
        if isinstance(size, int | float) and not isinstance(size, bool):
            if self.min is not None and size < self.min:
                raise SchemaError(f"{where}: {size} below minimum {self.min}")
            if self.max is not None and size > self.max:
                raise SchemaError(f"{where}: {size} above maximum {self.max}")
        if self.choices is not None and value not in self.choices:
            raise SchemaError(f"{where}: {value!r} not one of {self.choices}")
        if self.ip:
            try:
                ipaddress.ip_address(str(value))  # a str: the kind was checked above
            except ValueError:
                raise SchemaError(f"{where}: {value!r} is not an IP address") from None


PORT = Field(int, 1, 65535)
IP = Field(str, 2, 45, ip=True)
CID = Field(bytes, CID_BYTES, CID_BYTES)
ATTEMPT = Field(int, 0, 1000)
REASON = Field(str, 0, 200)
NODE = Field(str, 1, 253)
MAX_MIGRATE = 64 << 20  # unread overlay bytes one side may carry over in a swap
MIGRATE_LEN = Field(int, 0, MAX_MIGRATE)

TUPLE = {"client_addr": IP, "client_port": PORT, "server_addr": IP, "server_port": PORT}

SCHEMAS: dict[str, dict[str, Field]] = {
    # first message on a control connection: who I am
    "hello": {"node": NODE, "host_addr": IP},
    # server side: overlay addr:port is reachable at host addr:port on my node
    "listener_add": {"overlay_addr": IP, "overlay_port": PORT, "host_addr": IP, "host_port": PORT},
    "listener_remove": {"overlay_addr": IP, "overlay_port": PORT},
    # client side, first frame on a new host connection: this host conn is overlay 4-tuple X
    "bind": {"cid": CID, **TUPLE},
    # the two-phase swap (see engine/machine.py)
    # migrate_len: the sender's unread overlay bytes to bounce (stages migrate, checked; else 0)
    "swap_prepare": {"cid": CID, "attempt": ATTEMPT,
                     "stage": Field(str, choices=("freeze", "check", "migrate")),
                     "migrate_len": MIGRATE_LEN, **TUPLE},
    "swap_ready": {"cid": CID, "attempt": ATTEMPT,
                   "stage": Field(str, choices=("frozen", "checked", "replaced")),
                   "migrate_len": MIGRATE_LEN},
    "swap_commit": {"cid": CID, "attempt": ATTEMPT},
    "swap_abort": {"cid": CID, "attempt": ATTEMPT, "reason": REASON, "final": Field(bool)},
    "swap_done": {"cid": CID, "attempt": ATTEMPT},
    "conn_closed": {"cid": CID},
    "error": {"code": Field(str, 1, 40), "detail": REASON},
}
MESSAGE_TYPES = frozenset(SCHEMAS)
# Fields a body may leave out (a peer of an earlier version does); absent means False.
# eager: listener_add — new connections to it are swapped at connect()/accept() return;
# bind — this host connection is for an eager swap (the client app is stopped now).
OPTIONAL: dict[str, dict[str, Field]] = {
    "listener_add": {"eager": Field(bool)},
    "bind": {"eager": Field(bool)},
}


def check_body(msg_type: str, body: Any) -> dict[str, Any]:
    """Validate a message body against its schema: exact keys, no extras; return it."""
    schema = SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise SchemaError(f"unknown message type {msg_type!r}")
    if not isinstance(body, Mapping):
        raise SchemaError(f"{msg_type}: body is {type(body).__name__}, expected a map")
    keys = set(body)
    optional = OPTIONAL.get(msg_type, {})
    if not schema.keys() <= keys <= schema.keys() | optional.keys():
        extra = sorted(map(repr, keys - schema.keys() - optional.keys()))
        missing = sorted(schema.keys() - keys)
        raise SchemaError(f"{msg_type}: extra keys {extra}, missing keys {missing}")
    for name, field in (*schema.items(), *optional.items()):
        if name in body:
            field.check(f"{msg_type}.{name}", body[name])
    return dict(body)


@dataclasses.dataclass(frozen=True)
class Message:
    """A decoded, authenticated, schema-checked message."""

    type: str
    body: dict[str, Any]
    ts: float = 0.0
    nonce: bytes = b""

    @property
    def typed(self) -> Any:
        """The body as its message type's dataclass (see `BODIES`)."""
        return typed(self.type, self.body)


# -- typed bodies: one dataclass per message type, with exactly the schema's fields -------------


@dataclasses.dataclass(frozen=True)
class Hello:
    """First message on a control connection: who I am."""

    node: str
    host_addr: str


@dataclasses.dataclass(frozen=True)
class ListenerAdd:
    """Overlay addr:port is reachable at host addr:port on my node."""

    overlay_addr: str
    overlay_port: int
    host_addr: str
    host_port: int
    eager: bool = False  # its new connections are swapped at connect()/accept() return


@dataclasses.dataclass(frozen=True)
class ListenerRemove:
    """Overlay addr:port is no longer served."""

    overlay_addr: str
    overlay_port: int


@dataclasses.dataclass(frozen=True)
class Bind:
    """First frame on a new host connection: it stands for overlay connection `cid`."""

    cid: bytes
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int
    eager: bool = False  # for an eager swap: the client app is stopped at connect() return


@dataclasses.dataclass(frozen=True)
class SwapPrepare:
    """Client to server: do your part of `stage` in `attempt`."""

    cid: bytes
    attempt: int
    stage: str
    migrate_len: int
    client_addr: str
    client_port: int
    server_addr: str
    server_port: int


@dataclasses.dataclass(frozen=True)
class SwapReady:
    """Server to client: `stage` of `attempt` is done."""

    cid: bytes
    attempt: int
    stage: str
    migrate_len: int


@dataclasses.dataclass(frozen=True)
class SwapCommit:
    """Client to server: I replaced; the swap is committed."""

    cid: bytes
    attempt: int


@dataclasses.dataclass(frozen=True)
class SwapAbort:
    """Either side: `attempt` is abandoned (`final`: no more attempts)."""

    cid: bytes
    attempt: int
    reason: str
    final: bool


@dataclasses.dataclass(frozen=True)
class SwapDone:
    """Server to client: thawed after the commit."""

    cid: bytes
    attempt: int


@dataclasses.dataclass(frozen=True)
class ConnClosed:
    """Either side: my app closed the connection, forget it."""

    cid: bytes


@dataclasses.dataclass(frozen=True)
class Error:
    """A peer reports a problem."""

    code: str
    detail: str


Body = (Hello | ListenerAdd | ListenerRemove | Bind | SwapPrepare | SwapReady | SwapCommit
        | SwapAbort | SwapDone | ConnClosed | Error)
BODIES: dict[str, type[Body]] = {
    "hello": Hello, "listener_add": ListenerAdd, "listener_remove": ListenerRemove,
    "bind": Bind, "swap_prepare": SwapPrepare, "swap_ready": SwapReady,
    "swap_commit": SwapCommit, "swap_abort": SwapAbort, "swap_done": SwapDone,
    "conn_closed": ConnClosed, "error": Error,
}


def typed(msg_type: str, body: Mapping[str, Any]) -> Body:
    """The dataclass of a schema-checked body (`check_body` first for untrusted input)."""
    return BODIES[msg_type](**body)
