"""Replace the socket at one fd number of a running process with another socket.

Order inside the frozen target (the old file stays at the fd until `dup3`):

1. copy the old socket (`pidfd_getfd`), check its inode; read fd flags and epoll watchers;
2. copy socket options and O_NONBLOCK onto the new socket, hand it to the target (fdpass);
3. EPOLL_CTL_DEL the fd from every epoll set that watched the old file (epoll keys on
   file *and* fd: after `dup3` the old registration could no longer be named);
4. ``dup3(received, fd, O_CLOEXEC if the old fd had FD_CLOEXEC)``;
5. EPOLL_CTL_ADD the fd back into those sets with the same events and data;
6. close the received temporary; return the old socket (our copy) to the caller.

On failure before step 4 the deleted registrations are added back and the temporary closed;
after step 4 the old socket is handed back in the same way and put back at the fd.

Carried: socket options (`inspect.SocketOptions`), O_NONBLOCK, FD_CLOEXEC, O_ASYNC with its
SIGIO owner and signal, epoll events and data. The new socket may be of the other family (an
AF_INET6 one for an AF_INET one or back): the only family-specific option carried, IP_TOS /
IPV6_TCLASS, is read as the old socket's and set as the new one's, so no option of the other
family can fail the swap. Not carried: bytes still queued on the old socket (swap only quiet
connections: `inspect.queue_sizes`), other fds of the process that share the old file (a
`dup`), io_uring registered files, epoll sets of other processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVarTuple

from injector.epoll import (
    EPOLL_CTL_ADD,
    EPOLL_CTL_DEL,
    EpollWatch,
    find_watchers,
    pack_epoll_event,
)
from injector.errors import InjectorError, RemoteSyscallError, TargetGoneError
from injector.fdpass import SCRATCH_SIZE, send_fd
from injector.inspect import (
    FdFlags,
    apply_options,
    async_owner,
    copy_socket,
    fd_flags,
    set_async_owner,
    socket_options,
)

if TYPE_CHECKING:
    from injector.freeze import FrozenProcess

__all__ = ["SwapError", "replace_fd", "swap_many"]

log = logging.getLogger(__name__)

_ENOENT = 2
_EEXIST = 17

_Args = TypeVarTuple("_Args")


class SwapError(InjectorError):
    """The swap failed and was rolled back (``rollback_error`` is set if that failed too)."""

    def __init__(self, pid: int, fd: int, what: str, rollback_error: BaseException | None = None):
        msg = f"pid {pid} fd {fd}: swap failed: {what}"
        if rollback_error is not None:
            msg += f"; ROLLBACK ALSO FAILED: {rollback_error}"
        super().__init__(msg)
        self.pid = pid
        self.fd = fd
        self.rollback_error = rollback_error


def _open_freeze(pid: int, timeout: float) -> contextlib.AbstractContextManager[FrozenProcess]:
    from injector.freeze import freeze  # imported late: freeze needs ptrace, inspect does not

    return freeze(pid, timeout=timeout)


@contextlib.contextmanager
def _frozen(pid: int, timeout: float, proc: FrozenProcess | None) -> Iterator[FrozenProcess]:
    if proc is not None:
        if proc.pid != pid:
            raise ValueError(f"proc is pid {proc.pid}, not pid {pid}")
        yield proc
        return
    with _open_freeze(pid, timeout) as p:
        yield p


def replace_fd(
    pid: int,
    fd: int,
    new_sock: socket.socket,
    *,
    expected_inode: int | None = None,
    timeout: float = 5.0,
    proc: FrozenProcess | None = None,
) -> socket.socket:
    """Put `new_sock` at number `fd` of process `pid`; return the old socket (a copy we own).

    `proc`: an already frozen `FrozenProcess` of `pid` (else the process is frozen and
    thawed here). `expected_inode`: refuse with `StaleFdError`, touching nothing, unless
    the fd still holds that socket. The caller still owns `new_sock` and should close its
    copy (the target holds its own reference); its options and O_NONBLOCK are set here.
    """
    with _frozen(pid, timeout, proc) as p:
        return _replace(p, fd, new_sock, expected_inode, timeout)


def swap_many(
    pid: int,
    socks: Mapping[int, socket.socket],
    *,
    expected_inodes: Mapping[int, int] | None = None,
    timeout: float = 5.0,
    proc: FrozenProcess | None = None,
) -> dict[int, socket.socket]:
    """Replace several fds of `pid` under one freeze: all or none. Returns old sockets by fd."""
    expected_inodes = expected_inodes or {}
    done: dict[int, socket.socket] = {}
    with _frozen(pid, timeout, proc) as p:
        try:
            for fd, sock in socks.items():
                done[fd] = _replace(p, fd, sock, expected_inodes.get(fd), timeout)
        except BaseException:
            for fd, old in reversed(list(done.items())):
                try:
                    _replace(p, fd, old, None, timeout).close()
                except TargetGoneError:
                    break
                except InjectorError as e:
                    log.error("pid %d fd %d: could not put the old socket back: %s", pid, fd, e)
                finally:
                    old.close()
            raise
    return done


def _replace(
    proc: FrozenProcess, fd: int, new_sock: socket.socket, expected_inode: int | None,
    timeout: float,
) -> socket.socket:
    pid = proc.pid
    old = copy_socket(pid, fd, expected_inode)  # refuses before anything is touched
    try:
        st = os.fstat(old.fileno())
        flags = fd_flags(pid, fd)
        watchers = find_watchers(pid, fd, st.st_ino, st.st_dev)
        apply_options(socket_options(old), new_sock)
        new_sock.setblocking(not flags.nonblock)  # O_NONBLOCK lives on the open file
        if flags.async_io:  # SIGIO owner and signal live on the file too; O_ASYNC set later
            set_async_owner(new_sock, async_owner(old))
        _install(proc, fd, new_sock, old, flags, watchers, timeout)
    except BaseException:
        old.close()
        raise
    return old


def _inode_at(pid: int, fd: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except OSError:
        return None


class _Remote:
    """epoll_ctl/dup3/close in the target, with one scratch buffer for epoll_event."""

    def __init__(self, proc: FrozenProcess, ev_addr: int, handoff_buffer: int | None = None
                 ) -> None:
        self.proc = proc
        self.ev_addr = ev_addr
        self.handoff_buffer = handoff_buffer
        self.errors: list[BaseException] = []

    def epoll_ctl(self, op: int, fd: int, w: EpollWatch) -> None:
        if op == EPOLL_CTL_DEL:
            self.proc.syscall("epoll_ctl", w.epfd, op, fd, 0)
            return
        self.proc.write_memory(self.ev_addr, pack_epoll_event(w.events, w.data))
        self.proc.syscall("epoll_ctl", w.epfd, op, fd, self.ev_addr)

    def dup3(self, src: int, dst: int, cloexec: bool) -> None:
        self.proc.syscall("dup3", src, dst, os.O_CLOEXEC if cloexec else 0)

    def set_status_flags(self, fd: int, flags: int) -> None:
        status = flags & ~(os.O_CLOEXEC | os.O_ACCMODE)  # F_SETFL ignores the rest
        self.proc.syscall("fcntl", fd, fcntl.F_SETFL, status)

    def close(self, fd: int) -> None:
        self.proc.syscall("close", fd)

    def undo(self, what: str, fn: Callable[[*_Args], None], *args: *_Args,
             ok: tuple[int, ...] = ()) -> None:
        """Run one rollback step, best effort: errno in `ok` counts as done; another error is
        logged and kept (the first one) while the remaining steps still run."""
        try:
            fn(*args)
        except RemoteSyscallError as e:
            if e.errno not in ok:
                log.error("pid %d: rollback step %s failed: %s", self.proc.pid, what, e)
                self.errors.append(e)


def _install(
    proc: FrozenProcess,
    fd: int,
    new_sock: socket.socket,
    old: socket.socket,
    flags: FdFlags,
    watchers: list[EpollWatch],
    timeout: float,
) -> None:
    pid = proc.pid
    cloexec = flags.cloexec
    new_ino = os.fstat(new_sock.fileno()).st_ino
    # One scratch area for the whole swap, mapped first (nothing to undo if that fails):
    # [0, SCRATCH_SIZE) for the fd handoffs, then a struct epoll_event.
    with proc.scratch(SCRATCH_SIZE + 64) as base:
        received = send_fd(proc, new_sock, timeout=timeout, buffer=base)
        r = _Remote(proc, base + SCRATCH_SIZE, handoff_buffer=base)
        deleted: list[EpollWatch] = []
        try:
            for w in watchers:
                r.epoll_ctl(EPOLL_CTL_DEL, fd, w)
                deleted.append(w)
            r.dup3(received, fd, cloexec)
        except TargetGoneError:
            raise
        except BaseException as e:
            if _inode_at(pid, fd) == new_ino:  # dup3 happened after all (e.g. a timeout)
                _rollback_after_dup3(r, fd, old, cloexec, [], watchers, received, e, timeout)
            _rollback_before_dup3(r, fd, deleted, received, e)
        added: list[EpollWatch] = []
        try:
            if flags.async_io:  # in the target, so that si_fd names its fd
                r.set_status_flags(fd, flags.flags)
            for w in watchers:
                r.epoll_ctl(EPOLL_CTL_ADD, fd, w)
                added.append(w)
        except TargetGoneError:
            raise
        except BaseException as e:
            _rollback_after_dup3(r, fd, old, cloexec, added, watchers, received, e, timeout)
        try:
            r.close(received)
        except RemoteSyscallError as e:  # cannot really happen: we own that fd
            log.warning("pid %d: closing temporary fd %d: %s", pid, received, e)


def _rollback_before_dup3(
    r: _Remote, fd: int, deleted: list[EpollWatch], received: int, cause: BaseException
) -> None:
    """The old socket is still at `fd`: put back the epoll registrations already deleted."""
    for w in deleted:
        r.undo(f"re-add to epfd {w.epfd}", r.epoll_ctl, EPOLL_CTL_ADD, fd, w, ok=(_EEXIST,))
    r.undo(f"close fd {received}", r.close, received)
    _raise_rolled_back(r, fd, cause)


def _rollback_after_dup3(
    r: _Remote,
    fd: int,
    old: socket.socket,
    cloexec: bool,
    added: list[EpollWatch],
    watchers: list[EpollWatch],
    received: int,
    cause: BaseException,
    timeout: float,
) -> None:
    """The new socket is at `fd`: put the old one back there, with its epoll registrations."""
    for w in added:
        r.undo(f"delete from epfd {w.epfd}", r.epoll_ctl, EPOLL_CTL_DEL, fd, w, ok=(_ENOENT,))
    try:
        back = send_fd(r.proc, old, timeout=timeout, buffer=r.handoff_buffer)
    except TargetGoneError:
        raise
    except InjectorError as e:
        log.error("pid %d fd %d: could not hand the old socket back: %s", r.proc.pid, fd, e)
        r.errors.append(e)
    else:
        r.undo(f"dup3 old socket to fd {fd}", r.dup3, back, fd, cloexec)
        r.undo(f"close fd {back}", r.close, back)
    for w in watchers:
        r.undo(f"re-add to epfd {w.epfd}", r.epoll_ctl, EPOLL_CTL_ADD, fd, w, ok=(_EEXIST,))
    r.undo(f"close fd {received}", r.close, received)
    _raise_rolled_back(r, fd, cause)


def _raise_rolled_back(r: _Remote, fd: int, cause: BaseException) -> None:
    if not isinstance(cause, Exception):  # KeyboardInterrupt and friends: rolled back, go on
        raise cause
    first = r.errors[0] if r.errors else None
    raise SwapError(r.proc.pid, fd, f"{cause} (rolled back)", rollback_error=first) from cause
