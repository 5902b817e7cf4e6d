"""Injection: freeze a process, put a host socket at its overlay fd, thaw it; resume an app
the tracer stopped for an eager swap.

Every ptrace operation runs on one dedicated thread (`InjectorThread`), because a ptrace
tracer is a thread: the thread that seized a process must be the one that drives it. Swaps of
one process may share one freeze: the thread counts holds, and thaws at the last one.

A process the tracer stopped (SIGSTOP at `connect()`/`accept()` return) stays in group-stop
when it is thawed (detached): `Resume` sends it SIGCONT, on the same thread, after its last
thaw. Each replaced socket is registered for address virtualization (`ebpfrouter.addrvirt`)
while the app is still frozen, so its first `getpeername()` already answers the overlay peer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from injector.errors import InjectorError

from ..addrvirt import AddressVirtualizer
from ..engine.actions import Action, Freeze, NoteForgotten, ReplaceFd, Resume, Thaw
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

    def __init__(self, freeze_timeout: float,
                 on_resumed: Callable[[int], None] | None = None) -> None:
        """`on_resumed(pid)` hears of every SIGCONT sent (the tracer forgets the stop)."""
        self.freeze_timeout = freeze_timeout
        self.on_resumed = on_resumed
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="injector")
        self.frozen: dict[int, tuple[Any, Any, int]] = {}  # pid -> (context, proc, holds)
        self.freeze_ns: collections.deque[int] = collections.deque(maxlen=1000)
        self._since: dict[int, int] = {}
        self.resume_at_thaw: set[int] = set()  # stopped pids to resume once thawed
        self.resumes = 0

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
        if pid in self.resume_at_thaw:
            self.resume_at_thaw.discard(pid)
            self._sigcont(pid)
        started = self._since.pop(pid, None)
        if started is not None:
            held = time.monotonic_ns() - started
            self.freeze_ns.append(held)
            if held > 500_000_000:
                log.warning("pid %d was frozen for %.0f ms", pid, held / 1e6)

    def resume(self, pid: int) -> None:
        """End the tracer's stop of `pid` (SIGCONT), at once or after its last thaw: a seized
        process must not be woken under the injector's feet."""
        if pid in self.frozen:
            self.resume_at_thaw.add(pid)
            return
        self._sigcont(pid)

    def _sigcont(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        self.resumes += 1
        if self.on_resumed is not None:
            try:
                self.on_resumed(pid)
            except Exception as exc:  # noqa: BLE001 - bookkeeping must not stop resumes
                log.warning("pid %d resumed; forgetting its stop: %s", pid, exc)

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
        """Resume every frozen process (and every stopped one waiting for its thaw)."""
        for pid in list(self.frozen):
            self.thaw(pid, force=True)
        for pid in list(self.resume_at_thaw):
            self.resume_at_thaw.discard(pid)
            self._sigcont(pid)

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
                 hand_over: Callable[[SockRef], None],
                 virtualizer: AddressVirtualizer | None = None) -> None:
        self.wiring = wiring
        self.sockets = sockets
        self.injector = injector
        self.hand_over = hand_over
        self.virtualizer = virtualizer  # None: apps see host addresses after a swap
        self.cookies: dict[bytes, int] = {}  # connection id -> its virtualized socket's cookie

    def run(self, action: Action) -> None:
        """Submit a freeze, thaw or replace to the injector thread."""
        match action:
            case Freeze() if self.wiring.draining:
                self.wiring.later(ActionFailed(action.ref, "the router is shutting down"))
            case Freeze():
                self._call(action.ref, FreezeDone(action.ref), self.injector.freeze, action.pid)
            case Thaw():
                self.thaw(action)
            case Resume():
                self.injector.submit(self.injector.resume, action.pid)
            case NoteForgotten():
                self.injector.submit(self.unvirtualize, action.cid)
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
            self.virtualize(action, sock)  # (the app is still frozen)

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

    def virtualize(self, action: ReplaceFd, sock: socket.socket) -> None:
        """Register the socket just installed (its overlay addresses), or forget the
        connection's entry when the overlay socket was put back. Injector thread."""
        if action.overlay_local is None or action.overlay_peer is None:
            self.unvirtualize(action.cid)
            return
        if self.virtualizer is None:
            return
        try:
            self.cookies[action.cid] = self.virtualizer.add(sock, action.overlay_local,
                                                            action.overlay_peer)
            self.wiring.counters["virtualized"] += 1
        except (OSError, ValueError, RuntimeError) as exc:  # full, or refused: host addresses
            self.wiring.counters["virtualize_failed"] += 1
            log.warning("address virtualization of %s: %s", action.overlay_local, exc)

    def unvirtualize(self, cid: bytes) -> None:
        """The connection ended (or went back to the overlay): drop its entry."""
        cookie = self.cookies.pop(cid, None)
        if cookie is not None and self.virtualizer is not None:
            with contextlib.suppress(OSError):
                self.virtualizer.remove(cookie)

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
