"""Seize and stop every thread of a process; give it back untouched.

``with freeze(pid) as proc:`` seizes each thread (PTRACE_SEIZE with TRACECLONE, so threads
born meanwhile are traced from their first instruction), interrupts it, and rescans
/proc/PID/task until no new thread appears. On leaving the block (normally, by exception,
timeout or KeyboardInterrupt) every thread gets its original registers and signal mask
back and is detached; detaching sends it through the kernel's signal path, so a syscall
our interrupt cut short restarts the kernel's way. A process that was already stopped
(SIGSTOP) stays stopped: the kernel puts a detached thread of a stopped group back into
group-stop.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from injector import ptrace as pt
from injector.arch import EINTR_ON_INTERRUPT, ERESTARTNOHAND
from injector.errors import FreezeTimeout, InjectorError, TargetGoneError
from injector.remote import RemoteProcess, ThreadState, copy_regs, to_signed

__all__ = ["FrozenProcess", "freeze", "release_orphans"]

log = logging.getLogger(__name__)

_THAW_WAIT = 1.0  # seconds to wait for one thread to reach a stop while thawing


class FrozenProcess(RemoteProcess):
    """A process whose threads are all in a ptrace-stop (see ``freeze``).

    ``pid``, ``tids``, ``syscall(name, *args, tid=None)``, ``scratch(size)``,
    ``read_memory(addr, n)`` and ``write_memory(addr, data)`` are the public surface.
    """

    def __init__(self, pid: int, timeout: float = 5.0) -> None:
        super().__init__(pid, timeout)
        self.was_stopped = False  # the process was in group-stop (SIGSTOP) when seized

    # -- freezing ----------------------------------------------------------------------

    def _freeze(self) -> None:
        if self.pid == os.getpid():
            raise InjectorError(f"pid {self.pid}: a process cannot freeze itself")
        deadline = time.monotonic() + self.timeout
        while True:
            new = [t for t in pt.list_tids(self.pid) if t not in self._threads]
            for tid in new:
                self._seize(tid)
            self._collect(deadline)
            if not new:
                break
        if not self.tids:
            raise TargetGoneError(self.pid, None, "exited while freezing")

    def _seize(self, tid: int) -> None:
        state = ThreadState(tid)
        self._threads[tid] = state
        try:
            pt.seize(tid)
        except OSError as exc:
            if exc.errno == errno.ESRCH or pt.thread_state(self.pid, tid) in (None, "Z", "X"):
                state.gone = True  # exited (or a zombie leader): nothing to freeze
                return
            del self._threads[tid]
            raise InjectorError(
                f"pid {self.pid} tid {tid}: cannot seize: {exc.strerror}"
                + (" (already traced?)" if exc.errno == errno.EPERM else "")
            ) from exc
        with suppress(ProcessLookupError, OSError):
            pt.interrupt(tid)

    def _collect(self, deadline: float) -> None:
        """Wait until every seized thread sits in a PTRACE_EVENT_STOP (or has exited)."""
        while True:
            waiting = [s for s in self._threads.values() if not s.stopped and not s.gone]
            if not waiting:
                return
            for state in waiting:
                self._wait_frozen(state, deadline)

    def _wait_frozen(self, state: ThreadState, deadline: float) -> None:
        tid = state.tid
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FreezeTimeout(self.pid, tid, "the thread to stop", self.timeout)
            stop = pt.wait_stop(tid, remaining, self.pid, "the thread to stop")
            state.stop = stop
            kind = stop.kind
            if kind in (pt.StopKind.EVENT_STOP, pt.StopKind.GROUP_STOP):
                state.stopped = True
                if kind is pt.StopKind.GROUP_STOP:
                    self.was_stopped = True
                else:
                    self._undo_interrupt_eintr(state)
                return
            if kind is pt.StopKind.EXITED:
                state.gone = True
                return
            if kind is pt.StopKind.CLONE:
                self._adopt(stop.new_tid, deadline)
                pt.cont(tid)
            elif kind is pt.StopKind.SIGNAL:
                # A signal was dequeued before our interrupt: deliver it now, as the kernel
                # would have; the interrupt stays pending and stops the thread right after.
                pt.cont(tid, stop.sig)
            else:
                pt.cont(tid)
            with suppress(OSError):
                pt.interrupt(tid)

    def _undo_interrupt_eintr(self, state: ThreadState) -> None:
        """Our PTRACE_INTERRUPT made an endless epoll wait fail with a plain -EINTR (the
        kernel does that for any pending signal). Turn it into -ERESTARTNOHAND: at thaw the
        kernel then restarts the wait, or still returns EINTR if a signal handler runs."""
        arch = self.arch
        if arch.orig_nr_reg is None:
            return  # aarch64: orig syscall number not in NT_PRSTATUS
        regs = pt.getregs(state.tid)
        nr = to_signed(getattr(regs, arch.orig_nr_reg))
        if nr < 0 or to_signed(getattr(regs, arch.ret_reg)) != -errno.EINTR:
            return
        entry = EINTR_ON_INTERRUPT.get(arch.name_of(nr))
        if entry is None:
            return
        index, is_pointer = entry
        timeout = getattr(regs, arch.arg_regs[index])
        finite = timeout != 0 if is_pointer else to_signed((timeout & 0xFFFFFFFF) << 32) >= 0
        if finite:  # (an int timeout: only its low 32 bits count, -1 = forever)
            return  # finite wait: restarting would stretch it; leave the kernel's EINTR
        ip = getattr(regs, arch.ip_reg)
        insn = arch.syscall_insn
        try:
            if self.read_memory(ip - len(insn), len(insn)) != insn:
                return
        except InjectorError:
            return
        setattr(regs, arch.ret_reg, -ERESTARTNOHAND & ((1 << 64) - 1))
        pt.setregs(state.tid, regs)
        state.saved_regs = copy_regs(regs)
        log.debug("pid %d tid %d: %s EINTR -> restart", self.pid, state.tid, arch.name_of(nr))

    def _adopt(self, new_tid: int, deadline: float) -> None:
        """A traced thread cloned: the child is already seized by the kernel (TRACECLONE)."""
        if new_tid in self._threads:
            return
        if pt.thread_state(self.pid, new_tid) is not None:
            self._threads[new_tid] = ThreadState(new_tid)  # stops on its own, then collected
            return
        # clone() without CLONE_THREAD (a new process): let it go.
        with suppress(InjectorError, OSError):
            remaining = max(0.05, deadline - time.monotonic())
            stop = pt.wait_stop(new_tid, remaining, self.pid, "a foreign clone to stop")
            if stop.kind is not pt.StopKind.EXITED:
                pt.detach(new_tid)

    # -- thawing -----------------------------------------------------------------------

    def _thaw(self) -> None:
        """Restore and detach every thread; never raises (problems are logged)."""
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            # Threads other than the leader first: a dead leader is reported last.
            order = sorted(self._threads.values(), key=lambda s: s.tid == self.pid)
            for state in order:
                try:
                    self._release(state)
                except Exception as exc:  # noqa: BLE001 - thaw must reach every thread
                    log.warning("pid %d tid %d: thaw: %s", self.pid, state.tid, exc)
            self._close_mem()
        finally:
            self._thawed = True
            for state in self._threads.values():
                state.stopped = False
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _ensure_stopped(self, state: ThreadState) -> bool:
        """Bring a live thread back to a ptrace-stop; False if it is gone."""
        if state.gone:
            return False
        if state.stopped and pt.thread_state(self.pid, state.tid) == "t":
            return True
        with suppress(OSError):
            pt.interrupt(state.tid)
        for _ in range(8):
            try:
                wait = max(_THAW_WAIT, self.timeout)
                stop = pt.wait_stop(state.tid, wait, self.pid, "a stop to detach")
            except FreezeTimeout:
                return pt.thread_state(self.pid, state.tid) == "t"
            state.stop = stop
            if stop.kind is pt.StopKind.EXITED:
                state.gone = True
                return False
            if stop.kind is not pt.StopKind.CLONE:
                state.stopped = True
                return True
            pt.cont(state.tid)
        return False

    def _release(self, state: ThreadState) -> None:
        tid = state.tid
        if not self._ensure_stopped(state):
            self._reap(state, 0.1)  # already waited in _ensure_stopped
            return
        try:
            if state.saved_regs is not None:
                pt.setregs(tid, state.saved_regs)
            if state.saved_mask is not None:
                pt.setsigmask(tid, state.saved_mask)
            # Detaching a thread in a ptrace-stop sets TIF_SIGPENDING (__ptrace_unlink), so
            # on its way out it passes through the kernel's signal path with the original
            # registers: -ERESTART* is restarted, or becomes EINTR if a handler runs.
            for sig in dict.fromkeys(state.pending_signals):
                pt.tgkill(self.pid, tid, sig)
            sig = state.stop.sig if state.stop and state.stop.kind is pt.StopKind.SIGNAL else 0
            pt.detach(tid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
            self._reap(state, max(_THAW_WAIT, self.timeout))

    def _reap(self, state: ThreadState, wait: float) -> None:
        """Collect a dead traced thread so it does not linger as a traced zombie; a live
        one that never stopped (uninterruptible sleep) is left to ``release_orphans``."""
        state.gone = True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _release_one(self.pid, state.tid):
                return
            time.sleep(0.001)
        _orphans().add((self.pid, state.tid))
        log.error(
            "pid %d tid %d: could not be stopped to detach; it stays traced until it stops"
            " and release_orphans() runs (next freeze) or this process exits",
            self.pid, state.tid,
        )


_ORPHANS: dict[int, set[tuple[int, int]]] = {}  # tracer thread -> threads left traced


def _orphans() -> set[tuple[int, int]]:
    return _ORPHANS.setdefault(threading.get_native_id(), set())


def _release_one(pid: int, tid: int) -> bool:
    """Reap or detach one traced thread if it can be now; True when it is done with."""
    stop = pt.poll_stop(tid)
    if stop is not None and stop.kind is pt.StopKind.EXITED:
        return True
    if stop is None:
        return pt.thread_state(pid, tid) is None
    with suppress(OSError):
        pt.detach(tid, stop.sig if stop.kind is pt.StopKind.SIGNAL else 0)
    return True


def release_orphans() -> int:
    """Detach threads an earlier thaw could not stop (ptrace lets only the thread that
    traced them do it; called by every ``freeze``). Returns how many are still traced."""
    left = _orphans()
    for pid, tid in list(left):
        if _release_one(pid, tid):
            left.discard((pid, tid))
    return len(left)


@contextmanager
def freeze(pid: int, timeout: float = 5.0) -> Iterator[FrozenProcess]:
    """Stop every thread of ``pid`` for the duration of the block (see module docs).

    ``timeout`` bounds each wait: freezing, each injected syscall. Raises
    ``FreezeTimeout`` or ``TargetGoneError``; the process is always released.
    """
    release_orphans()
    proc = FrozenProcess(pid, timeout)
    try:
        proc._freeze()
        yield proc
    finally:
        proc._thaw()
