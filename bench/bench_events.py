"""Benchmark the event readers: sustained events/s and lost samples, perf buffer vs ring buffer.

A child process calls getppid() at a paced rate (or flat out); a tracepoint program on
syscalls:sys_enter_getppid, filtered on the child's pid, takes a sequence number and emits a
16-byte record. The parent reads with PerfBuffer or RingBuffer until the child is done and
the rings are empty. Each cell is the median of --repeats runs.

    sudo python3 bench/bench_events.py [--duration 1.0] [--repeats 3] [--rates 20000,...]

Rows: perf buffer waking the reader on every sample (w=1, the default), perf buffer
waking every --wakeup samples, ring buffer (wakes only when the reader has caught up).
Lost: for the perf buffer, PERF_RECORD_LOST counts reported by the kernel; for the ring
buffer (which has no lost counter), generated - received, where generated is the program's
sequence counter.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpf_asm.attach import attach_tracepoint  # noqa: E402
from bpf_asm.builder import Builder  # noqa: E402
from bpf_asm.isa import R0, R1, R2, R3, R4, R5, R6, R7, R10  # noqa: E402
from bpf_asm.maps import Map  # noqa: E402
from bpf_asm.perf import PerfBuffer  # noqa: E402
from bpf_asm.programs import load_program  # noqa: E402
from bpf_asm.ringbuf import RingBuffer  # noqa: E402

RECORD = 16


def event_program(tgid: int, ringbuf: bool) -> Builder:
    """seq = counter[0]++; emit (seq, pid_tgid) for calls from `tgid`."""
    b = Builder()
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid")
    b.mov64(R7, R0)
    b.rsh64(R0, 32)
    b.jne(R0, tgid, "out")
    b.st(32, R10, -4, 0)
    b.mov64(R2, R10)
    b.add64(R2, -4)
    b.ld_map_fd(R1, "counter")
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    b.mov64(R1, 1)
    b.atomic("add", 64, R0, R1, 0, fetch=True)
    b.stxdw(R10, R1, -24)
    b.stxdw(R10, R7, -16)
    if ringbuf:
        b.ld_map_fd(R1, "events")
        b.mov64(R2, R10)
        b.add64(R2, -24)
        b.mov64(R3, RECORD)
        b.mov64(R4, 0)
        b.call("ringbuf_output")
    else:
        b.mov64(R1, R6)
        b.ld_map_fd(R2, "events")
        b.mov32(R3, -1)  # BPF_F_CURRENT_CPU
        b.mov64(R4, R10)
        b.add64(R4, -24)
        b.mov64(R5, RECORD)
        b.call("perf_event_output")
    b.label("out")
    b.mov64(R0, 0)
    b.exit()
    return b


def generator(rate: int, duration: float, go_fd: int) -> None:
    """Child: wait for the go byte, then call getppid() `rate` times a second (0: flat out)."""
    os.read(go_fd, 1)
    end = time.monotonic() + duration
    getppid = os.getppid
    if rate == 0:
        while time.monotonic() < end:
            for _ in range(1000):
                getppid()
        os._exit(0)
    start = time.monotonic()
    done = 0
    while (now := time.monotonic()) < end:
        due = int(rate * (now - start))  # self-correcting: catch up after oversleeping
        for _ in range(due - done):
            getppid()
        done = max(done, due)
        time.sleep(0.0005)
    os._exit(0)


@dataclass
class Run:
    generated: int
    received: int
    lost: int
    seconds: float


def run_once(kind: str, rate: int, duration: float, pages: int, wakeup: int) -> Run:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        generator(rate, duration, r)
    os.close(r)
    ringbuf = kind == "ringbuf"
    counter = Map.create("array", value_size=8, max_entries=1, name="bench_ctr",
                         key="<I", value="<Q")
    if ringbuf:
        events = Map.create("ringbuf", max_entries=pages * 4096 * os.cpu_count(),
                            name="bench_rb")
    else:
        events = Map.create("perf_event_array", name="bench_pe")
    insns = event_program(pid, ringbuf).build(maps={"counter": counter, "events": events})
    with counter, events, load_program(insns, name="bench_events") as prog, \
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid"), \
            (RingBuffer(events) if ringbuf
             else PerfBuffer(events, page_count=pages, wakeup_events=wakeup)) as rd:
        received = 0
        start = time.monotonic()
        os.write(w, b"g")
        os.close(w)
        done = False
        last = start
        while True:
            got = len(rd.read(timeout=0.05))
            if got:
                received += got
                last = time.monotonic()
            if not done:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            elif not rd.pending():
                break
        # The generator runs for `duration`; the reader is done at its last record.
        seconds = max(duration, last - start)
        generated = counter[0]
        lost = rd.lost if isinstance(rd, PerfBuffer) else generated - received
    return Run(generated, received, lost, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rates", default="10000,50000,200000,0",
                    help="offered events/s, comma-separated; 0 = flat out")
    ap.add_argument("--pages", type=int, default=8,
                    help="perf ring pages per CPU (the ring buffer gets pages*4K*ncpus)")
    ap.add_argument("--wakeup", type=int, default=64,
                    help="wakeup_events of the second perf row (the first uses 1)")
    args = ap.parse_args()
    rates = [int(x) for x in args.rates.split(",")]
    print(f"# {args.repeats} runs x {args.duration}s each, {RECORD}-byte records, "
          f"perf {args.pages} pages/CPU, ringbuf {args.pages * 4 * os.cpu_count()} KiB, "
          f"{os.cpu_count()} CPUs")
    header = (f"{'reader':10} {'offered/s':>10} {'generated/s':>12} {'received/s':>11} "
              f"{'lost':>8} {'loss %':>7}")
    print(header)
    print("-" * len(header))
    readers = [("perf", 1, "perf w=1"), ("perf", args.wakeup, f"perf w={args.wakeup}"),
               ("ringbuf", 0, "ringbuf")]
    for kind, wakeup, label in readers:
        for rate in rates:
            runs = [run_once(kind, rate, args.duration, args.pages, wakeup)
                    for _ in range(args.repeats)]
            gen = statistics.median(r.generated / args.duration for r in runs)
            rec = statistics.median(r.received / r.seconds for r in runs)
            lost = statistics.median(r.lost for r in runs)
            loss = statistics.median(100 * r.lost / max(r.generated, 1) for r in runs)
            offered = "max" if rate == 0 else f"{rate:,}"
            print(f"{label:10} {offered:>10} {gen:>12,.0f} {rec:>11,.0f} {lost:>8,.0f} "
                  f"{loss:>6.1f}%", flush=True)


if __name__ == "__main__":
    main()
