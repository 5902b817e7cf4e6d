"""Overlay listeners: ours (each with a host listener, announced to every peer) and the
peers' announcements (where to connect for an overlay address)."""

from __future__ import annotations

import logging
from typing import Any

from .actions import CloseSocket, OpenHostListener, SendPeer
from .conn import Listener
from .core import Core
from .events import HostListenerOpened, ListenTraced, SockRef
from .keys import ListenerOpening

log = logging.getLogger("ebpfrouter.engine.machine")

RemoteListener = tuple[str, str, int]  # (peer node, host addr, host port)


class ListenerBook:
    """Local listeners by holder (pid, fd); peers' announcements by overlay (addr, port)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.local: dict[tuple[int, int], Listener] = {}
        self.remote: dict[tuple[str, int], RemoteListener] = {}

    def traced(self, ev: ListenTraced) -> None:
        """A local pod listens: open a host listener for it (one per overlay addr:port)."""
        core = self.core
        if core.policy.peer_of(ev.addr) != core.node:
            core.stats["listen_not_local_overlay"] += 1
            return
        if any((lst.addr, lst.port) == (ev.addr, ev.port) for lst in self.local.values()):
            core.stats["listen_duplicate"] += 1
            return
        listener = Listener(ev.pid, ev.fd, ev.addr, ev.port, ref=0)
        listener.ref = core.ref(ListenerOpening((ev.pid, ev.fd)))
        self.local[(ev.pid, ev.fd)] = listener
        core.emit(OpenHostListener(listener.ref, ev.addr, ev.port, port_hint=ev.port,
                                   pid=ev.pid, fd=ev.fd))

    def opened(self, ev: HostListenerOpened) -> None:
        """The host listener is up: announce it (or close it: the listener went away)."""
        core = self.core
        subject = core.take_ref(ev.ref)
        listener = (self.local.get(subject.key) if isinstance(subject, ListenerOpening)
                    else None)
        if listener is None or listener.ref != ev.ref:
            core.emit(CloseSocket(ev.sock))
            return
        listener.sock, listener.host_addr, listener.host_port = ev.sock, ev.host_addr, ev.host_port
        core.stats["listeners_announced"] += 1
        core.emit(SendPeer(None, "listener_add", listener.announcement()))

    def open_failed(self, subject: ListenerOpening, ref: int, reason: str) -> None:
        """The host listener could not be opened: the overlay listener is not announced."""
        listener = self.local.get(subject.key)
        if listener is not None and listener.ref == ref:
            del self.local[subject.key]
            self.core.stats["host_listener_failed"] += 1
            log.warning("host listener for %s:%d: %s", listener.addr, listener.port, reason)

    def drop(self, key: tuple[int, int]) -> None:
        """The overlay listener closed: close its host listener, tell the peers."""
        listener = self.local.pop(key)
        self.core.refs.pop(listener.ref, None)
        if listener.sock is not None:
            self.core.emit(CloseSocket(listener.sock))
            self.core.emit(SendPeer(None, "listener_remove",
                                    {"overlay_addr": listener.addr,
                                     "overlay_port": listener.port}))

    def closed(self, pid: int, fd: int) -> None:
        """`pid` closed `fd` (maybe a listener)."""
        if (pid, fd) in self.local:
            self.drop((pid, fd))

    def exited(self, pid: int) -> None:
        """`pid` is gone: so are its listeners."""
        for key in [k for k in self.local if k[0] == pid]:
            self.drop(key)

    def moved(self, old: tuple[int, int], new: tuple[int, int]) -> bool:
        """The listener held at `old` lives on at `new` (pre-forked workers, a daemonizing
        server whose parent exits)."""
        listener = self.local.pop(old, None)
        if listener is None:
            return False
        listener.pid, listener.fd = new
        self.local[new] = listener
        if listener.ref in self.core.refs:
            self.core.refs[listener.ref] = ListenerOpening(new)
        return True

    def announce_to(self, peer: str) -> None:
        """A peer came up: tell it every announced listener."""
        for listener in self.local.values():
            if listener.sock is not None:
                self.core.emit(SendPeer(peer, "listener_add", listener.announcement()))

    def announced(self, peer: str, body: dict[str, Any]) -> tuple[str, int] | None:
        """A peer's `listener_add`: remember where to connect; the overlay (addr, port) it
        names, or None if refused."""
        core = self.core
        key = (body["overlay_addr"], body["overlay_port"])
        if core.policy.peer_of(key[0]) != peer or peer == core.node:
            core.stats["foreign_listener_rejected"] += 1
            return None
        if key not in self.remote and len(self.remote) >= core.config.max_remote_listeners:
            # An authenticated peer can still flood announcements: keep what we have, refuse
            # the new one (its connections simply stay on the overlay) and count it.
            core.stats["remote_listeners_full"] += 1
            return None
        self.remote[key] = (peer, body["host_addr"], body["host_port"])
        return key

    def withdrawn(self, peer: str, body: dict[str, Any]) -> None:
        """A peer's `listener_remove`."""
        key = (body["overlay_addr"], body["overlay_port"])
        entry = self.remote.get(key)
        if entry is None or entry[0] != peer:
            self.core.stats["foreign_listener_rejected"] += 1
            return
        del self.remote[key]

    def by_host_sock(self, sock: SockRef) -> Listener | None:
        """Our listener whose host listener is `sock`."""
        return next((lst for lst in self.local.values() if lst.sock == sock), None)

    def pids_of(self, sock: SockRef) -> set[int]:
        """The processes holding the overlay listener behind host listener `sock`."""
        return {lst.pid for lst in self.local.values() if lst.sock == sock}

    def table(self) -> list[dict[str, Any]]:
        """One line per overlay listener and its host listener, for `status`."""
        return [{"overlay": f"{lst.addr}:{lst.port}", "host": f"{lst.host_addr}:{lst.host_port}",
                 "pid": lst.pid, "sock": lst.sock} for lst in self.local.values()]
