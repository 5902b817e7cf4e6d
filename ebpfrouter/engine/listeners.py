"""Overlay listeners: ours (each with a host listener, announced to every peer) and the
peers' announcements (where to connect for an overlay address)."""

from __future__ import annotations

import collections
import logging
from typing import Any

from .actions import CloseSocket, EagerListener, EagerPeer, OpenHostListener, SendPeer
from .conn import Listener
from .core import Core
from .events import HostListenerOpened, ListenTraced, ShortLived, SockRef
from .keys import ListenerOpening

log = logging.getLogger("ebpfrouter.engine.machine")

RemoteListener = tuple[str, str, int]  # (peer node, host addr, host port)
# Eagerness lives in the tracer's kernel maps (`EagerListener`/`EagerPeer`): a connect to an
# eager remote listener, or an accept on an eager local one from a live peer's pod CIDR, stops
# its caller at the syscall's return. The book keeps those maps equal to what it knows.


class ListenerBook:
    """Local listeners by holder (pid, fd); peers' announcements by overlay (addr, port)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.local: dict[tuple[int, int], Listener] = {}
        self.remote: dict[tuple[str, int], RemoteListener] = {}
        self.remote_eager: set[tuple[str, int]] = set()  # remote listeners in the kernel map
        # (addr, port) of ours -> lifetimes of its recent connections (True: lived past
        # min_age), for `eager_mode` "auto"
        self.lifetimes: dict[tuple[str, int], collections.deque[bool]] = {}

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
        listener.eager = self._wanted((listener.addr, listener.port))
        if listener.eager:
            core.emit(EagerListener(listener.addr, listener.port, True, remote=False))
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
        if listener.eager:
            self.core.emit(EagerListener(listener.addr, listener.port, False, remote=False))
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
        """A peer came up: tell it every announced listener; its pods' accepts may be stopped."""
        if self.core.config.eager:
            self.core.emit(EagerPeer(peer, True))
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
        eager = body.get("eager") is True and core.config.eager
        if eager != (key in self.remote_eager):
            (self.remote_eager.add if eager else self.remote_eager.discard)(key)
            core.emit(EagerListener(key[0], key[1], eager, remote=True))
        return key

    def withdrawn(self, peer: str, body: dict[str, Any]) -> None:
        """A peer's `listener_remove`."""
        key = (body["overlay_addr"], body["overlay_port"])
        entry = self.remote.get(key)
        if entry is None or entry[0] != peer:
            self.core.stats["foreign_listener_rejected"] += 1
            return
        del self.remote[key]
        if key in self.remote_eager:
            self.remote_eager.discard(key)
            self.core.emit(EagerListener(key[0], key[1], False, remote=True))

    def peer_lost(self, peer: str) -> None:
        """`peer`'s router is unreachable: stop nothing on its account (its announcements are
        kept for when it is back; it sends them again)."""
        if self.core.config.eager:
            self.core.emit(EagerPeer(peer, False))
        for key in [k for k in self.remote_eager if self.remote[k][0] == peer]:
            self.remote_eager.discard(key)
            self.core.emit(EagerListener(key[0], key[1], False, remote=True))

    def outcome(self, key: tuple[str, int], long: bool) -> None:
        """A connection accepted on our listener `key` lived past `min_age` (``long``) or
        closed younger: learn whether its new connections should be swapped eagerly (a
        listener of short connections is not: each would cost both apps a stop)."""
        cfg = self.core.config
        if not cfg.eager or cfg.eager_mode != "auto":
            return
        seen = self.lifetimes.setdefault(key, collections.deque(maxlen=cfg.eager_window))
        seen.append(long)
        while len(self.lifetimes) > cfg.max_remote_listeners:
            self.lifetimes.pop(next(iter(self.lifetimes)))
        want = self._wanted(key)
        for lst in self.local.values():
            if (lst.addr, lst.port) == key and lst.sock is not None and lst.eager != want:
                lst.eager = want
                self.core.stats["eager_on" if want else "eager_off"] += 1
                self.core.emit(EagerListener(lst.addr, lst.port, want, remote=False))
                self.core.emit(SendPeer(None, "listener_add", lst.announcement()))

    def short_lived(self, ev: ShortLived) -> None:
        """Connections on our listener closed young in the kernel: each is a short outcome
        (more than a window's worth say no more than a window does)."""
        for _ in range(min(ev.count, self.core.config.eager_window)):
            self.outcome((ev.addr, ev.port), long=False)

    def _wanted(self, key: tuple[str, int]) -> bool:
        """Whether our listener `key` should be eager now: a rule's `swap=` wins, then
        `eager_mode` ("always", or learned)."""
        cfg = self.core.config
        if not cfg.eager:
            return False
        mode = self.core.policy.listener_mode(*key)
        if mode is not None:
            return mode == "eager"
        return cfg.eager_mode == "always" or self._learned(key)

    def refresh_modes(self) -> None:
        """The rules changed: re-decide every listener's mode (announced if it changed)."""
        for lst in self.local.values():
            want = self._wanted((lst.addr, lst.port))
            if lst.sock is not None and lst.eager != want:
                lst.eager = want
                self.core.emit(EagerListener(lst.addr, lst.port, want, remote=False))
                self.core.emit(SendPeer(None, "listener_add", lst.announcement()))

    def _learned(self, key: tuple[str, int]) -> bool:
        seen = self.lifetimes.get(key)
        if not seen:
            return False
        longs = sum(seen)
        return longs >= self.core.config.eager_after and (len(seen) - longs) * 4 <= len(seen)

    def eager_local(self, key: tuple[str, int]) -> bool:
        """Our listener at overlay (addr, port) stops its accepts."""
        return any(lst.eager and (lst.addr, lst.port) == key for lst in self.local.values())

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
