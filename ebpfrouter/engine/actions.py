"""Actions the engine asks for; thin adapters run them and feed back result events."""

from __future__ import annotations

import dataclasses
from typing import Any

from .events import SockRef


class Action:
    """Base class of all engine outputs."""


@dataclasses.dataclass(frozen=True)
class OpenHostListener(Action):
    """Listen on HOST_IF (port `port_hint` if free) for connections to overlay `addr:port`.

    `pid`/`fd` is the overlay listener (the runner copies it for its socket family).
    Result: `HostListenerOpened` or `ActionFailed`.
    """

    ref: int
    overlay_addr: str
    overlay_port: int
    port_hint: int
    pid: int = 0
    fd: int = -1


@dataclasses.dataclass(frozen=True)
class HostConnect(Action):
    """Connect to a peer's host listener and send `bind` as the first frame.

    `overlay_sock` is the app's overlay socket (the host socket gets its family).
    Result: `HostConnected` or `ActionFailed`.
    """

    ref: int
    cid: bytes
    host_addr: str
    host_port: int
    bind: dict[str, Any]
    overlay_sock: SockRef | None = None


@dataclasses.dataclass(frozen=True)
class SendPeer(Action):
    """Send a control message to `peer` (None: to every connected peer). Fire and forget."""

    peer: str | None
    type: str
    body: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Freeze(Action):
    """Stop every thread of `pid`. Result: `FreezeDone` or `ActionFailed`."""

    ref: int
    pid: int


@dataclasses.dataclass(frozen=True)
class Thaw(Action):
    """Resume `pid` (must never fail silently; a gone process is fine). Fire and forget."""

    pid: int


@dataclasses.dataclass(frozen=True)
class CheckQueues(Action):
    """Read the overlay socket's send queue and unread bytes. Result: `QueuesChecked`."""

    ref: int
    pid: int
    fd: int
    sock: SockRef


@dataclasses.dataclass(frozen=True)
class Bounce(Action):
    """Carry unread overlay bytes over the host connection, before the fd is replaced.

    Write the first `send_len` bytes of `overlay_sock`'s receive queue (peeked, never
    consumed) to `host_sock`; read exactly `echo_len` bytes from `host_sock` (the peer's
    unread bytes) and write them back, so they land in the peer's host receive queue ahead of
    any new data. Result: `BounceDone` or `ActionFailed` (the overlay socket is untouched).
    """

    ref: int
    overlay_sock: SockRef
    host_sock: SockRef
    send_len: int
    echo_len: int


@dataclasses.dataclass(frozen=True)
class ReplaceFd(Action):
    """Inside frozen `pid`, put socket `sock` at `fd` if `fd` still holds `expected_inode`.

    Result: `ReplaceDone` or `ActionFailed` (then the fd is unchanged).
    """

    ref: int
    pid: int
    fd: int
    sock: SockRef
    expected_inode: int
    cid: bytes = b""  # the connection it is for
    # the overlay addresses the app saw (its own, its peer's): getsockname()/getpeername()
    # keep answering them for the new socket (None when the overlay socket is put back)
    overlay_local: tuple[str, int] | None = None
    overlay_peer: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class ProbeConn(Action):
    """Check (without reading data) whether the peer closed either connection.

    Result: `ConnProbed` or `ActionFailed`.
    """

    ref: int
    overlay_sock: SockRef
    host_sock: SockRef


@dataclasses.dataclass(frozen=True)
class NoteSwapped(Action):
    """A connection was swapped on this side (for status and metrics). Fire and forget."""

    cid: bytes
    role: str
    pid: int
    fd: int
    tuple: str
    path: str = "late"  # "eager" (swapped at connect()/accept() return) or "late"


@dataclasses.dataclass(frozen=True)
class NoteForgotten(Action):
    """A swapped connection ended in its app (its address virtualization can go). Fire and
    forget."""

    cid: bytes


@dataclasses.dataclass(frozen=True)
class Resume(Action):
    """Let `pid` run again: the tracer stopped it at `connect()`/`accept()` return for an
    eager swap (SIGSTOP), and no eager swap holds it any more. Runs after every `Thaw` of
    `pid` emitted before it. Fire and forget."""

    pid: int


@dataclasses.dataclass(frozen=True)
class EagerListener(Action):
    """Stop (``on``) or no longer stop new connections to overlay `addr:port` at `connect()`
    return (``remote``: a peer's listener) or accepted on it at `accept()` return (ours): the
    tracer's kernel map. Fire and forget."""

    addr: str
    port: int
    on: bool
    remote: bool


@dataclasses.dataclass(frozen=True)
class EagerPeer(Action):
    """Accepts from `peer`'s pod CIDRs may (``on``) or may no longer be stopped. Fire and
    forget."""

    peer: str
    on: bool


@dataclasses.dataclass(frozen=True)
class CloseSocket(Action):
    """Close the daemon's handle `sock`. Fire and forget."""

    sock: SockRef


@dataclasses.dataclass(frozen=True)
class StartTimer(Action):
    """Deliver `TimerFired(key)` after `delay` seconds (stale keys are ignored by the engine)."""

    key: tuple[Any, ...]
    delay: float


@dataclasses.dataclass(frozen=True)
class CancelTimer(Action):
    """Drop every pending timer started with `key` (nothing if none): the engine no longer
    needs it, and a timer per traced connection would otherwise pile up under a flood."""

    key: tuple[Any, ...]
