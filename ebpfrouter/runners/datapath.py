"""The data path: queue checks, carrying unread bytes over the host connection, probes.

`CheckQueues` reads the overlay socket's queues (giving in-flight data a moment to drain),
`Bounce` writes our unread overlay bytes (peeked, never consumed) to the host connection and
echoes the peer's, `ProbeConn` asks both sockets whether the other end closed. Nothing here
ever consumes a byte an application has not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from injector.inspect import TCP_STATES, queue_sizes, tcp_info

from ..engine.actions import Action, Bounce, CheckQueues, ProbeConn
from ..engine.events import ActionFailed, BounceDone, ConnProbed, QueuesChecked, SockRef
from ..socktable import SocketTable
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)

_GONE_STATES = frozenset({"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "CLOSING"})


async def recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    """Exactly `size` bytes from non-blocking `sock` (EOFError if it closes first)."""
    data = bytearray()
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def peek_unread(sock: socket.socket, size: int) -> bytes:
    """All `size` unread bytes of TCP socket `sock`, without consuming them (MSG_PEEK).

    The socket's owner is frozen, so nothing reads them meanwhile; a rollback leaves the
    socket exactly as it was. Raises ValueError if the receive queue does not hold exactly
    `size` bytes (it changed since the check, or a peek offset is set).
    """
    unread, _ = queue_sizes(sock)
    if unread != size:
        raise ValueError(f"fd {sock.fileno()}: {unread} unread bytes, expected {size}")
    data = b""
    for _ in range(8):  # one peek returns every queued segment; repeat if it came up short
        if not size:
            return b""
        data = sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if len(data) == size:
            return data
    raise ValueError(f"fd {sock.fileno()}: peek returned {len(data)} of {size} unread bytes")


async def carry(loop: asyncio.AbstractEventLoop, host: socket.socket, mine: bytes,
                echo_len: int) -> None:
    """Send `mine`, meanwhile read exactly `echo_len` bytes; then send those back after it."""
    writer = asyncio.ensure_future(loop.sock_sendall(host, mine)) if mine else None
    try:
        theirs = await recv_exact(loop, host, echo_len) if echo_len else b""
        if writer is not None:
            await writer
    finally:
        if writer is not None and not writer.done():
            writer.cancel()
    if theirs:
        await loop.sock_sendall(host, theirs)


def peer_closed(sock: socket.socket) -> bool:
    """True if the other end closed (FIN or reset, even behind unread data); never consumes."""
    with contextlib.suppress(OSError):  # not TCP (a test's socketpair): the peek decides
        if TCP_STATES.get(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]) \
                in _GONE_STATES:
            return True
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return data == b""


class DataPath:
    """Runs `CheckQueues`, `Bounce` and `ProbeConn`.

    `hand_over(ref)` stops the EOF watch of a host socket (a bounce reads it from then on).
    """

    def __init__(self, wiring: Wiring, sockets: SocketTable, hand_over: Callable[[SockRef], None],
                 drain_wait: float, bounce_timeout: float) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.hand_over = hand_over
        self.drain_wait = drain_wait
        self.bounce_timeout = bounce_timeout

    def run(self, action: Action) -> None:
        """Start a check or a bounce (as tasks), or probe at once."""
        match action:
            case CheckQueues():
                self.wiring.spawn(self.check_queues(action))
            case Bounce():
                self.hand_over(action.host_sock)  # the bounce reads it now
                self.wiring.spawn(self.bounce(action))
            case ProbeConn():
                self.probe(action)
            case _:
                raise UnknownAction(self, action)

    async def check_queues(self, action: CheckQueues) -> None:
        """Queue sizes of the overlay socket, giving in-flight data a moment to drain.

        Bytes we sent that the other end has not acknowledged yet (its app may still be
        reading: it is not frozen before us in that order) usually drain within a few round
        trips. Bytes waiting in our own receive queue never will (our app is frozen): they
        are migrated (`Bounce`), or, with migration off, answered as busy at once.
        """
        feed = self.wiring.feed
        log.debug("check pid %d fd %d: start", action.pid, action.fd)
        sock = self.sockets.get(action.sock)
        if sock is None:
            log.debug("check pid %d fd %d: failed", action.pid, action.fd)
            feed(ActionFailed(action.ref, f"socket {action.sock} is gone"))
            return
        deadline = time.monotonic() + self.drain_wait
        try:
            recv, send = queue_sizes(sock)
            engine = self.wiring.engine
            migrate = engine is not None and engine.config.migrate
            while send and (migrate or not recv) and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
                recv, send = queue_sizes(sock)
        except OSError as exc:
            log.debug("check pid %d fd %d: failed", action.pid, action.fd)
            feed(ActionFailed(action.ref, f"queue sizes: {exc}"))
            return
        acked: int | None = None
        received: int | None = None
        with contextlib.suppress(OSError):
            info = tcp_info(sock)
            acked, received = info.bytes_acked, info.bytes_received
        log.debug("check pid %d fd %d: done (send %d, recv %d)", action.pid, action.fd, send, recv)
        feed(QueuesChecked(action.ref, send, recv, acked, received))

    async def bounce(self, action: Bounce) -> None:
        """Write our unread overlay bytes (peeked) to the host socket; echo the peer's."""
        feed, counters = self.wiring.feed, self.wiring.counters
        log.debug("bounce %d+%d bytes: start", action.send_len, action.echo_len)
        overlay, host = self.sockets.get(action.overlay_sock), self.sockets.held(action.host_sock)
        if overlay is None or host is None:
            feed(ActionFailed(action.ref, f"bounce: socket {action.overlay_sock} or "
                                          f"{action.host_sock} is gone"))
            return
        loop = self.wiring.running_loop
        started = time.monotonic()
        try:
            mine = peek_unread(overlay, action.send_len)
            await asyncio.wait_for(carry(loop, host, mine, action.echo_len), self.bounce_timeout)
        except (OSError, EOFError, TimeoutError, ValueError) as exc:
            counters["bounce_failed"] += 1
            log.debug("bounce %d+%d bytes: failed", action.send_len, action.echo_len)
            feed(ActionFailed(action.ref, f"bounce of {action.send_len}+{action.echo_len} "
                                          f"bytes: {type(exc).__name__}: {exc}"))
            return
        counters["bounces"] += 1
        counters["bounced_bytes"] += action.send_len
        log.debug("bounce %d+%d bytes: done in %.1f ms", action.send_len, action.echo_len,
                  (time.monotonic() - started) * 1e3)
        feed(BounceDone(action.ref))

    def probe(self, action: ProbeConn) -> None:
        """Whether the other end closed either connection (peeked; the result comes next turn)."""
        overlay, host = self.sockets.get(action.overlay_sock), self.sockets.get(action.host_sock)
        self.wiring.later(ConnProbed(action.ref, overlay is None or peer_closed(overlay),
                                     host is None or peer_closed(host)))
