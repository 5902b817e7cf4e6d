"""Perf buffer reader: one perf ring per CPU behind a BPF_MAP_TYPE_PERF_EVENT_ARRAY.

Programs call bpf_perf_event_output(ctx, &map, BPF_F_CURRENT_CPU, data, size); this reader
opens a PERF_COUNT_SW_BPF_OUTPUT event per CPU, mmaps its ring, stores the fd in the map,
and waits on all rings with epoll.

    with PerfBuffer(events) as pb:
        for payload in pb.read(timeout=1.0): ...
        pb.lost      # samples the kernel dropped because a ring was full

Note: the kernel pads raw samples so that (4 + size) is a multiple of 8; a payload therefore
carries up to 7 trailing padding bytes (use a fixed record layout and ignore the tail).
"""

from __future__ import annotations

import contextlib
import errno
import select
import struct
from dataclasses import dataclass

from ._closing import Closing
from ._mmap import PAGE_SIZE, Mapping, copy_ring
from .maps import Map
from .syscall import (
    PERF_EVENT_IOC_DISABLE,
    PERF_EVENT_IOC_ENABLE,
    BPFError,
    MapType,
    PerfEventAttr,
    close_fd,
    ioctl,
    online_cpus,
    perf_event_open,
)

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9
PERF_RECORD_LOST_SAMPLES = 13

# struct perf_event_mmap_page offsets of the ring control words.
_DATA_HEAD, _DATA_TAIL, _DATA_OFFSET, _DATA_SIZE = 1024, 1032, 1040, 1048

_HEADER = struct.Struct("<IHH")  # type, misc, size
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Sample:
    """One record from a perf ring: the CPU it came from and its raw payload."""

    cpu: int
    data: bytes


class _Ring:
    """One CPU's perf event and its mmapped ring."""

    def __init__(self, cpu: int, page_count: int, wakeup_events: int, what: str) -> None:
        self.cpu = cpu
        attr = PerfEventAttr(type=PERF_TYPE_SOFTWARE, config=PERF_COUNT_SW_BPF_OUTPUT,
                             sample_type=PERF_SAMPLE_RAW, sample_period=1,
                             wakeup_events=wakeup_events)
        self.fd = perf_event_open(attr, pid=-1, cpu=cpu, what=f"{what} cpu {cpu}")
        try:
            self.mapping = Mapping(self.fd, (1 + page_count) * PAGE_SIZE, 0, True,
                                   f"{what} cpu {cpu} ring")
        except BaseException:
            close_fd(self.fd)
            raise
        meta = self.mapping
        self.data_offset = meta.u64(_DATA_OFFSET).value or PAGE_SIZE
        self.size = meta.u64(_DATA_SIZE).value or page_count * PAGE_SIZE
        self.data = meta.addr + self.data_offset
        self._head = meta.u64(_DATA_HEAD)
        self._tail = meta.u64(_DATA_TAIL)

    def pending(self) -> int:
        """Bytes written by the kernel and not yet consumed."""
        return self._head.value - self._tail.value

    def drain(self, out: list[bytes], cpus: list[int] | None,
              limit: int | None) -> tuple[int, int]:
        """Append payloads to `out` (and this CPU to `cpus`), at most `limit` in `out`;
        return (lost, straddled) counts."""
        head = self._head.value
        tail = self._tail.value
        if head == tail:
            return 0, 0
        # One copy of everything pending (two if it wraps), then parse in place.
        buf = copy_ring(self.data, self.size, tail, head - tail)
        pos = lost = straddled = 0
        end, size, start = len(buf), self.size, tail % self.size
        append = out.append
        while pos + 8 <= end:
            if limit is not None and len(out) >= limit:
                break
            rtype, _misc, rsize = _HEADER.unpack_from(buf, pos)
            if rsize < 8 or pos + rsize > end:
                break  # torn record: never expected, stop rather than misparse
            if (start + pos) % size + rsize > size:
                straddled += 1
            if rtype == PERF_RECORD_SAMPLE:
                (raw,) = _U32.unpack_from(buf, pos + 8)
                append(buf[pos + 12: pos + 12 + raw])
                if cpus is not None:
                    cpus.append(self.cpu)
            elif rtype == PERF_RECORD_LOST:
                lost += _U64.unpack_from(buf, pos + 16)[0]
            elif rtype == PERF_RECORD_LOST_SAMPLES:
                lost += _U64.unpack_from(buf, pos + 8)[0]
            pos += rsize
        self._tail.value = tail + pos
        return lost, straddled

    def close(self) -> None:
        self.mapping.close()
        close_fd(self.fd)
        self.fd = -1


class PerfBuffer(Closing):
    """Reads samples from a perf_event_array map: per-CPU rings, epoll wait, lost counts.

    page_count: data pages per CPU ring (a power of two). cpus: which CPUs (default: all
    online). wakeup_events: wake the reader every N samples per CPU. 1 (the default) gives
    the lowest latency but costs the kernel a wakeup per sample, which caps the producer
    (~100k samples/s here); larger values batch wakeups, and `read(timeout=...)` still
    collects the stragglers when its timeout expires.
    Attributes: `lost` (total samples dropped), `last_lost` (dropped, as seen by the last
    read), `received` (total samples returned), `straddled` (records that wrapped the ring).
    """

    def __init__(self, map: Map, page_count: int = 8, cpus: list[int] | None = None,
                 wakeup_events: int = 1) -> None:
        if map.type != MapType.PERF_EVENT_ARRAY:
            raise ValueError(f"PerfBuffer needs a perf_event_array map, map {map.name!r} is "
                             f"{map.type.name.lower()}")
        if page_count < 1 or page_count & (page_count - 1):
            raise ValueError(f"page_count must be a power of two, got {page_count}")
        self.map = map
        self.lost = self.last_lost = self.received = self.straddled = 0
        what = f"perf buffer for map {map.name!r}"
        cpus = online_cpus() if cpus is None else list(cpus)
        for cpu in cpus:
            if cpu >= map.max_entries:
                raise ValueError(f"{what}: cpu {cpu} >= max_entries {map.max_entries}")
        self._rings: dict[int, _Ring] = {}
        self._epoll = select.epoll()
        try:
            for cpu in cpus:
                ring = _Ring(cpu, page_count, wakeup_events, what)
                self._rings[ring.fd] = ring
                ioctl(ring.fd, PERF_EVENT_IOC_ENABLE, 0, f"PERF_EVENT_IOC_ENABLE {what}")
                map.update(cpu.to_bytes(4, "little"), ring.fd.to_bytes(4, "little"))
                self._epoll.register(ring.fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    @property
    def cpus(self) -> list[int]:
        """The CPUs this buffer reads."""
        return sorted(r.cpu for r in self._rings.values())

    def fileno(self) -> int:
        """The epoll fd: readable when some ring has data (for selectors/asyncio)."""
        return self._epoll.fileno()

    def pending(self) -> bool:
        """Whether any ring has unread data."""
        return any(r.pending() for r in self._rings.values())

    def read_samples(self, timeout: float | None = None,
                     max_records: int | None = None) -> list[Sample]:
        """All available samples with their CPU (up to `max_records`), waiting up to
        `timeout` seconds (None: forever, 0: don't wait) if none is ready."""
        cpus: list[int] = []
        data = self._read(timeout, max_records, cpus)
        return [Sample(c, d) for c, d in zip(cpus, data, strict=True)]

    def read(self, timeout: float | None = None, max_records: int | None = None) -> list[bytes]:
        """All available payloads (up to `max_records`), waiting up to `timeout` seconds
        (None: forever, 0: don't wait) if none is ready."""
        return self._read(timeout, max_records, None)

    def _read(self, timeout: float | None, limit: int | None,
              cpus: list[int] | None) -> list[bytes]:
        out: list[bytes] = []
        self.last_lost = 0
        self._drain(out, cpus, limit)
        if not out and timeout != 0 and not self.last_lost:
            self._epoll.poll(-1 if timeout is None else timeout)
            # Drain even after a timeout: samples below the wakeup threshold wake nobody.
            self._drain(out, cpus, limit)
        return out

    def _drain(self, out: list[bytes], cpus: list[int] | None, limit: int | None) -> None:
        before = len(out)
        for ring in self._rings.values():
            lost, straddled = ring.drain(out, cpus, limit)
            if lost:
                self.last_lost += lost
                self.lost += lost
            self.straddled += straddled
        self.received += len(out) - before

    def close(self) -> None:
        """Remove our entries from the map, unmap and close the rings."""
        for ring in list(self._rings.values()):
            if not self.map.closed:
                try:
                    self.map.delete(ring.cpu.to_bytes(4, "little"))
                except BPFError as e:
                    if e.errno != errno.ENOENT:
                        raise
            with contextlib.suppress(BPFError):
                ioctl(ring.fd, PERF_EVENT_IOC_DISABLE, 0, "PERF_EVENT_IOC_DISABLE")
            ring.close()
        self._rings.clear()
        if not self._epoll.closed:
            self._epoll.close()

