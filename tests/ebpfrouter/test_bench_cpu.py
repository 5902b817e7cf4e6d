"""The bench's CPU accounting (`ebpfrouter.bench.cpu`): /proc/stat and /proc/PID/stat parsing,
the process-tree delta, the per-unit costs, and the meter against the real kernel: CPU burnt by
real child processes must show up in the machine's user time, in the routers' tree figures
(a live process and a grandchild it reaped) and in the load's figures (a reaped child).

Nothing here depends on timing: the children burn a fixed amount of their own CPU time
(measured by getrusage), however long that takes on a loaded machine, and the checks are
lower bounds well under what the kernel must have counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfrouter.bench import cpu
from ebpfrouter.bench.cpu import CpuMeter, ProcTimes

BURN = r"""
import resource
def burn(seconds):
    t0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    x = 0
    while resource.getrusage(resource.RUSAGE_SELF).ru_utime - t0 < seconds:
        for i in range(20000):
            x += i
"""

# waits for a line, has a child burn 0.3 s and reaps it, burns 0.3 s itself, says "done",
# then stays alive until its stdin closes
ROUTER_LIKE = BURN + r"""
import os, sys
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    burn(0.3)
    os._exit(0)
os.waitpid(pid, 0)
burn(0.3)
print("done", flush=True)
sys.stdin.read()
"""


def test_parse_proc_stat_takes_the_aggregate_line() -> None:
    text = ("cpu  100 20 300 4000 50 6 70 8 9 10\n"
            "cpu0 1 1 1 1 1 1 1 1 1 1\nintr 12345\nctxt 99\n")
    m = cpu.parse_proc_stat(text, clk_tck=100)
    assert m.user == pytest.approx(1.2)  # user + nice; guest is inside user already
    assert (m.system, m.irq, m.softirq) == pytest.approx((3.0, 0.06, 0.7))
    assert (m.idle, m.iowait, m.steal) == pytest.approx((40.0, 0.5, 0.08))
    assert m.sampled == pytest.approx(1.2 + 3.0 + 0.06 + 0.7) and m.cpus == 1
    older = cpu.parse_proc_stat("cpu 1 2 3 4\ncpu0 0 0 0 0\ncpu1 0 0 0 0\n", clk_tck=1)
    assert (older.user, older.system, older.idle, older.softirq) == (3, 3, 4, 0)
    assert older.cpus == 2  # a kernel with fewer fields, two CPUs
    d = (m - older).as_dict()  # no interval: busy is what the ticks saw
    assert d["busy"] == d["sampled"] == pytest.approx(m.sampled - older.sampled)
    assert d["unsampled"] == 0 and d["cpus"] == 1
    # over 10 s on 1 CPU: busy is the time that was not idle, iowait or steal
    d = (m - cpu.MachineTimes(0, 0, 0, 0, 0, 0, 0, cpus=1)).as_dict(50.0)
    assert d["busy"] == pytest.approx(50.0 - 40.0 - 0.5 - 0.08)
    assert d["unsampled"] == pytest.approx(d["busy"] - m.sampled)
    with pytest.raises(ValueError, match="no aggregate cpu line"):
        cpu.parse_proc_stat("cpu0 1 2 3 4\n")


def test_parse_pid_stat_with_a_command_name_full_of_parentheses() -> None:
    real = Path("/proc/self/stat").read_text()
    tail = real.rpartition(")")[2]
    mine = cpu.parse_pid_stat(real)
    odd = cpu.parse_pid_stat(f"{os.getpid()} (a) (b c) d){tail}")
    assert odd == mine
    assert mine.pid == os.getpid() and mine.ppid == os.getppid() and mine.start > 0
    with pytest.raises(ValueError):
        cpu.parse_pid_stat("garbage")


def test_real_machine_and_process_figures() -> None:
    m = cpu.machine_times()
    assert m.sampled > 0 and m.idle > 0 and m.user >= 0 and m.softirq >= 0
    assert m.cpus == os.cpu_count()
    me = cpu.process_times(os.getpid())
    assert me is not None and me.user + me.system > 0
    assert cpu.process_times(2**22 + 12345) is None  # above pid_max: never a process
    tree = cpu.tree_snapshot([os.getpid()])
    assert (me.pid, me.start) in tree
    acc = cpu.accounting()
    assert acc["clk_tck"] == os.sysconf("SC_CLK_TCK")


def _p(pid: int, ppid: int, user: float, cuser: float = 0.0, start: int = 1) -> ProcTimes:
    return ProcTimes(pid, ppid, start, user, user / 10, cuser, cuser / 10)


def test_tree_delta_counts_reaped_children_once_and_reused_pids_as_new() -> None:
    before = {(10, 1): _p(10, 1, 5.0), (11, 1): _p(11, 10, 2.0), (12, 1): _p(12, 10, 1.0)}
    # 11 used 0.5 s more and was reaped by 10 (its whole 2.5 s now in 10's cutime); 10 used
    # 1 s; 12 went on 0.25 s; 13 is new with 0.75 s
    after = {(10, 1): _p(10, 1, 6.0, cuser=2.5), (12, 1): _p(12, 10, 1.25),
             (13, 5): _p(13, 10, 0.75)}
    user, system = cpu.tree_delta(before, after)
    assert user == pytest.approx(1.0 + 0.5 + 0.25 + 0.75)
    assert system == pytest.approx(user / 10)
    # 11 and 12 ended unchanged and were reaped by 10; a new process got pid 12 (another
    # starttime): it counts in full, not as a delta of the old 12
    reused = {(10, 1): _p(10, 1, 5.0, cuser=3.0), (12, 9): _p(12, 10, 0.1)}
    assert cpu.tree_delta(before, reused)[0] == pytest.approx(0.1)
    assert cpu.tree_delta({}, {}) == (0.0, 0.0)


def test_per_unit_costs() -> None:
    base = {"machine": {"busy": 3.3, "user": 1.0, "system": 1.4, "irq": 0.1, "softirq": 0.5,
                        "unsampled": 0.3}, "routers": {"total": 0.6}}
    gb = cpu.per_unit({**base, "work": {"bytes": 6.6e9}})
    assert gb is not None and gb["unit"] == "s/GB"
    assert (gb["total"], gb["user"], gb["system"], gb["softirq"], gb["unsampled"],
            gb["routers"]) == pytest.approx((0.5, 1 / 6.6, 1.5 / 6.6, 0.5 / 6.6, 0.3 / 6.6,
                                             0.6 / 6.6))
    assert gb["user"] + gb["system"] + gb["softirq"] + gb["unsampled"] == \
        pytest.approx(gb["total"])
    req = cpu.per_unit({**base, "work": {"requests": 33000.0}})
    assert req is not None and req["unit"] == "ms/1k req"
    assert req["total"] == pytest.approx(100.0)  # 3.3 s over 33 × 1,000 requests: 100 ms
    conn = cpu.per_unit({**base, "work": {"connections": 1650.0}})
    assert conn is not None and conn["unit"] == "ms/1k conn"
    assert conn["total"] == pytest.approx(2000.0)
    assert cpu.per_unit({**base, "work": {}}) is None
    assert cpu.per_unit({**base, "work": {"bytes": 0.0}}) is None


def test_meter_sees_real_cpu_of_routers_their_children_and_the_load() -> None:
    router = subprocess.Popen([sys.executable, "-c", ROUTER_LIKE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert router.stdin is not None and router.stdout is not None
    try:
        meter = CpuMeter(lambda: [router.pid])
        meter.start()
        router.stdin.write("go\n")
        router.stdin.flush()
        assert router.stdout.readline().strip() == "done"
        # the load: a client that burns 0.3 s and is reaped before the meter stops
        subprocess.run([sys.executable, "-c", BURN + "burn(0.3)"], check=True)
        figures = meter.stop({"bytes": 2e9})
    finally:
        router.stdin.close()
        router.wait(30)
    routers, load, machine = figures["routers"], figures["load"], figures["machine"]
    # the router-like process burnt 0.3 s and its reaped child 0.3 s, all user time
    assert routers["user"] >= 0.5, figures
    assert routers["total"] == pytest.approx(routers["user"] + routers["system"])
    assert load["user"] >= 0.3, figures  # the reaped client (plus its interpreter start)
    assert machine["user"] >= 0.7, figures  # /proc/stat's ticks saw it (about 0.9 s)
    # busy (not idle, from the idle clocks) holds at least what these processes ran,
    # whatever the ticks missed; and it cannot exceed the interval on every CPU
    assert machine["busy"] >= 0.9 * (routers["total"] + load["total"]), figures
    assert machine["busy"] <= figures["wall_s"] * machine["cpus"] + 0.05, figures
    assert machine["sampled"] <= machine["busy"] + 0.1, figures
    assert figures["wall_s"] > 0 and figures["work"] == {"bytes": 2e9}
    unit = figures["per_unit"]
    assert unit["unit"] == "s/GB"
    assert unit["total"] == pytest.approx(machine["busy"] / 2, abs=1e-5)
    assert unit["routers"] == pytest.approx(routers["total"] / 2, abs=1e-5)


def test_meter_without_routers_and_misuse() -> None:
    meter = CpuMeter()
    with pytest.raises(RuntimeError, match="before start"):
        meter.stop()
    meter.start()
    figures = meter.stop()
    assert figures["routers"] == {"user": 0.0, "system": 0.0, "total": 0.0}
    assert figures["per_unit"] is None and figures["machine"]["busy"] >= 0
