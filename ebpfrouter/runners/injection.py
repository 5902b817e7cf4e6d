"""Injection: freeze a process, put a host socket at its overlay fd, thaw it.

Every ptrace operation runs on one dedicated thread (`InjectorThread`), because a ptrace
tracer is a thread: the thread that seized a process must be the one that drives it. Swaps of
one process may share one freeze: the thread counts holds, and thaws at the last one.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from injector.errors import InjectorError

from ..engine.actions import Action, Freeze, ReplaceFd, Thaw
from ..engine.events import ActionFailed, Event, FreezeDone, ReplaceDone, SockRef
from ..socktable import SocketTable
from ..wiring import Wiring
from . import UnknownAction

log = logging.getLogger(__name__)


def family_name(what: socket.socket | int | None) -> str | None:
    """'inet' / 'inet6' for a socket or a family number (None for None)."""
    if what is None:
        return None
    family = int(what.family if isinstance(what, socket.socket) else what)
    names: dict[int, str] = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
    return names.get(family, str(family))


class InjectorThread:
    """The one thread that freezes, replaces and thaws (ptrace is per tracer thread)."""

    def __init__(self, freeze_timeout: float) -> None:
        self.freeze_timeout = freeze_timeout
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="injector")
        self.frozen: dict[int, tuple[Any, Any, int]] = {}  # pid -> (context, proc, holds)
        self.freeze_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self._since: dict[int, int] = {}

    def freeze(self, pid: int) -> None:
        """Stop every thread of `pid` (or add a hold if it is frozen already)."""
        from injector.freeze import freeze

        if pid in self.frozen:
            ctx, proc, holds = self.frozen[pid]
            self.frozen[pid] = (ctx, proc, holds + 1)
            return
        ctx = freeze(pid, timeout=self.freeze_timeout)
        t0 = time.monotonic()
        proc = ctx.__enter__()
        if time.monotonic() - t0 > 0.2:
            log.warning("pid %d: freezing took %.0f ms", pid, (time.monotonic() - t0) * 1000)
        self.frozen[pid] = (ctx, proc, 1)
        self._since[pid] = time.monotonic_ns()

    def thaw(self, pid: int, force: bool = False) -> None:
        """Drop one hold on `pid`; resume it at the last one (or at once with `force`)."""
        entry = self.frozen.get(pid)
        if entry is None:
            return
        ctx, proc, holds = entry
        if holds > 1 and not force:
            self.frozen[pid] = (ctx, proc, holds - 1)
            return
        del self.frozen[pid]
        try:
            ctx.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001 - thaw must not fail the loop
            log.warning("pid %d: thaw: %s", pid, exc)
        started = self._since.pop(pid, None)
        if started is not None:
            held = time.monotonic_ns() - started
            self.freeze_ns.append(held)
            if held > 500_000_000:
                log.warning("pid %d was frozen for %.0f ms", pid, held / 1e6)

    def replace(self, pid: int, fd: int, sock: socket.socket, expected_inode: int) -> None:
        """Put `sock` at `fd` of frozen `pid` if `fd` still is `expected_inode`."""
        from injector.swap import replace_fd

        entry = self.frozen.get(pid)
        if entry is None:
            raise InjectorError(f"pid {pid} is not frozen (replace fd {fd})")
        old = replace_fd(pid, fd, sock, expected_inode=expected_inode,
                         timeout=self.freeze_timeout, proc=entry[1])
        old.close()

    def frozen_pids(self) -> list[int]:
        """Pids held frozen right now (read from any thread)."""
        for _ in range(10):
            with contextlib.suppress(RuntimeError):  # resized by the injector thread meanwhile
                return sorted(self.frozen)
        return []

    def thaw_all(self) -> None:
        """Resume every frozen process."""
        for pid in list(self.frozen):
            self.thaw(pid, force=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run `fn(*args)` on the injector thread."""
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        """Thaw everything (on the injector thread) and stop the thread."""
        with contextlib.suppress(RuntimeError):
            self.pool.submit(self.thaw_all).result(timeout=30)
        self.pool.shutdown(wait=True)


class Injection:
    """Runs `Freeze`, `Thaw` and `ReplaceFd` on the injector thread.

    `hand_over(ref)` stops the EOF watch of a host socket (the app owns it once replaced).
    """

    def __init__(self, wiring: Wiring, sockets: SocketTable, injector: InjectorThread,
                 hand_over: Callable[[SockRef], None]) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.injector = injector
        self.hand_over = hand_over

    def run(self, action: Action) -> None:
        """Submit a freeze, thaw or replace to the injector thread."""
        match action:
            case Freeze() if self.wiring.draining:
                self.wiring.later(ActionFailed(action.ref, "the router is shutting down"))
            case Freeze():
                self._call(action.ref, FreezeDone(action.ref), self.injector.freeze, action.pid)
            case Thaw():
                self.thaw(action)
            case ReplaceFd():
                self.replace(action)
            case _:
                raise UnknownAction(self, action)

    def thaw(self, action: Thaw) -> None:
        """Fire and forget: thaw failures are logged by the injector thread."""
        log.debug("injector thaw pid %d: start", action.pid)
        future = self.injector.submit(self.injector.thaw, action.pid)
        if log.isEnabledFor(logging.DEBUG):
            pid = action.pid

            def done(f: concurrent.futures.Future[Any]) -> None:
                log.debug("injector thaw pid %d: %s", pid, "failed" if f.exception() else "done")

            future.add_done_callback(done)

    def _call(self, ref: int, done: Event, fn: Callable[..., Any], *args: Any) -> None:
        log.debug("injector %s pid %s: start", fn.__name__, args[0])
        future = self.injector.submit(fn, *args)
        wrapped = asyncio.wrap_future(future, loop=self.wiring.running_loop)

        def finished(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                log.debug("injector %s pid %s: done", fn.__name__, args[0])
                self.wiring.feed(done)
            else:
                self.wiring.counters["injector_errors"] += 1
                log.debug("injector %s pid %s: failed", fn.__name__, args[0])
                log.info("%s: %s", fn.__name__, exc)
                self.wiring.feed(ActionFailed(ref, str(exc)))

        wrapped.add_done_callback(finished)

    def replace(self, action: ReplaceFd) -> None:
        """Hand the host socket over and replace the app's fd with it (same family only)."""
        self.hand_over(action.sock)  # handed over: the app owns it now
        sock = self.sockets.socks[action.sock]
        new_ino = os.fstat(sock.fileno()).st_ino
        pid, fd = action.pid, action.fd
        app_family = self._app_family(pid, fd)
        if app_family is not None and app_family != sock.family:
            # a host listener serves one family; an accept of the other family (two overlay
            # listeners of different families on one port) cannot be given one of its sockets
            self.wiring.counters["family_mismatch"] += 1
            self.wiring.later(ActionFailed(action.ref, f"replace pid {pid} fd {fd}: the app's "
                                                       f"socket is {family_name(app_family)}, "
                                                       f"the host socket "
                                                       f"{family_name(sock.family)}; a swap "
                                                       "would change its family"))
            return

        def work() -> None:
            self.injector.replace(pid, fd, sock, action.expected_inode)

        log.debug("injector replace pid %d fd %d: start", pid, fd)
        future = self.injector.submit(work)
        wrapped = asyncio.wrap_future(future, loop=self.wiring.running_loop)

        def finished(fut: asyncio.Future[Any]) -> None:
            exc = fut.exception()
            if exc is None:
                log.debug("injector replace pid %d fd %d: done", pid, fd)
                self._retrack(pid, fd, new_ino)
                self.wiring.feed(ReplaceDone(action.ref))
            else:
                self.wiring.counters["injector_errors"] += 1
                log.debug("injector replace pid %d fd %d: failed", pid, fd)
                log.info("replace pid %d fd %d: %s", pid, fd, exc)
                self.wiring.feed(ActionFailed(action.ref, str(exc)))

        wrapped.add_done_callback(finished)

    def _retrack(self, pid: int, fd: int, inode: int) -> None:
        """The tracer keys its tracked fds by (pid, fd) and does not see dup3: re-register."""
        tracer = self.wiring.tracer
        if tracer is not None:
            with contextlib.suppress(Exception):
                tracer.untrack(pid, fd)
            with contextlib.suppress(Exception):
                tracer.track(pid, fd, inode=inode)

    def _app_family(self, pid: int, fd: int) -> int | None:
        """Family of the app's overlay socket at `pid`/`fd` (our copy; None if unknown)."""
        ref = self.wiring.running_engine.overlay_sock_of(pid, fd)
        sock = self.sockets.get(ref) if ref is not None else None
        return sock.family if sock is not None else None
