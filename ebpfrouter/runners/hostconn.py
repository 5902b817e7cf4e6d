"""Host connections: host listeners (server side), host connects (client side), EOF watch.

Server side: for each overlay listener a host listener of the same family on HOST_IF
(`OpenHostListener`); each connection it accepts must first send one authenticated `bind`
frame, read exactly (never a byte of application data behind it), and becomes `HostAccepted`.
Client side: `HostConnect` binds a socket of the app's family to HOST_IF, connects to the
peer's host listener and sends that frame. Until a host socket is handed over, `HostWatch`
reports the other end closing it as `HostClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from injector.errors import InjectorError
from injector.inspect import copy_socket

from ..engine.actions import Action, HostConnect, OpenHostListener
from ..engine.events import (
    ActionFailed,
    HostAccepted,
    HostClosed,
    HostConnected,
    HostListenerOpened,
    SockRef,
)
from ..peers import Codec, ProtocolError
from ..peers.wire import HEADER
from ..scoping import NodeScope, normalize_addr
from ..socktable import SocketTable
from ..wiring import Wiring
from . import UnknownAction
from .datapath import peer_closed, recv_exact

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # connecting to a peer's host listener


def host_sockaddr(family: int, addr: str, port: int) -> tuple[str, int]:
    """`(addr, port)` for a socket of `family`: IPv4 `addr` v4-mapped for an AF_INET6 one."""
    if family == socket.AF_INET6 and ipaddress.ip_address(addr).version == 4:
        return f"::ffff:{addr}", port
    return addr, port


def host_socket(family: int) -> socket.socket:
    """A TCP socket for a host connection or listener; AF_INET6 ones are dual-stack.

    A swap hands the app a host socket of its own socket's family: a dual-stack app (Go,
    Java, `dualstack_ipv6=True`, nginx `listen [::]`) keeps an AF_INET6 socket that talks
    IPv4 through v4-mapped addresses (`::ffff:<host ip>`), so `getsockname()` still returns a
    sockaddr_in6 and IPPROTO_IPV6 options still work.
    """
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"host socket of family {family}: only AF_INET and AF_INET6")
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            sock.close()
            raise
    return sock


class HostWatch:
    """Reports EOF or reset on held host sockets as `HostClosed`, until they are handed over
    (to a bounce, which reads them, or to the app)."""

    def __init__(self, wiring: Wiring, sockets: SocketTable) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.refs: set[SockRef] = set()  # watched now

    def watch(self, ref: SockRef) -> None:
        """Watch held host socket `ref`."""
        self.wiring.running_loop.add_reader(ref, self._readable, ref)
        self.refs.add(ref)

    def unwatch(self, ref: SockRef) -> None:
        """Stop watching `ref` (nothing if it is not watched)."""
        if ref in self.refs:
            self.refs.discard(ref)
            if self.wiring.loop is not None:
                with contextlib.suppress(Exception):
                    self.wiring.loop.remove_reader(ref)

    def forget(self, ref: SockRef) -> None:
        """`ref` is being closed (its reader goes with it)."""
        self.refs.discard(ref)

    def unwatch_all(self) -> None:
        """Stop every watch (shutdown)."""
        for ref in list(self.refs):
            self.unwatch(ref)

    def _readable(self, ref: SockRef) -> None:
        """A watched host socket is readable: the other end closed it, or a swap has begun."""
        self.unwatch(ref)  # either way: stop watching (no busy loop behind unread data)
        sock = self.sockets.held(ref)
        if sock is None:
            return
        if peer_closed(sock):
            self.wiring.counters["host_closed_seen"] += 1
            self.wiring.feed(HostClosed(ref))
        else:  # bytes before the handover: a bounce under way; its own timeouts cover it
            self.wiring.counters["host_watch_data"] += 1


BindHook = Callable[[SockRef, dict[str, Any]], Coroutine[Any, Any, None]]


class HostConnections:
    """Runs `OpenHostListener` and `HostConnect`; `codec` is set at start.

    `after_bind(listener, bind)` runs after each `HostAccepted` (node scoping looks for an
    accept the tracer missed).
    """

    def __init__(self, wiring: Wiring, sockets: SocketTable, scope: NodeScope,
                 watch: HostWatch, bind_timeout: float,
                 after_bind: BindHook | None = None) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.scope = scope
        self.watch = watch
        self.bind_timeout = bind_timeout
        self.after_bind = after_bind
        self.codec: Codec | None = None
        self.listen_tasks: dict[SockRef, asyncio.Task[None]] = {}  # accept loop per listener
        sockets.on_close.append(self._closing)

    def run(self, action: Action) -> None:
        """Open a host listener now, or start a host connect."""
        match action:
            case OpenHostListener():
                self.open_listener(action)
            case HostConnect():
                self.wiring.spawn(self.connect(action))
            case _:
                raise UnknownAction(self, action)

    def _closing(self, ref: SockRef) -> None:
        self.watch.forget(ref)
        task = self.listen_tasks.pop(ref, None)
        if task is not None:
            task.cancel()

    # -- host listeners (server side) ----------------------------------------------------------

    def open_listener(self, action: OpenHostListener) -> None:
        """A host listener of the overlay listener's family: what it accepts replaces what
        the app accepts (AF_INET6: dual-stack, bound to `::ffff:<host ip>`)."""
        host_addr = self.scope.host_addr
        family = self._listener_family(action)
        sock = None
        for port in (action.port_hint, 0):
            sock = host_socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(host_sockaddr(family, host_addr, port))
                sock.listen(1024)
                break
            except OSError as exc:
                sock.close()
                sock = None
                if port == 0:
                    self.wiring.later(ActionFailed(action.ref, f"host listener on {host_addr}: "
                                                               f"{exc.strerror or exc}"))
                    return
        assert sock is not None
        sock.setblocking(False)
        ref = self.sockets.add(sock)
        host_port = sock.getsockname()[1]
        self.listen_tasks[ref] = asyncio.ensure_future(self._accept_loop(ref, sock))
        self.wiring.counters["host_listeners"] += 1
        self.wiring.later(HostListenerOpened(action.ref, ref, host_addr, host_port))

    def _listener_family(self, action: OpenHostListener) -> int:
        """Family of the overlay listener `action` is for (AF_INET if it is gone)."""
        try:
            with copy_socket(action.pid, action.fd) as sock:
                return sock.family
        except (InjectorError, OSError) as exc:
            log.info("pid %d fd %d: cannot copy the listener: %s", action.pid, action.fd, exc)
            return socket.AF_INET

    async def _accept_loop(self, ref: SockRef, listener: socket.socket) -> None:
        loop = self.wiring.running_loop
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                log.warning("host listener %s: accept: %s", listener.getsockname(), exc)
                await asyncio.sleep(0.1)
                continue
            self.wiring.spawn(self.read_bind(ref, conn, str(normalize_addr(address[0]))))

    async def read_bind(self, listener: SockRef, conn: socket.socket, peer_addr: str) -> None:
        """Read exactly the `bind` frame (never a byte of application data behind it)."""
        loop, codec = self.wiring.running_loop, self.codec
        assert codec is not None
        conn.setblocking(False)
        try:
            header = await asyncio.wait_for(recv_exact(loop, conn, HEADER.size),
                                            self.bind_timeout)
            length = codec.frame_length(header)
            payload = await asyncio.wait_for(recv_exact(loop, conn, length), self.bind_timeout)
            msg = codec.decode_payload(payload)
            if msg.type != "bind":
                codec.rejected["not_bind"] += 1
                raise ProtocolError(f"first frame was {msg.type}, expected bind")
        except (ProtocolError, OSError, EOFError, TimeoutError) as exc:
            self.wiring.counters["host_conn_rejected"] += 1
            log.warning("host connection from %s: %s: %s; closed", peer_addr,
                        type(exc).__name__, exc)
            conn.close()
            return
        if peer_addr not in self.scope.peer_hosts():
            log.info("host connection from %s: not a known peer node", peer_addr)
        ref = self.sockets.add(conn)
        self.watch.watch(ref)
        self.wiring.feed(HostAccepted(listener, ref, os.fstat(conn.fileno()).st_ino, peer_addr,
                                      msg.body))
        if self.after_bind is not None:
            await self.after_bind(listener, msg.body)

    # -- host connect (client side) ------------------------------------------------------------

    async def connect(self, action: HostConnect) -> None:
        """Connect to the peer's host listener with a socket of the app's family."""
        loop, codec = self.wiring.running_loop, self.codec
        assert codec is not None and self.wiring.engine is not None
        overlay = self.sockets.get(action.overlay_sock) if action.overlay_sock is not None \
            else None
        family = overlay.family if overlay is not None else socket.AF_INET
        sock = None
        try:
            sock = host_socket(family)
            sock.setblocking(False)
            sock.bind(host_sockaddr(family, self.scope.host_addr, 0))
            await asyncio.wait_for(loop.sock_connect(
                sock, host_sockaddr(family, action.host_addr, action.host_port)),
                CONNECT_TIMEOUT)
            await loop.sock_sendall(sock, codec.encode("bind", action.bind))
        except (OSError, TimeoutError, ValueError) as exc:
            if sock is not None:
                sock.close()
            self.wiring.counters["host_connect_failed"] += 1
            self.wiring.feed(ActionFailed(action.ref, f"host connect to {action.host_addr}:"
                                                      f"{action.host_port}: {exc}"))
            return
        ref = self.sockets.add(sock)
        self.watch.watch(ref)
        self.wiring.feed(HostConnected(action.ref, ref, os.fstat(sock.fileno()).st_ino))
