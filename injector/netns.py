"""Network namespaces: which one a process is in, entering one, running code inside one.

`setns(2)` with CLONE_NEWNET moves only the calling thread, so code that must run inside
another process's netns runs on a short-lived thread of its own (`run_in_thread`); sockets it
creates keep that namespace after the thread is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = ["CLONE_NEWNET", "in_netns", "netns_inode", "netns_path", "run_in_netns",
           "run_in_thread", "setns_path"]

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")


def netns_path(pid: int | str = "self", proc: str = "/proc") -> str:
    """`/proc/<pid>/ns/net` (`"self"`, `"thread-self"` or a pid; `proc`: where procfs is)."""
    return f"{proc}/{pid}/ns/net"


def netns_inode(pid: int | str = "self", proc: str = "/proc") -> int:
    """Inode number of the network namespace of `pid` (raises OSError if it is gone)."""
    return os.stat(netns_path(pid, proc)).st_ino


def setns_path(path: str | os.PathLike[str], nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace at `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, nstype) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(path: str | os.PathLike[str]) -> Iterator[None]:
    """Run the calling *thread* in the netns at `path`, then move it back."""
    saved = os.open(netns_path("thread-self"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_path(path)
        yield
    finally:
        try:
            if _libc.setns(saved, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original netns failed")
        finally:
            os.close(saved)


def run_in_thread(fn: Callable[[], T], *, netns: str | os.PathLike[str] | None = None,
                  timeout: float | None = None, name: str = "netns") -> T:
    """`fn()` on a short-lived thread (inside the netns at `netns` if given); its result.

    The thread's exception is re-raised here. TimeoutError if it has not finished within
    `timeout` seconds (the thread is left to finish on its own).
    """
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            if netns is not None:
                setns_path(netns)  # the thread ends right after: no need to go back
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=work, name=name)
    thread.start()
    thread.join(timeout)
    if error:
        raise error[0]
    if not result:
        raise TimeoutError(f"{name}: not done within {timeout} s")
    return result[0]


def run_in_netns(pid: int, fn: Callable[[], T], timeout: float | None = 5.0) -> T:
    """`fn()` inside the network namespace of `pid`, on a short-lived thread."""
    return run_in_thread(fn, netns=netns_path(pid), timeout=timeout, name=f"netns-{pid}")
