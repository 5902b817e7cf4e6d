"""Benchmark the socket tracer alone: events reaching user space and CPU per 1,000 connections/s.

A client process in one network namespace makes paced TCP connections to a server process in
another (a veth pair between them); the tracer is opened as the daemon opens it and read as
the daemon reads it (`Tracer.read` woken by the ring or by the oldest young connection's due
time, `young_closes` once a second). The server's namespace stands for "the host": the
tracer leaves it out, so only the client side's connections are this node's, as on a node.

Cases (what the client does with each connection):
  eligible    connects to a remote pod address, holds it 2 x age, closes it
  ineligible  connects to an address that is no remote pod (same node, a Service, the host)
  short       connects to a remote pod address and closes it at once

Modes: ``kernel`` (filter by remote pod CIDRs and age in the kernel: the daemon's default,
``--kernel-filter on``) and ``user`` (both off: every connect and close is reported and aged
in user space, as before the kernel filter; the daemon then also does Python work per
event, which is not counted here).

Per cell (medians of --repeats): achieved connections/s, events/s read, the reader's CPU
(user + system time of this process, which does nothing but read) and the tracer's BPF
programs' run time (kernel.bpf_stats_enabled, run_time_ns summed over its programs), each
as % of one core and per 1,000 connections/s, and records lost.

    sudo python3 bench/bench_tracer.py [--rates 1000,2000] [--duration 3] [--repeats 3]

Everything is removed in every case (namespaces, programs, the stats switch put back).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ebpfrouter.tracer import Tracer  # noqa: E402

AGE = 0.2  # the daemon's default --min-age
REMOTE, OTHER = "10.250.0.1", "10.250.1.1"  # the server's addresses: a remote pod, and not
CLIENT = "10.250.9.2"
STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
CASES = ("eligible", "ineligible", "short")
MODES = ("kernel", "user")

CLIENT_CODE = """
import collections, resource, socket, struct, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
addr, port, rate, seconds, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    float(sys.argv[4]), float(sys.argv[5])
sys.stdin.readline()  # go
held = collections.deque()
start = time.monotonic()
done = errors = 0
while (now := time.monotonic()) < start + seconds:
    while held and held[0][0] <= now:
        held.popleft()[1].close()
    for _ in range(int(rate * (now - start)) - done):  # catch up after oversleeping
        try:
            s = socket.create_connection((addr, port), timeout=5)
            # reset on close: no TIME_WAIT, so the client's ports last the whole run
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            errors += 1
            continue
        if hold > 0:
            held.append((now + hold, s))
        else:
            s.close()
    done = max(done, int(rate * (now - start)))
    time.sleep(0.0005)
elapsed = time.monotonic() - start
for _, s in held:
    s.close()
print(done, errors, elapsed, flush=True)
"""

SERVER_CODE = """
import resource, selectors, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("0.0.0.0", 0)); lst.listen(4096); lst.setblocking(False)
sel = selectors.DefaultSelector(); sel.register(lst, selectors.EVENT_READ)
print(lst.getsockname()[1], flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is lst:
            while True:
                try:
                    c = lst.accept()[0]
                except BlockingIOError:
                    break
                c.setblocking(False); sel.register(c, selectors.EVENT_READ)
        else:
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj); key.fileobj.close()
"""


@dataclass
class Cell:
    """One run's figures."""

    rate: float  # connections/s achieved
    events: float  # events/s read
    reader_pct: float  # % of one core
    bpf_pct: float  # % of one core
    lost: int
    errors: int


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[tuple[str, str]]:
    """Client and server namespaces joined by a veth pair; removed afterwards."""
    from pyroute2 import NetNS, netns

    cns, sns = f"erbt-c-{tag}", f"erbt-s-{tag}"
    made: list[str] = []
    try:
        for name in (cns, sns):
            netns.create(name)
            made.append(name)
        with NetNS(cns) as ns:
            ns.link("add", ifname="erbt0", kind="veth", peer={"ifname": "erbt1", "net_ns_fd": sns})
            idx = ns.link_lookup(ifname="erbt0")[0]
            ns.addr("add", index=idx, address=CLIENT, prefixlen=16)
            for link in ("lo", "erbt0"):
                ns.link("set", index=ns.link_lookup(ifname=link)[0], state="up")
        with NetNS(sns) as ns:
            idx = ns.link_lookup(ifname="erbt1")[0]
            for addr in (REMOTE, OTHER):
                ns.addr("add", index=idx, address=addr, prefixlen=16)
            for link in ("lo", "erbt1"):
                ns.link("set", index=ns.link_lookup(ifname=link)[0], state="up")
        yield cns, sns
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                netns.remove(name)  # the veth pair goes with them


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the run, put back as it was."""
    before = STATS.read_text().strip()
    STATS.write_text("1")
    try:
        yield
    finally:
        STATS.write_text(before)


def in_netns(name: str, code: str, *args: object, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(["nsenter", f"--net=/run/netns/{name}", sys.executable, "-c", code,
                             *map(str, args)], text=True, stdout=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.stdin is not None:
        proc.stdin.close()


def bpf_time_ns(tracer: Tracer) -> int:
    return sum(prog.info().run_time_ns for prog in tracer.programs)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_once(case: str, mode: str, rate: int, seconds: float, cns: str, sns: str,
             port: int) -> Cell:
    """One client run of `case` at `rate` with the tracer in `mode`."""
    kernel = mode == "kernel"
    with Tracer(host_netns_inode=os.stat(f"/run/netns/{sns}").st_ino, filter_remote=kernel,
                age=AGE if kernel else 0.0) as tracer:
        if kernel:
            tracer.remote_pods(f"{REMOTE}/32")
        target = OTHER if case == "ineligible" else REMOTE
        hold = 2 * AGE if case == "eligible" else 0.0
        client = in_netns(cns, CLIENT_CODE, target, port, rate, seconds, hold,
                          stdin=subprocess.PIPE)
        try:
            events = 0
            cpu0, bpf0, t0 = cpu_seconds(), bpf_time_ns(tracer), time.monotonic()
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            last_tick = t0
            while client.poll() is None:
                due = tracer.next_due()
                wait = 0.2 if due is None else min(0.2, max(0.01, due))
                events += len(tracer.read(timeout=wait))
                if time.monotonic() - last_tick >= 1.0:
                    last_tick = time.monotonic()
                    tracer.young_closes()
            end = time.monotonic() + (2 * AGE + 0.1)  # the last ones grow up or close
            while time.monotonic() < end:
                events += len(tracer.read(timeout=0.05))
            tracer.young_closes()
            elapsed = time.monotonic() - t0
            cpu, bpf = cpu_seconds() - cpu0, (bpf_time_ns(tracer) - bpf0) / 1e9
            done, errors, client_s = client.stdout.readline().split()
        finally:
            stop(client)
        return Cell(rate=int(done) / float(client_s), events=events / float(client_s),
                    reader_pct=100 * cpu / elapsed, bpf_pct=100 * bpf / elapsed,
                    lost=tracer.lost, errors=int(errors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="1000,2000", help="offered connections/s")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_tracer: needs root (BPF, namespaces)", file=sys.stderr)
        return 2
    cases = args.cases.split(",")
    if bad := set(cases) - set(CASES):
        ap.error(f"unknown cases {sorted(bad)}; choose from {', '.join(CASES)}")
    rates = [int(r) for r in args.rates.split(",")]
    print(f"# tracer alone, {args.repeats} runs x {args.duration} s, age {AGE} s, "
          f"{os.cpu_count()} CPUs; CPU as % of one core; per 1k = per 1,000 conn/s")
    header = (f"{'case':11} {'mode':7} {'offered':>8} {'conn/s':>7} {'events/s':>9} "
              f"{'reader %':>9} {'per 1k':>7} {'bpf %':>6} {'per 1k':>7} {'lost':>5}")
    print(header)
    print("-" * len(header))
    failed = 0
    with namespaces(str(os.getpid())) as (cns, sns), bpf_stats():
        server = in_netns(sns, SERVER_CODE)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            for case in cases:
                for rate in rates:
                    for mode in MODES:
                        runs = [run_once(case, mode, rate, args.duration, cns, sns, port)
                                for _ in range(args.repeats)]
                        med = {f: statistics.median(getattr(r, f) for r in runs)
                               for f in ("rate", "events", "reader_pct", "bpf_pct")}
                        lost = max(r.lost for r in runs)
                        failed += sum(r.errors for r in runs)
                        k = med["rate"] / 1000
                        print(f"{case:11} {mode:7} {rate:>8,} {med['rate']:>7,.0f} "
                              f"{med['events']:>9,.0f} {med['reader_pct']:>8.1f}% "
                              f"{med['reader_pct'] / k:>6.2f}% {med['bpf_pct']:>5.1f}% "
                              f"{med['bpf_pct'] / k:>6.2f}% {lost:>5}", flush=True)
        finally:
            stop(server)
    if failed:
        print(f"# {failed} client connects failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
