"""Perf buffer reader: events from a tracepoint program arrive complete and in order per CPU;
wrap-around and lost samples are handled."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import rawprogs as rp

from bpf_asm.attach import attach_tracepoint
from bpf_asm.maps import Map
from bpf_asm.perf import PerfBuffer
from bpf_asm.programs import load_program
from bpf_asm.syscall import online_cpus

pytestmark = pytest.mark.root


no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind


@contextmanager
def emitter(name: str, payload: int = 16) -> Iterator[tuple[Map, Map]]:
    """A getppid tracepoint program emitting (seq, pid_tgid, zeros) records for our pid."""
    with Map.create("array", value_size=8, max_entries=1, name=name, key="<I",
                    value="<Q") as counter, \
            Map.create("perf_event_array", name=name) as events, \
            load_program(rp.event_program(counter.fd, events.fd, os.getpid(), False, payload),
                         name=name) as prog, \
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid"):
        yield counter, events


def fire(n: int) -> None:
    for _ in range(n):
        os.getppid()


def decode(payloads: list[bytes]) -> list[int]:
    return [struct.unpack_from("<Q", p)[0] for p in payloads]


def test_events_arrive_complete_with_content(unique_name: str) -> None:
    with emitter(unique_name) as (counter, events), PerfBuffer(events) as pb:
        fire(300)
        got: list = []
        while len(got) < 300:
            batch = pb.read_samples(timeout=2.0)
            assert batch, f"only {len(got)} of 300 samples arrived"
            got += batch
        assert len(got) == 300 and counter[0] == 300
        assert sorted(decode([s.data for s in got])) == list(range(300))
        pid_tgid = os.getpid() << 32
        for s in got:
            seq, who = struct.unpack_from("<QQ", s.data)
            assert who >> 32 == os.getpid() and who & 0xFFFFFFFF, who
            assert who & ~0xFFFFFFFF == pid_tgid
            assert len(s.data) == 20  # 16 bytes + kernel padding so 4 + size is 8-aligned
            assert s.cpu in online_cpus()
        for cpu in pb.cpus:  # each ring is in order
            seqs = decode([s.data for s in got if s.cpu == cpu])
            assert seqs == sorted(seqs)
        assert pb.lost == 0 and pb.received == 300
        assert pb.read(timeout=0) == []


def test_wrap_around_with_straddling_records(unique_name: str) -> None:
    cpu = online_cpus()[0]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # one ring, so its positions are predictable
    try:
        # 24-byte payload: 8 header + 4 size + 28 raw = 40-byte records, which do not
        # divide the 4096-byte ring, so some records straddle its end.
        with emitter(unique_name, payload=24) as (_, events), \
                PerfBuffer(events, page_count=1) as pb:
            got: list[bytes] = []
            for _ in range(40):
                fire(50)  # 2000 bytes a batch: no overflow, many wraps
                got += pb.read(timeout=0)
            got += pb.read(timeout=0)
        assert decode(got) == list(range(2000))
        # Exactly the records whose 40 bytes cross the end of the ring (ring reset at open):
        assert pb.straddled == sum(1 for i in range(2000) if i * 40 % 4096 + 40 > 4096) > 0
        assert pb.lost == 0
    finally:
        os.sched_setaffinity(0, old)


def test_full_ring_counts_lost_samples(unique_name: str) -> None:
    cpu = online_cpus()[0]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        with emitter(unique_name) as (counter, events), \
                PerfBuffer(events, page_count=1) as pb:
            fire(1000)  # 32-byte records: a 4 KiB ring holds 128
            first = pb.read(timeout=0)
            assert 0 < len(first) <= 128
            assert decode(first) == list(range(len(first)))  # the oldest survive
            # The kernel reports the loss with the next record that fits.
            fire(1)
            second = pb.read(timeout=1.0)
            assert pb.last_lost > 0
            assert decode(second) == [1000]
            assert len(first) + pb.lost == 1000  # every sample is either read or counted
            assert counter[0] == 1001
    finally:
        os.sched_setaffinity(0, old)


def test_chosen_cpus_only(unique_name: str) -> None:
    cpus = online_cpus()
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    old = os.sched_getaffinity(0)
    try:
        with emitter(unique_name) as (counter, events), \
                PerfBuffer(events, cpus=[cpus[0]]) as pb:
            assert pb.cpus == [cpus[0]]
            os.sched_setaffinity(0, {cpus[1]})
            fire(5)  # no ring on this CPU: the program's output fails, nothing arrives
            os.sched_setaffinity(0, {cpus[0]})
            fire(5)
            got = pb.read_samples(timeout=1.0)
            assert [s.cpu for s in got] == [cpus[0]] * 5
            assert decode([s.data for s in got]) == [5, 6, 7, 8, 9]
            assert counter[0] == 10
    finally:
        os.sched_setaffinity(0, old)


def test_timeout_and_fileno(unique_name: str) -> None:
    with emitter(unique_name) as (_, events), PerfBuffer(events) as pb:
        start = time.monotonic()
        assert pb.read(timeout=0.05) == []
        assert time.monotonic() - start < 2.0
        assert select.select([pb], [], [], 0)[0] == []
        fire(1)
        assert select.select([pb], [], [], 2.0)[0] == [pb]
        assert len(pb.read(timeout=0)) == 1


def test_batched_wakeups_still_deliver_on_timeout(unique_name: str) -> None:
    with emitter(unique_name) as (_, events), PerfBuffer(events, wakeup_events=64) as pb:
        later = threading.Timer(0.05, fire, (3,))  # arrives while read() waits
        later.start()
        got = pb.read(timeout=0.3)  # 3 samples never reach the threshold: no wakeup
        later.join()
        assert decode(got) == [0, 1, 2]


def test_batch_limit(unique_name: str) -> None:
    with emitter(unique_name) as (_, events), PerfBuffer(events) as pb:
        fire(10)
        first = pb.read(max_records=4, timeout=0)
        assert len(first) == 4
        rest = pb.read(timeout=0)
        assert sorted(decode(first + rest)) == list(range(10))


def test_bad_arguments(unique_name: str) -> None:
    with Map.create("array", value_size=4, max_entries=1, name=unique_name) as arr, \
            pytest.raises(ValueError, match=f"map '{unique_name}' is array"):
        PerfBuffer(arr)
    with Map.create("perf_event_array", name=unique_name) as pe, \
            pytest.raises(ValueError, match="power of two"):
        PerfBuffer(pe, page_count=3)


def test_close_removes_rings_from_the_map(unique_name: str) -> None:
    with emitter(unique_name) as (counter, events):
        with PerfBuffer(events):
            pass
        fire(3)  # outputs now find no ring; nothing to read, nothing leaks
        assert counter[0] == 3
        with PerfBuffer(events) as pb:
            fire(2)
            assert decode(pb.read(timeout=1.0)) == [3, 4]


def test_benchmark_runs(unique_name: str) -> None:
    """bench/bench_events.py stays runnable: one short run per reader."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_events.py"),
                          "--duration", "0.2", "--repeats", "1", "--rates", "5000"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[3:]]
    assert [r[:2] for r in rows] == [["perf", "w=1"], ["perf", "w=64"], ["ringbuf", "5,000"]]
    for r in rows:
        assert int(r[-2].replace(",", "")) >= 0  # lost is a count
        assert int(r[-3].replace(",", "")) > 0  # received something
