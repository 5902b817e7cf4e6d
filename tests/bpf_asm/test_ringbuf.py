"""Ring buffer reader: events from a tracepoint program arrive complete, in order and with
their exact length; a full ring drops in the program, and the reader recovers."""

from __future__ import annotations

import os
import select
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import rawprogs as rp

from bpf_asm.attach import attach_tracepoint
from bpf_asm.maps import Map
from bpf_asm.programs import load_program
from bpf_asm.ringbuf import RingBuffer

pytestmark = pytest.mark.root


no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind


@contextmanager
def emitter(name: str, size: int = 4096, payload: int = 24) -> Iterator[tuple[Map, Map]]:
    """A getppid tracepoint program writing (seq, pid_tgid, zeros) records for our pid."""
    with Map.create("array", value_size=8, max_entries=1, name=name, key="<I",
                    value="<Q") as counter, \
            Map.create("ringbuf", max_entries=size, name=name) as ring, \
            load_program(rp.event_program(counter.fd, ring.fd, os.getpid(), True, payload),
                         name=name) as prog, \
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid"):
        yield counter, ring


def fire(n: int) -> None:
    for _ in range(n):
        os.getppid()


def seqs(records: list[bytes]) -> list[int]:
    return [struct.unpack_from("<Q", r)[0] for r in records]


def test_events_arrive_in_order_with_exact_length(unique_name: str) -> None:
    with emitter(unique_name, size=64 * 1024) as (counter, ring), RingBuffer(ring) as rb:
        fire(500)
        got: list[bytes] = []
        while len(got) < 500:
            batch = rb.read(timeout=2.0)
            assert batch, f"only {len(got)} of 500 records arrived"
            got += batch
        assert seqs(got) == list(range(500))  # one ring for all CPUs: global order
        for r in got:
            assert len(r) == 24
            seq, pid_tgid, zero = struct.unpack("<QQQ", r)
            assert pid_tgid >> 32 == os.getpid() and zero == 0
        assert counter[0] == 500 and rb.received == 500
        assert rb.read(timeout=0) == []


def test_wraps_around_the_ring_many_times(unique_name: str) -> None:
    # 32-byte records (8 header + 24) in a 4 KiB ring: 128 fit; 5000 go round ~39 times
    with emitter(unique_name) as (_, ring), RingBuffer(ring) as rb:
        got: list[bytes] = []
        for _ in range(100):
            fire(50)
            got += rb.read(timeout=0)
        assert seqs(got) == list(range(5000))


def test_full_ring_drops_in_program_and_reader_recovers(unique_name: str) -> None:
    with emitter(unique_name) as (counter, ring), RingBuffer(ring) as rb:
        fire(1000)  # nobody reads: only the first 128 fit
        first = rb.read(timeout=0)
        assert seqs(first) == list(range(len(first)))
        assert 0 < len(first) <= 4096 // 32
        fire(3)
        assert seqs(rb.read(timeout=1.0)) == [1000, 1001, 1002]
        assert counter[0] == 1003


def test_timeout_fileno_and_batch_limit(unique_name: str) -> None:
    with emitter(unique_name) as (_, ring), RingBuffer(ring) as rb:
        start = time.monotonic()
        assert rb.read(timeout=0.05) == []
        assert time.monotonic() - start < 2.0
        assert select.select([rb], [], [], 0)[0] == []
        fire(10)
        assert select.select([rb], [], [], 2.0)[0] == [rb]
        first = rb.read(timeout=0, max_records=3)
        assert seqs(first) == [0, 1, 2]
        assert seqs(rb.read(timeout=0)) == list(range(3, 10))


def test_discarded_records_are_skipped(unique_name: str) -> None:
    with Map.create("array", value_size=8, max_entries=1, name=unique_name, key="<I",
                    value="<Q") as counter, \
            Map.create("ringbuf", max_entries=4096, name=unique_name) as ring, \
            load_program(rp.reserve_discard_program(counter.fd, ring.fd, os.getpid()),
                         name=unique_name) as prog, \
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid"), \
            RingBuffer(ring) as rb:
        got: list[bytes] = []
        for _ in range(10):
            fire(100)  # 1000 reservations of 16 bytes: the ring wraps ~4 times
            got += rb.read(timeout=0)
        assert seqs(got) == list(range(0, 1000, 2))
        assert rb.discarded == 500 and rb.received == 500


def test_read_after_close_is_an_error(unique_name: str) -> None:
    with Map.create("ringbuf", max_entries=4096, name=unique_name) as ring:
        rb = RingBuffer(ring)
        rb.close()
        with pytest.raises(ValueError, match=f"ring buffer for map '{unique_name}' is closed"):
            rb.read(timeout=0)


def test_wrong_map_type(unique_name: str) -> None:
    with Map.create("perf_event_array", name=unique_name) as pe, \
            pytest.raises(ValueError, match=f"ringbuf map, map '{unique_name}' is perf_event"):
        RingBuffer(pe)
