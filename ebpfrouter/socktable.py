"""The daemon's own copies of sockets, behind the handles (`SockRef`) the engine is given.

A traced socket is not copied when it is seen: `copy_later` records `(pid, fd, inode)` and
`get` takes the `pidfd_getfd` copy (inode checked) the first time something needs it, so a
connection that closes young costs no copy and its FIN is not held back by one. Host sockets
and listeners the daemon made are added as they are (`add`); their handle is their fd.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
from collections.abc import Callable

from injector.errors import InjectorError
from injector.inspect import copy_socket
from injector.netns import netns_inode

from .engine.events import SockRef
from .wiring import Wiring

log = logging.getLogger(__name__)


class SocketTable:
    """Handles to sockets: copied ones (`socks`) and traced ones not copied yet (`uncopied`).

    `in_scope(netns)` says whether a netns holds this node's pods (for the uninspectable
    note); `on_close` hooks run before a handle is closed (stop watching, stop accepting).
    """

    def __init__(self, wiring: Wiring, in_scope: Callable[[int | None], bool]) -> None:
        self.wiring = wiring
        self.in_scope = in_scope
        self.socks: dict[SockRef, socket.socket] = {}
        self.uncopied: dict[SockRef, tuple[int, int, int]] = {}  # ref -> (pid, fd, inode)
        self.uninspectable: dict[int, str] = {}  # pid -> why it cannot be inspected (logged
        # once per pid; see `note_uninspectable`)
        self.on_close: list[Callable[[SockRef], None]] = []
        self._refs = itertools.count(-1, -1)  # never an fd number
        self._unreferenced: set[SockRef] = set()

    def copy_later(self, pid: int, fd: int, inode: int) -> SockRef:
        """A handle for a traced socket; the copy itself is taken on first use."""
        ref = next(self._refs)
        self.uncopied[ref] = (pid, fd, inode)
        return ref

    def add(self, sock: socket.socket) -> SockRef:
        """A handle for a socket the daemon made (a host connection or listener)."""
        ref = sock.fileno()
        self.socks[ref] = sock
        return ref

    def held(self, ref: SockRef) -> socket.socket | None:
        """The socket behind `ref` if it is copied (never copies)."""
        return self.socks.get(ref)

    def get(self, ref: SockRef) -> socket.socket | None:
        """The daemon's copy of a socket, taken now if it was not yet (None: it is gone)."""
        sock = self.socks.get(ref)
        if sock is None and ref in self.uncopied:
            pid, fd, inode = self.uncopied.pop(ref)
            try:
                sock = copy_socket(pid, fd, inode)
            except (InjectorError, OSError) as exc:
                self.wiring.counters["copy_failed"] += 1
                if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
                    self.note_uninspectable(pid, exc)
                log.info("pid %d fd %d: cannot copy the socket: %s", pid, fd, exc)
                return None
            self.socks[ref] = sock
        return sock

    def close(self, ref: SockRef) -> None:
        """Let go of `ref` (a traced socket not copied yet is simply forgotten)."""
        if self.uncopied.pop(ref, None) is not None:
            return
        for hook in self.on_close:
            hook(ref)
        sock = self.socks.pop(ref, None)
        if sock is not None:
            if self.wiring.loop is not None:
                with contextlib.suppress(Exception):
                    self.wiring.loop.remove_reader(ref)
            sock.close()

    def close_all(self) -> None:
        """Close every copy (shutdown)."""
        for sock in self.socks.values():
            with contextlib.suppress(OSError):
                sock.close()
        self.socks.clear()
        self.uncopied.clear()

    def moved(self, pid: int, fd: int, new_pid: int, new_fd: int) -> None:
        """The socket at `pid`/`fd` lives on at `new_pid`/`new_fd`: copy it from there."""
        for ref, (p, f, ino) in list(self.uncopied.items()):
            if (p, f) == (pid, fd):
                self.uncopied[ref] = (new_pid, new_fd, ino)

    def collect(self, held: set[SockRef]) -> None:
        """Close handles not in `held` (the engine's) two collections in a row: copies the
        engine dropped without a `CloseSocket`."""
        unreferenced = (set(self.socks) | set(self.uncopied)) - held
        for ref in unreferenced & self._unreferenced:
            self.wiring.counters["socks_collected"] += 1
            self.close(ref)
        self._unreferenced = unreferenced

    def note_uninspectable(self, pid: int, exc: OSError) -> None:
        """Count and log (once per pid) a process whose fds the router may not read."""
        if pid in self.uninspectable:
            return
        try:
            uid: int | str = os.stat(f"/proc/{pid}").st_uid
            netns: int | None = netns_inode(pid)
        except OSError:
            uid, netns = "?", None
        if not self.in_scope(netns):
            return  # not one of this node's pods: none of our business
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.uninspectable[pid] = name
        if len(self.uninspectable) > 4096:  # remembered to log once, not for ever
            self.uninspectable.pop(next(iter(self.uninspectable)))
        self.wiring.counters["uninspectable"] += 1
        log.warning("pid %d (uid %s): cannot inspect its sockets: %s (%s); its connections "
                    "stay on the overlay%s", pid, uid, name, exc.strerror or exc,
                    " (the router was started without the capabilities it needs: "
                    "see docs/kubernetes.md, Capabilities)"
                    if exc.errno in (errno.EACCES, errno.EPERM) else "")
