"""CPU accounting around one measured run: the whole machine, the load, the routers.

`CpuMeter.start()` before a run and `CpuMeter.stop()` after it give one `cpu` dict of
CPU-seconds (summed over all CPUs, so 2 cores busy for 1 s make 2 s):

- `machine`: the aggregate `cpu` line of /proc/stat, in USER_HZ ticks
  (`os.sysconf("SC_CLK_TCK")`, 100 here) turned into seconds. `user` is user+nice (guest
  time is already inside user), then `system`, `irq` and `softirq`; `sampled` is their sum.
  `idle`, `iowait` and `steal` (time the hypervisor gave to someone else) are never busy.
  Softirq is where the kernel moves packets (veth, VXLAN encap and decap, TCP receive
  processing): /proc/stat does not split it by process, so it is reported machine-wide
  only. `busy`, the machine total the per-unit costs are made of, is the interval times the
  CPUs minus idle, iowait and steal: it holds everything the run made the machine do,
  whoever did it (see "sampled and busy" below).
- `load`: the clients and servers of the run. The harness starts every one of them from this
  process and waits for it before the run ends (`Harness.run` waits for the client,
  `Harness.server` stops and waits for the server), so their user and system seconds, with
  those of every descendant they waited for (mpirun's daemons and ranks), reach this
  process's RUSAGE_CHILDREN when they are reaped: the delta around the run is theirs. The
  `cat /proc/net/tcp` probes of `Harness.wait_listen` are in it too (milliseconds).
- `routers`: user and system seconds of every process in each router's tree (the daemon
  with all its threads, its guardian), read from /proc/PID/stat at both ends; children
  reaped meanwhile count through their parents' cutime/cstime (`tree_delta`). Zero when the
  run has no routers.
- `harness`: this process's own RUSAGE_SELF (the bench's Python: it mostly sleeps).
- `other`: busy − load − routers − harness: kernel threads (ksoftirqd, kworkers), irqs and
  softirqs served from the idle loop, and whatever else ran on the machine.

Sampled and busy. user/system/irq/softirq are sampled: each tick (250 Hz here) charges the
whole tick to what the CPU is doing at that instant. With NO_HZ idle (here) a CPU that is
idle has no tick, and its idle and iowait time are measured exactly from the idle clocks;
so CPU work in bursts shorter than a tick between idle periods (a woken server's short run,
an interrupt and its softirq served from idle) is neither idle nor sampled. Measured here:
0-0.6% of the busy time when the load saturates both CPUs, up to 7% when it leaves them
partly idle (iperf3's runs: about 6%, where the processes' own figures, exact runtimes,
even exceed the sampled sum). So the total is `busy` = interval × CPUs − idle − iowait − steal, and
`unsampled` = busy − sampled is the part no tick saw, of unknown kind; the split into
user/system/softirq is the sampled one. Without NO_HZ all of it is ticks, and the two agree.

On a kernel with tick-based accounting and without CONFIG_IRQ_TIME_ACCOUNTING (the one here;
`accounting()` records which) a tick that lands in softirq is counted as softirq in /proc/stat
*and* as system time of the task it interrupted, so a process's system time includes the
packet processing its own syscalls triggered, while the machine's `system` does not: the
process figures say who caused the work, the machine split says what kind of work it was.

`per_unit()` divides by the work the run did (`Outcome.work`): CPU-seconds per GB (10^9
bytes) for `bytes`, CPU-milliseconds per 1,000 for `requests` and `connections`.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")

# field order of the `cpu` lines of /proc/stat (proc(5)); older kernels stop earlier
PROC_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal",
                    "guest", "guest_nice")

# how each kind of work is counted and which per-unit figure it gives
UNITS = {"bytes": ("s/GB", 1e9, 1.0), "requests": ("ms/1k req", 1e3, 1e3),
         "connections": ("ms/1k conn", 1e3, 1e3)}


@dataclasses.dataclass(frozen=True)
class MachineTimes:
    """CPU-seconds of the whole machine by kind (the /proc/stat `cpu` line), and how many
    CPUs that line sums (its `cpuN` lines: the online ones)."""

    user: float  # user + nice
    system: float
    irq: float
    softirq: float
    idle: float
    iowait: float
    steal: float
    cpus: int = 0

    @property
    def sampled(self) -> float:
        """user + system + irq + softirq: the busy time the ticks saw."""
        return self.user + self.system + self.irq + self.softirq

    def __sub__(self, other: MachineTimes) -> MachineTimes:
        times = {f.name: getattr(self, f.name) - getattr(other, f.name)
                 for f in dataclasses.fields(self) if f.name != "cpus"}
        return MachineTimes(**times, cpus=min(self.cpus, other.cpus))

    def as_dict(self, interval: float | None = None) -> dict[str, float]:
        """Seconds by kind, `sampled`, and (for a difference over `interval` seconds)
        `busy` = interval × cpus − idle − iowait − steal and `unsampled` = busy − sampled;
        `busy` is `sampled` when the interval or the CPU count is unknown."""
        out: dict[str, float] = {f.name: getattr(self, f.name)
                                 for f in dataclasses.fields(self)}
        out["sampled"] = self.sampled
        busy = self.sampled
        if interval is not None and self.cpus > 0:
            busy = interval * self.cpus - self.idle - self.iowait - self.steal
        out["busy"] = busy
        out["unsampled"] = busy - self.sampled
        return out


def parse_proc_stat(text: str, clk_tck: int = CLK_TCK) -> MachineTimes:
    """The aggregate `cpu` line (all CPUs) of /proc/stat text, in seconds."""
    ticks: dict[str, int] | None = None
    cpus = 0
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            if len(fields) < 5:
                raise ValueError(f"/proc/stat: short cpu line {line!r}")
            ticks = dict.fromkeys(PROC_STAT_FIELDS, 0)
            ticks.update(zip(PROC_STAT_FIELDS, map(int, fields[1:]), strict=False))
        elif fields and fields[0][:3] == "cpu" and fields[0][3:].isdigit():
            cpus += 1
    if ticks is None:
        raise ValueError("/proc/stat: no aggregate cpu line")
    return MachineTimes(user=(ticks["user"] + ticks["nice"]) / clk_tck,
                        system=ticks["system"] / clk_tck, irq=ticks["irq"] / clk_tck,
                        softirq=ticks["softirq"] / clk_tck, idle=ticks["idle"] / clk_tck,
                        iowait=ticks["iowait"] / clk_tck, steal=ticks["steal"] / clk_tck,
                        cpus=cpus)


def machine_times(path: str = "/proc/stat") -> MachineTimes:
    """The machine's CPU-seconds by kind since boot."""
    with open(path) as f:
        return parse_proc_stat(f.read())


@dataclasses.dataclass(frozen=True)
class ProcTimes:
    """One process's figures from /proc/PID/stat, in seconds (utime/stime cover all its
    threads, live and exited; cutime/cstime the children it has waited for)."""

    pid: int
    ppid: int
    start: int  # starttime in ticks since boot: tells a reused pid apart
    user: float
    system: float
    children_user: float
    children_system: float


def parse_pid_stat(text: str, clk_tck: int = CLK_TCK) -> ProcTimes:
    """/proc/PID/stat text; the command name may hold spaces and parentheses, so the fields
    are counted from the last ')'."""
    head, _, tail = text.rpartition(")")
    fields = tail.split()
    if not head or len(fields) < 20:
        raise ValueError(f"/proc/PID/stat: cannot parse {text[:120]!r}")
    # stat(5) fields 4 (ppid), 14-17 (utime stime cutime cstime), 22 (starttime); tail
    # starts at field 3 (state)
    return ProcTimes(pid=int(head.split("(", 1)[0]), ppid=int(fields[1]), start=int(fields[19]),
                     user=int(fields[11]) / clk_tck, system=int(fields[12]) / clk_tck,
                     children_user=int(fields[13]) / clk_tck,
                     children_system=int(fields[14]) / clk_tck)


def process_times(pid: int) -> ProcTimes | None:
    """/proc/PID/stat of `pid`; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return parse_pid_stat(f.read())
    except (OSError, ValueError):
        return None


def all_processes() -> dict[int, ProcTimes]:
    """Every process on the machine right now."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            times = process_times(int(entry))
            if times is not None:
                out[times.pid] = times
    return out


Tree = dict[tuple[int, int], ProcTimes]  # (pid, starttime) -> figures


def tree_snapshot(roots: Iterable[int]) -> Tree:
    """The processes of the trees under `roots` (the roots, their children, theirs...),
    keyed by (pid, starttime)."""
    procs = all_processes()
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out: Tree = {}
    todo = [pid for pid in roots if pid in procs]
    while todo:
        pid = todo.pop()
        p = procs[pid]
        if (pid, p.start) not in out:
            out[(pid, p.start)] = p
            todo += children.get(pid, [])
    return out


def tree_delta(before: Tree, after: Tree) -> tuple[float, float]:
    """(user, system) seconds the trees used between two snapshots.

    A process in both: its own delta plus that of the children it reaped meanwhile (their
    whole lives are in its cutime/cstime, so the part a reaped child had used before the
    first snapshot is taken off again). A process born meanwhile: all of its time. A process
    gone without being reaped by a process of the trees (orphaned, then reaped by init): the
    slice it used after the first snapshot is lost; a router's helpers live as long as it does.
    """
    user = system = 0.0
    for key, b in after.items():
        a = before.get(key)
        if a is None:
            user += b.user + b.children_user
            system += b.system + b.children_system
        else:
            user += b.user - a.user + b.children_user - a.children_user
            system += b.system - a.system + b.children_system - a.children_system
    parents = {key[0] for key in before if key in after}
    for key, a in before.items():
        if key not in after and a.ppid in parents:  # reaped by a parent still in the tree
            user -= a.user + a.children_user
            system -= a.system + a.children_system
    return max(user, 0.0), max(system, 0.0)


def _rusage(who: int) -> tuple[float, float]:
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


class CpuMeter:
    """CPU-seconds around one run: `start()`, the run, `stop(work)` -> the `cpu` dict.

    `router_pids` is called at both ends (the routers of a bypass run; none otherwise)."""

    def __init__(self, router_pids: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self.router_pids = router_pids
        self._start: tuple[float, MachineTimes, tuple[float, float], tuple[float, float],
                           Tree] | None = None

    def start(self) -> None:
        """Take the first snapshot (the routers' trees first: reading /proc costs a few ms
        of this process's time, which then falls outside the machine interval). The clock
        is read right next to /proc/stat: `busy` is made of that interval."""
        routers = tree_snapshot(self.router_pids())
        self._start = (time.monotonic(), machine_times(), _rusage(resource.RUSAGE_CHILDREN),
                       _rusage(resource.RUSAGE_SELF), routers)

    def stop(self, work: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The figures since `start()`, with the per-unit costs of `work` (see `per_unit`)."""
        if self._start is None:
            raise RuntimeError("CpuMeter.stop() before start()")
        t0, m0, c0, s0, r0 = self._start
        c1, s1 = _rusage(resource.RUSAGE_CHILDREN), _rusage(resource.RUSAGE_SELF)
        m1, t1 = machine_times(), time.monotonic()
        r1 = tree_snapshot(self.router_pids())
        machine = (m1 - m0).as_dict(t1 - t0)
        r_user, r_sys = tree_delta(r0, r1)
        load = {"user": c1[0] - c0[0], "system": c1[1] - c0[1]}
        harness = {"user": s1[0] - s0[0], "system": s1[1] - s0[1]}
        routers = {"user": r_user, "system": r_sys}
        for part in (load, harness, routers):
            part["total"] = part["user"] + part["system"]
        cpu: dict[str, Any] = {
            "wall_s": t1 - t0, "machine": machine, "load": load, "routers": routers,
            "harness": harness,
            "other": machine["busy"] - load["total"] - routers["total"] - harness["total"],
            "work": dict(work or {}),
        }
        cpu["per_unit"] = per_unit(cpu)
        return _rounded(cpu)


def _rounded(value: Any) -> Any:
    """Floats to 6 decimals (the tick arithmetic leaves 1e-13 noise), nested."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def per_unit(cpu: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's CPU per unit of its work: `unit` ("s/GB", "ms/1k req", "ms/1k conn"),
    machine `total` (busy) and its parts `user`, `system` (system + hard irq, a few ticks at
    most), `softirq` and `unsampled` (which add up to it), and the `routers`' part; None
    without work (or with no work done)."""
    work = cpu.get("work") or {}
    kind = next((k for k in UNITS if k in work), None)
    if kind is None or not work[kind] or work[kind] <= 0:
        return None
    unit, per, scale = UNITS[kind]
    factor = scale * per / work[kind]
    m = cpu["machine"]
    return {"unit": unit, "kind": kind, "amount": work[kind],
            "total": m["busy"] * factor, "user": m["user"] * factor,
            "system": (m["system"] + m["irq"]) * factor, "softirq": m["softirq"] * factor,
            "unsampled": m.get("unsampled", 0.0) * factor,
            "routers": cpu["routers"]["total"] * factor}


def accounting() -> dict[str, Any]:
    """How this kernel accounts CPU time: USER_HZ, CONFIG_HZ and whether irq time is
    accounted apart from tasks (None where /proc/config.gz is absent)."""
    out: dict[str, Any] = {"clk_tck": CLK_TCK, "config_hz": None, "irq_time_accounting": None,
                           "tick_accounting": None}
    try:
        config = gzip.decompress(Path("/proc/config.gz").read_bytes()).decode(errors="replace")
    except OSError:
        return out
    lines = set(config.splitlines())
    for line in lines:
        if line.startswith("CONFIG_HZ="):
            out["config_hz"] = int(line.split("=", 1)[1])
    out["irq_time_accounting"] = "CONFIG_IRQ_TIME_ACCOUNTING=y" in lines
    out["tick_accounting"] = "CONFIG_TICK_CPU_ACCOUNTING=y" in lines
    return out
