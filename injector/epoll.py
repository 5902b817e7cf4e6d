"""The epoll sets of another process, as ``/proc/PID/fdinfo/EPFD`` lists them, and the
``struct epoll_event`` layout needed to re-register an fd from inside the target."""

from __future__ import annotations

import errno as _errno
import os
import platform
import re
import struct
from dataclasses import dataclass

from injector.inspect import FdAccessError, read_fdinfo

__all__ = [
    "EPOLL_CTL_ADD",
    "EPOLL_CTL_DEL",
    "EPOLL_CTL_MOD",
    "EpollEntry",
    "EpollWatch",
    "epoll_event_struct",
    "epoll_fds",
    "find_watchers",
    "pack_epoll_event",
    "parse_epoll_fdinfo",
    "read_epoll_entries",
]

EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
EPOLL_CTL_MOD = 3

_EVENTPOLL = "anon_inode:[eventpoll]"

# fs/eventpoll.c ep_show_fdinfo():
#   "tfd: %8d events: %8x data: %16llx  pos:%lli ino:%lx sdev:%x\n"
_TFD_LINE = re.compile(
    r"^tfd:\s*(?P<tfd>\d+)\s+events:\s*(?P<events>[0-9a-fA-F]+)\s+data:\s*(?P<data>[0-9a-fA-F]+)"
    r"\s+pos:\s*(?P<pos>-?\d+)\s+ino:\s*(?P<ino>[0-9a-fA-F]+)\s+sdev:\s*(?P<sdev>[0-9a-fA-F]+)"
)


@dataclass(frozen=True)
class EpollEntry:
    """One registration in an epoll set: target fd, event mask, user data, and the
    target file's inode and device (to tell a reused fd number from the registered file)."""

    tfd: int
    events: int
    data: int
    pos: int
    ino: int
    sdev: int


@dataclass(frozen=True)
class EpollWatch:
    """An epoll set `epfd` of the process that watches the fd of interest."""

    epfd: int
    events: int
    data: int


def parse_epoll_fdinfo(text: str) -> list[EpollEntry]:
    """Parse the ``tfd:`` lines of an eventpoll fdinfo text."""
    out = []
    for line in text.splitlines():
        m = _TFD_LINE.match(line.strip())
        if m:
            out.append(
                EpollEntry(
                    tfd=int(m["tfd"]),
                    events=int(m["events"], 16),
                    data=int(m["data"], 16),
                    pos=int(m["pos"]),
                    ino=int(m["ino"], 16),
                    sdev=int(m["sdev"], 16),
                )
            )
    return out


def read_epoll_entries(pid: int, epfd: int) -> list[EpollEntry]:
    """Registrations of epoll set `epfd` in `pid`."""
    return parse_epoll_fdinfo(read_fdinfo(pid, epfd))


def epoll_fds(pid: int) -> list[int]:
    """Every fd of `pid` that is an epoll instance (``anon_inode:[eventpoll]``), sorted."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as e:
        raise FdAccessError(e.errno or _errno.ESRCH, pid, -1, "list /proc/PID/fd") from None
    out = []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == _EVENTPOLL:
                out.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return sorted(out)


def find_watchers(
    pid: int, fd: int, inode: int | None = None, dev: int | None = None
) -> list[EpollWatch]:
    """Every epoll set of `pid` that watches the file now at `fd`.

    An entry must match both the fd number and the file (inode, and device when given);
    `inode`/`dev` default to what ``/proc/PID/fd/N`` points at now. Entries for the same
    number but another file (a closed fd whose file is still alive elsewhere) are skipped.
    """
    if inode is None:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError as e:
            raise FdAccessError(e.errno or _errno.EBADF, pid, fd, "stat /proc/PID/fd") from None
        inode, dev = st.st_ino, st.st_dev if dev is None else dev
    out = []
    for epfd in epoll_fds(pid):
        try:
            entries = read_epoll_entries(pid, epfd)
        except FdAccessError:
            continue  # the epoll fd went away
        for entry in entries:
            if entry.tfd == fd and entry.ino == inode and (dev is None
                                                           or entry.sdev == _devnum(dev)):
                out.append(EpollWatch(epfd, entry.events, entry.data))
    return out


def _devnum(dev: int) -> int:
    """st_dev in the kernel's internal dev_t encoding (major << 20 | minor), as fdinfo shows."""
    return (os.major(dev) << 20) | os.minor(dev)


def epoll_event_struct(machine: str | None = None) -> struct.Struct:
    """``struct epoll_event`` for an architecture: packed (12 bytes) on x86_64, 16 elsewhere."""
    machine = machine or platform.machine()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return struct.Struct("<IQ")
    return struct.Struct("=I4xQ")


def pack_epoll_event(events: int, data: int, machine: str | None = None) -> bytes:
    """Bytes of a ``struct epoll_event`` with `events` and 64-bit `data`."""
    return epoll_event_struct(machine).pack(events & 0xFFFFFFFF, data & 0xFFFFFFFFFFFFFFFF)
