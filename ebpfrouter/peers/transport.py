"""Peer transport over TCP (asyncio): a server that receives, a client that sends and reconnects.

Each daemon runs one `PeerServer` on ROUTER_PORT and one `PeerClient` per known peer. The first
frame on a connection must be a `hello`; every bad frame is counted (per reason, in the codec)
and closes that connection only — the server keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ProtocolError, Truncated
from .messages import Message
from .wire import HEADER, Codec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """Who sent a message: the node named in its hello and the TCP source address."""

    node: str
    host_addr: str
    address: tuple[str, int]


MessageHandler = Callable[[PeerInfo, Message], Awaitable[None] | None]


async def read_message(
    reader: asyncio.StreamReader, codec: Codec, timeout: float | None
) -> Message:
    """Read exactly one frame and decode it; `ProtocolError` on anything wrong, EOFError on EOF."""
    try:
        header = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EOFError from None
        codec.rejected[Truncated.counter] += 1
        raise Truncated("stream ended inside a frame header") from None
    length = codec.frame_length(header)
    try:
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
    except asyncio.IncompleteReadError:
        codec.rejected[Truncated.counter] += 1
        raise Truncated(f"stream ended inside a frame of {length} bytes") from None
    except TimeoutError:
        codec.rejected[Truncated.counter] += 1
        raise Truncated(f"frame of {length} bytes not completed in {timeout}s") from None
    return codec.decode_payload(payload)


class PeerServer:
    """Accepts peer connections and hands each authenticated message to `on_message`."""

    def __init__(self, codec: Codec, on_message: MessageHandler, host: str = "0.0.0.0",
                 port: int = 1234, handshake_timeout: float = 10.0,
                 max_connections: int = 256,
                 on_disconnect: Callable[[PeerInfo], None] | None = None) -> None:
        self.codec = codec
        self.on_message = on_message
        self.on_disconnect = on_disconnect
        self.host = host
        self.port = port
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.stats: collections.Counter[str] = collections.Counter()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen; `port` is updated with the bound port (useful with port 0)."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(exc.errno, f"peer server cannot listen on {self.host}:{self.port}: "
                          f"{exc.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @property
    def rejected(self) -> collections.Counter[str]:
        """Rejected frames per reason (shared with the codec)."""
        return self.codec.rejected

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        address = writer.get_extra_info("peername")[:2]
        peer: PeerInfo | None = None
        try:
            if len(self._tasks) > self.max_connections:
                self.stats["refused_too_many"] += 1
                return
            self.stats["connections"] += 1
            hello = await read_message(reader, self.codec, self.handshake_timeout)
            if hello.type != "hello":
                self.codec.rejected["no_hello"] += 1
                raise ProtocolError(f"first message was {hello.type}, expected hello")
            peer = PeerInfo(hello.body["node"], hello.body["host_addr"], address)
            self.stats["hellos"] += 1
            await self._deliver(peer, hello)
            while True:
                msg = await read_message(reader, self.codec, None)
                if msg.type == "hello":
                    self.codec.rejected["repeated_hello"] += 1
                    raise ProtocolError("hello repeated on an established connection")
                await self._deliver(peer, msg)
        except (EOFError, asyncio.CancelledError):
            pass
        except TimeoutError:
            self.codec.rejected["handshake_timeout"] += 1
            log.warning("peer %s:%d: no hello within %ss", *address, self.handshake_timeout)
        except ProtocolError as exc:
            log.warning("peer %s:%d: %s: %s; closing", *address, type(exc).__name__, exc)
        except (ConnectionError, OSError) as exc:
            log.info("peer %s:%d: %s", *address, exc)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(BaseException):
                await writer.wait_closed()
            if peer is not None and self.on_disconnect is not None:
                self.on_disconnect(peer)

    async def _deliver(self, peer: PeerInfo, msg: Message) -> None:
        result = self.on_message(peer, msg)
        if asyncio.iscoroutine(result):
            await result


class PeerClient:
    """Keeps one connection to a peer's server, with exponential backoff; sends in order."""

    def __init__(self, codec: Codec, host: str, port: int, hello: dict[str, Any],
                 backoff_min: float = 0.05, backoff_max: float = 5.0, queue_limit: int = 10000,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.codec = codec
        self.host = host
        self.port = port
        self.hello = hello
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.on_state = on_state
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(queue_limit)
        self.connected = asyncio.Event()
        self.stats: collections.Counter[str] = collections.Counter()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the connect/send loop in the background."""
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop the loop and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def send(self, msg_type: str, body: dict[str, Any]) -> None:
        """Queue a message (validated now, so a bad body fails at the caller)."""
        self.codec.encode(msg_type, body)  # schema check; the frame is rebuilt at send time
        try:
            self.queue.put_nowait((msg_type, body))
        except asyncio.QueueFull:
            self.stats["dropped_queue_full"] += 1
            raise

    async def _run(self) -> None:
        delay = self.backoff_min
        while True:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(self.codec.encode("hello", self.hello))
                await writer.drain()
                self.stats["connects"] += 1
                self.connected.set()
                if self.on_state is not None:
                    self.on_state(True)
                delay = self.backoff_min
                eof = asyncio.ensure_future(reader.read(1))  # the server never talks back
                try:
                    while True:
                        get = asyncio.ensure_future(self.queue.get())
                        await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                        if not get.done():
                            get.cancel()
                            raise ConnectionResetError("peer closed the connection")
                        msg_type, body = get.result()
                        writer.write(self.codec.encode(msg_type, body))
                        await writer.drain()
                        self.stats["sent"] += 1
                finally:
                    eof.cancel()
            except (ConnectionError, OSError) as exc:
                self.stats["failures"] += 1
                log.info("peer %s:%d: %s; retrying in %.2fs", self.host, self.port, exc, delay)
            finally:
                if writer is not None:
                    writer.close()
                if self.connected.is_set():
                    self.connected.clear()
                    if self.on_state is not None:
                        self.on_state(False)
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, self.backoff_max)
