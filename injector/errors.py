"""Exceptions raised by the injector; every message names the pid, tid and syscall involved."""

from __future__ import annotations

import errno as _errno
import os
from typing import Self


class InjectorError(Exception):
    """Base class for every injector failure."""


class TargetGoneError(InjectorError):
    """The target process (or one of its threads) exited or was killed."""

    def __init__(self, pid: int, tid: int | None = None, detail: str = "") -> None:
        self.pid = pid
        self.tid = tid
        where = f"pid {pid}" if tid is None or tid == pid else f"pid {pid} tid {tid}"
        super().__init__(f"{where}: target exited" + (f" ({detail})" if detail else ""))


class FreezeTimeout(InjectorError):
    """A thread did not reach the expected ptrace stop within the timeout."""

    def __init__(self, pid: int, tid: int | None, what: str, timeout: float) -> None:
        self.pid = pid
        self.tid = tid
        self.timeout = timeout
        where = f"pid {pid}" if tid is None else f"pid {pid} tid {tid}"
        super().__init__(f"{where}: timed out after {timeout:.3g}s waiting for {what}")


class RemoteSyscallError(InjectorError, OSError):
    """A syscall run inside the target returned an error (``errno`` is set)."""

    def __init__(self, err: int, pid: int, tid: int, syscall: str) -> None:
        name = _errno.errorcode.get(err, str(err))
        OSError.__init__(
            self, err, f"{syscall}() in pid {pid} tid {tid} failed: {name} ({os.strerror(err)})"
        )
        self.pid = pid
        self.tid = tid
        self.syscall = syscall

    # keep pickling/copying working despite the custom signature
    def __reduce__(self) -> tuple[type[Self], tuple[object, ...]]:
        return (type(self), (self.errno, self.pid, self.tid, self.syscall))
