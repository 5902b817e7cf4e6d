"""Shared-memory helpers for the event readers: raw mmap (so we hold plain addresses and can
do single aligned 64-bit loads/stores on the kernel's head/tail words) and a copy that wraps."""

from __future__ import annotations

import ctypes
import mmap as _mmap

from .syscall import BPFError, libc

PAGE_SIZE = _mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value


class Mapping:
    """An mmap(2) of a kernel object's fd; `.addr` is the start address."""

    def __init__(self, fd: int, length: int, offset: int, writable: bool, what: str) -> None:
        prot = _mmap.PROT_READ | (_mmap.PROT_WRITE if writable else 0)
        addr = libc.mmap(None, length, prot, _mmap.MAP_SHARED, fd, offset)
        if addr in (None, _MAP_FAILED):
            raise BPFError(ctypes.get_errno(), f"mmap {what}")
        self.addr: int = addr
        self.length = length

    def u64(self, offset: int) -> ctypes.c_uint64:
        """A ctypes view of the aligned 64-bit word at `offset` (loads/stores are single)."""
        return ctypes.c_uint64.from_address(self.addr + offset)

    def close(self) -> None:
        if self.addr:
            libc.munmap(self.addr, self.length)
            self.addr = 0


def copy_ring(base: int, size: int, pos: int, length: int) -> bytes:
    """Copy `length` bytes starting at ring position `pos` of a ring of `size` bytes at
    `base`, wrapping past the end to the start."""
    start = pos % size
    first = min(length, size - start)
    data = ctypes.string_at(base + start, first)
    if first < length:
        data += ctypes.string_at(base, length - first)
    return data
