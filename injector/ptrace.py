"""Raw ptrace requests (python-ptrace binding) and a waitpid(__WALL) loop with timeouts.

python-ptrace 0.9.9 has no PTRACE_SEIZE / INTERRUPT / LISTEN / GET-SETSIGMASK: they are
issued here through ``ptrace.binding.func.ptrace``. Every failure is turned into an
``OSError`` (ESRCH when the thread is gone or not stopped) or a ``TargetGoneError``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass
from enum import Enum

import ptrace.binding as _binding
from ptrace.binding import func as _func
from ptrace.error import PtraceError

from injector.arch import current as current_arch
from injector.errors import FreezeTimeout, TargetGoneError

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACECLONE = 0x8

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 0x80

PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

WALL = 0x40000000  # __WALL: wait for threads and clones too

STOP_SIGNALS = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})
ALL_SIGNALS_MASK = (1 << 64) - 1  # the kernel drops SIGKILL and SIGSTOP itself

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def request(req: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """Issue one ptrace request; raise OSError carrying the errno on failure."""
    try:
        result: int = _func.ptrace(req, tid, addr, data)
    except PtraceError as exc:
        err = exc.errno or errno.EIO
        raise OSError(err, f"ptrace(0x{req:x}) on tid {tid}: {os.strerror(err)}") from None
    return result


def seize(tid: int, options: int = PTRACE_O_TRACECLONE | PTRACE_O_TRACESYSGOOD) -> None:
    """PTRACE_SEIZE without stopping the thread."""
    request(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    """PTRACE_INTERRUPT: ask a seized thread to enter a PTRACE_EVENT_STOP."""
    request(PTRACE_INTERRUPT, tid)


def cont(tid: int, sig: int = 0) -> None:
    """PTRACE_CONT, delivering ``sig`` if the thread is in a signal-delivery-stop."""
    request(PTRACE_CONT, tid, 0, sig)


def syscall(tid: int, sig: int = 0) -> None:
    """PTRACE_SYSCALL: resume until the next syscall entry or exit."""
    request(PTRACE_SYSCALL, tid, 0, sig)


def listen(tid: int) -> None:
    """PTRACE_LISTEN: leave a group-stopped thread stopped but let it see SIGCONT."""
    request(PTRACE_LISTEN, tid)


def detach(tid: int, sig: int = 0) -> None:
    """PTRACE_DETACH (the thread must be in a ptrace-stop)."""
    request(PTRACE_DETACH, tid, 0, sig)


def geteventmsg(tid: int) -> int:
    """PTRACE_GETEVENTMSG (e.g. the new thread id at a PTRACE_EVENT_CLONE stop)."""
    value = ctypes.c_ulong()
    request(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def getsigmask(tid: int) -> int:
    """The thread's blocked-signal mask (the saved one during ppoll/pselect/epoll_pwait)."""
    mask = ctypes.c_uint64()
    request(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(mask))
    return mask.value


def setsigmask(tid: int, mask: int) -> None:
    """Set the thread's blocked-signal mask (SIGKILL/SIGSTOP are never blocked)."""
    value = ctypes.c_uint64(mask)
    request(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(value))


class _SyscallInfo(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("nr_or_rval", ctypes.c_uint64),  # entry: nr; exit: rval (s64)
        ("args_or_is_error", ctypes.c_uint64 * 6),
    ]


def syscall_stop_op(tid: int) -> int:
    """PTRACE_GET_SYSCALL_INFO op: 1 at a syscall-entry-stop, 2 at an exit-stop, else 0/3."""
    info = _SyscallInfo()
    request(PTRACE_GET_SYSCALL_INFO, tid, ctypes.sizeof(info), ctypes.addressof(info))
    return int(info.op)


def tgkill(pid: int, tid: int, sig: int) -> None:
    """Send ``sig`` to one thread."""
    if _libc.syscall(current_arch().nr("tgkill"), pid, tid, sig) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({pid}, {tid}, {sig}): {os.strerror(err)}")


class StopKind(Enum):
    """What a waitpid status says about a traced thread."""

    EVENT_STOP = "event-stop"  # PTRACE_EVENT_STOP: INTERRUPT, group-stop, or a new clone's stop
    GROUP_STOP = "group-stop"  # PTRACE_EVENT_STOP with a stop signal (process is stopped)
    CLONE = "clone"  # PTRACE_EVENT_CLONE; ``new_tid`` set
    SYSCALL = "syscall"  # syscall-entry or -exit stop (TRACESYSGOOD)
    SIGNAL = "signal"  # signal-delivery-stop; ``sig`` is pending delivery
    EXITED = "exited"  # the thread is gone (exit status reaped)


@dataclass(frozen=True)
class Stop:
    """One decoded waitpid result."""

    kind: StopKind
    sig: int = 0
    new_tid: int = 0
    status: int = 0


def decode(tid: int, status: int) -> Stop:
    """Decode a waitpid status for a seized thread."""
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        return Stop(StopKind.EXITED, status=status)
    sig = os.WSTOPSIG(status)
    event = (status >> 16) & 0xFFFF
    if event == PTRACE_EVENT_STOP:
        kind = StopKind.GROUP_STOP if sig in STOP_SIGNALS else StopKind.EVENT_STOP
        return Stop(kind, sig=sig, status=status)
    if event == PTRACE_EVENT_CLONE:
        return Stop(StopKind.CLONE, new_tid=geteventmsg(tid), status=status)
    if event:
        return Stop(StopKind.EVENT_STOP, sig=sig, status=status)
    if sig == (signal.SIGTRAP | 0x80):
        return Stop(StopKind.SYSCALL, status=status)
    return Stop(StopKind.SIGNAL, sig=sig, status=status)


def poll_stop(tid: int) -> Stop | None:
    """One non-blocking waitpid(tid, __WALL); None if nothing to report."""
    try:
        wpid, status = os.waitpid(tid, os.WNOHANG | WALL)
    except ChildProcessError:
        # Not (or no longer) our tracee: it exited and was reaped, or was never seized.
        return Stop(StopKind.EXITED)
    if wpid == 0:
        return None
    return decode(tid, status)


def wait_stop(
    tid: int, timeout: float, pid: int | None = None, what: str = "a ptrace stop"
) -> Stop:
    """Wait for the next stop (or exit) of one traced thread, polling with backoff.

    Raises ``FreezeTimeout`` after ``timeout`` seconds. Exits are returned, not raised.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0
    polls = 0
    while True:
        stop = poll_stop(tid)
        if stop is not None:
            return stop
        polls += 1
        if pid is not None and polls % 16 == 0 and thread_state(pid, tid) in (None, "Z", "X"):
            # A dead main thread is not reported until every other thread is reaped.
            return Stop(StopKind.EXITED)
        now = time.monotonic()
        if now >= deadline:
            raise FreezeTimeout(pid if pid is not None else tid, tid, what, timeout)
        if polls < 8:
            os.sched_yield()  # most stops arrive within microseconds
        else:
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 1.5 + 10e-6, 250e-6)


def thread_state(pid: int, tid: int) -> str | None:
    """The one-letter state from /proc/PID/task/TID/stat, or None if the thread is gone."""
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :][:1].decode()


def list_tids(pid: int) -> list[int]:
    """Thread ids of a process; raises TargetGoneError if it is gone."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGoneError(pid, None, "no /proc entry") from None


def getregs(tid: int) -> ctypes.Structure:
    """General registers (python-ptrace: GETREGS on x86_64, GETREGSET/NT_PRSTATUS on arm64)."""
    try:
        regs: ctypes.Structure = _binding.ptrace_getregs(tid)
    except PtraceError as exc:
        err = exc.errno or errno.EIO
        raise OSError(err, f"getregs on tid {tid}: {os.strerror(err)}") from None
    return regs


def setregs(tid: int, regs: ctypes.Structure) -> None:
    """Write general registers back."""
    try:
        _binding.ptrace_setregs(tid, regs)
    except PtraceError as exc:
        err = exc.errno or errno.EIO
        raise OSError(err, f"setregs on tid {tid}: {os.strerror(err)}") from None
