"""BPF ring buffer reader (BPF_MAP_TYPE_RINGBUF, kernel 5.8+).

The kernel maps the consumer position page read-write, and the producer position page
plus the data area (mapped twice back to back, so records never wrap) read-only. Each record
has an 8-byte header: u32 length with BUSY (still being written) and DISCARD bits, u32 page
offset. Records are 8-byte aligned.

    with RingBuffer(events) as rb:
        for payload in rb.read(timeout=1.0): ...
"""

from __future__ import annotations

import ctypes
import select

from ._closing import Closing
from ._mmap import PAGE_SIZE, Mapping
from .maps import Map
from .syscall import MapType

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HEADER_SIZE = 8


class RingBuffer(Closing):
    """Reads records from a ringbuf map; epoll wait; a context manager.

    `received` counts records returned, `discarded` records the program discarded.
    The ring buffer has no lost counter: a full ring makes bpf_ringbuf_output() fail in the
    program, which is where drops must be counted.
    """

    def __init__(self, map: Map) -> None:
        if map.type != MapType.RINGBUF:
            raise ValueError(f"RingBuffer needs a ringbuf map, map {map.name!r} is "
                             f"{map.type.name.lower()}")
        self.map = map
        self.size = map.max_entries
        self.mask = self.size - 1
        self.received = self.discarded = 0
        what = f"ring buffer {map.name!r}"
        self._consumer = self._producer = None
        self._epoll = select.epoll()
        try:
            self._consumer = Mapping(map.fd, PAGE_SIZE, 0, True, f"{what} consumer page")
            self._producer = Mapping(map.fd, PAGE_SIZE + 2 * self.size, PAGE_SIZE, False,
                                     f"{what} producer pages")
            self._epoll.register(map.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._cons = self._consumer.u64(0)
        self._prod = self._producer.u64(0)
        self._data = self._producer.addr + PAGE_SIZE
        self._words = (ctypes.c_uint32 * (2 * self.size // 4)).from_address(self._data)

    def fileno(self) -> int:
        """The epoll fd: readable when records are ready."""
        return self._epoll.fileno()

    def pending(self) -> bool:
        """Whether the producer is ahead of us."""
        return self._prod.value > self._cons.value

    def _drain(self, out: list[bytes], limit: int | None) -> None:
        cons = self._cons.value
        prod = self._prod.value
        if cons >= prod:
            return
        # Walk the headers (single 32-bit loads) up to the first record still being written,
        # then copy that committed span once: the data area is mapped twice, so it never
        # wraps.
        words, mask = self._words, self.mask
        spans: list[tuple[int, int]] = []
        pos = cons
        while pos < prod and (limit is None or len(out) + len(spans) < limit):
            header = words[(pos & mask) >> 2]
            if header & BUSY_BIT:
                break  # reserved but not committed yet
            length = header & ~(BUSY_BIT | DISCARD_BIT)
            if header & DISCARD_BIT:
                self.discarded += 1
            else:
                spans.append((pos - cons + HEADER_SIZE, length))
            pos += (length + HEADER_SIZE + 7) & ~7
        if pos == cons:
            return
        buf = ctypes.string_at(self._data + (cons & mask), pos - cons)
        out.extend(buf[off: off + length] for off, length in spans)
        self.received += len(spans)
        self._cons.value = pos  # release the space to the producer

    def read(self, timeout: float | None = None, max_records: int | None = None) -> list[bytes]:
        """All committed records (up to `max_records`), waiting up to `timeout` seconds
        (None: forever, 0: don't wait) if none is ready."""
        if self._producer is None:
            raise ValueError(f"ring buffer for map {self.map.name!r} is closed")
        out: list[bytes] = []
        self._drain(out, max_records)
        if not out and timeout != 0:
            self._epoll.poll(-1 if timeout is None else timeout)
            # Drain even after a timeout (the kernel may skip wakeups, e.g. BPF_RB_NO_WAKEUP).
            self._drain(out, max_records)
        return out

    def close(self) -> None:
        """Unmap and stop waiting (the map itself stays open)."""
        for m in (self._consumer, self._producer):
            if m is not None:
                m.close()
        self._consumer = self._producer = None
        if not self._epoll.closed:
            self._epoll.close()

