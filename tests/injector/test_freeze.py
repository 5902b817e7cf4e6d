"""injector.freeze: every thread stopped while frozen, every thread released after —
also when the target dies, a wait times out, or the caller's block raises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _ctargets import (
    Target,
    build_ctarget,
    parse,
    signal_state,
    task_states,
    tracers,
    wait_blocked,
    wait_state,
)

from injector.errors import FreezeTimeout, InjectorError, TargetGoneError
from injector.freeze import FrozenProcess, freeze, release_orphans

pytestmark = pytest.mark.root

THREADS_16 = """
import sys, threading
ev = threading.Event()
for i in range(16):
    threading.Thread(target=ev.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read(1)
"""

# Threads that keep creating their successor and exiting: clone() is always in flight.
CHURN = """
import sys, threading
count = 0
def hop():
    global count
    count += 1
    threading.Thread(target=hop, daemon=True).start()
for _ in range(4):
    threading.Thread(target=hop, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
print("count=%d" % count, flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="session")
def ctarget(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ctarget(tmp_path_factory.mktemp("ctarget"))


@pytest.fixture
def spawn(ctarget: Path) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(mode: str, *args: str, python: str | None = None) -> Target:
        argv = [sys.executable, "-c", python] if python else [str(ctarget), mode, *args]
        t = Target(argv)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def _released(pid: int) -> None:
    assert set(tracers(pid).values()) == {0}, tracers(pid)
    assert "t" not in task_states(pid).values(), task_states(pid)


def test_getpid_and_gettid_in_16_threads(spawn: Callable[..., Target]) -> None:
    t = spawn("", python=THREADS_16)
    assert t.readline() == "ready"
    wait_blocked(t.pid)
    before = signal_state(t.pid)
    with freeze(t.pid) as proc:
        states = task_states(t.pid)
        assert len(states) == 17 and set(states.values()) == {"t"}, states
        assert sorted(proc.tids) == sorted(states) and proc.tids[0] == t.pid
        assert proc.syscall("getpid") == t.pid
        assert [proc.syscall("gettid", tid=tid) for tid in proc.tids] == proc.tids
    _released(t.pid)
    assert signal_state(t.pid) == before
    assert set(task_states(t.pid).values()) <= {"S", "R"}
    t.send(b"x")
    assert t.proc.wait(timeout=5) == 0


def test_threads_born_while_freezing_are_caught(spawn: Callable[..., Target]) -> None:
    t = spawn("", python=CHURN)
    assert t.readline() == "ready"
    for _ in range(15):
        with freeze(t.pid) as proc:
            states = task_states(t.pid)
            live = {tid for tid, s in states.items() if s not in "ZX"}
            assert live <= set(proc.tids), (live, proc.tids)
            assert {states[tid] for tid in live} == {"t"}, states
            assert proc.syscall("getpid") == t.pid
        _released(t.pid)
        time.sleep(0.01)
    t.send(b"\n")
    first = parse(t.readline())["count"]
    t.send(b"\n")  # the churn went on after every thaw
    assert first > 15


def test_already_stopped_process_stays_stopped(spawn: Callable[..., Target]) -> None:
    t = spawn("idle")
    t.readline()
    wait_blocked(t.pid)
    os.kill(t.pid, signal.SIGSTOP)
    assert wait_state(t.pid, "T")
    with freeze(t.pid) as proc:
        assert proc.was_stopped
        assert proc.syscall("getpid") == t.pid
        with proc.scratch(32) as addr:
            proc.write_memory(addr, b"still stopped")
    time.sleep(0.05)
    assert task_states(t.pid)[t.pid] == "T"
    assert set(tracers(t.pid).values()) == {0}
    os.kill(t.pid, signal.SIGCONT)
    assert wait_state(t.pid, "S")
    t.send(b"x")  # alive and reading
    time.sleep(0.05)
    assert t.proc.poll() is None


def test_main_thread_exited_process_lives_on(spawn: Callable[..., Target]) -> None:
    t = spawn("zombie-leader")
    t.readline()
    assert wait_state(t.pid, "Z")
    (worker,) = set(task_states(t.pid)) - {t.pid}
    wait_state(t.pid, "S", tid=worker)
    with freeze(t.pid) as proc:
        assert proc.tids == [worker]
        assert proc.syscall("getpid") == t.pid and proc.syscall("gettid") == worker
        with proc.scratch(64) as addr:
            proc.write_memory(addr, b"ok")
            assert proc.read_memory(addr, 2) == b"ok"
    assert tracers(t.pid)[worker] == 0
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


def test_sigstop_during_injection_is_kept_for_after(spawn: Callable[..., Target]) -> None:
    """SIGSTOP cannot be blocked: it cuts an injected ppoll() short. The injector restarts
    its own call, holds the SIGSTOP back, and the process stops only after thaw."""
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    stopper = threading.Timer(0.1, os.kill, (t.pid, signal.SIGSTOP))
    with freeze(t.pid) as proc, proc.scratch(16) as ts:
        proc.write_memory(ts, (0).to_bytes(8, "little") + (300_000_000).to_bytes(8, "little"))
        stopper.start()
        began = time.monotonic()
        assert proc.syscall("ppoll", 0, 0, ts, 0) == 0  # timed out normally, no -ERESTART*
        assert time.monotonic() - began >= 0.3
        assert proc.syscall("getpid") == t.pid
    stopper.join()
    assert wait_state(t.pid, "T")  # the SIGSTOP took effect after thaw
    assert set(tracers(t.pid).values()) == {0}
    os.kill(t.pid, signal.SIGCONT)
    assert wait_state(t.pid, "S")
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


def test_refuses_self_and_already_traced(spawn: Callable[..., Target]) -> None:
    with pytest.raises(InjectorError, match="itself"), freeze(os.getpid()):
        pass
    t = spawn("read")
    t.readline()
    other = subprocess.Popen(  # another tracer holds the target
        [sys.executable, "-c",
         "import sys; from injector import ptrace as pt; pt.seize(int(sys.argv[1]));"
         " print('seized', flush=True); sys.stdin.read()", str(t.pid)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "seized"
        with pytest.raises(InjectorError, match="already traced"), freeze(t.pid):
            pass
    finally:
        other.kill()
        other.wait()
    with freeze(t.pid) as proc:  # free again once the other tracer is gone
        assert proc.syscall("getpid") == t.pid


def test_target_gone_before_freeze() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(TargetGoneError, match=str(p.pid)), freeze(p.pid):
        pass


def test_killed_between_freeze_and_syscall(spawn: Callable[..., Target]) -> None:
    t = spawn("futex")
    t.readline()
    wait_blocked(t.pid)
    with pytest.raises(TargetGoneError, match=str(t.pid)), freeze(t.pid) as proc:
        os.kill(t.pid, signal.SIGKILL)
        time.sleep(0.05)
        proc.syscall("getpid")
    t.proc.wait(timeout=5)
    assert not os.path.exists(f"/proc/{t.pid}/task")


@pytest.mark.parametrize("mode", ["read", "futex"])
def test_killed_mid_injection(spawn: Callable[..., Target], mode: str) -> None:
    t = spawn(mode)
    t.readline()
    wait_blocked(t.pid)
    killer = threading.Timer(0.2, os.kill, (t.pid, signal.SIGKILL))
    began = time.monotonic()
    with pytest.raises(TargetGoneError, match=str(t.pid)), freeze(t.pid) as proc:
        killer.start()
        proc.syscall("ppoll", 0, 0, 0, 0)  # blocks in the target until it is killed
    killer.join()
    assert time.monotonic() - began < 3
    t.proc.wait(timeout=5)  # nothing left traced: the zombie could be reaped
    assert not os.path.exists(f"/proc/{t.pid}/task")


def test_freeze_times_out_and_releases(spawn: Callable[..., Target]) -> None:
    """A vfork() parent sleeps uninterruptibly: it cannot stop in time. FreezeTimeout,
    and once it wakes it is detached, not left traced or stopped."""
    t = spawn("vfork", "600")
    t.readline()
    time.sleep(0.1)
    began = time.monotonic()
    with pytest.raises(FreezeTimeout, match=str(t.pid)), freeze(t.pid, timeout=0.2):
        pass
    assert t.readline() == "vfork done"
    assert time.monotonic() - began < 5
    time.sleep(0.05)
    _released(t.pid)
    t.send(b"x")
    assert t.proc.wait(timeout=5) == 0


def test_thread_that_cannot_stop_is_released_later(spawn: Callable[..., Target]) -> None:
    """Stuck longer than the thaw waits: it is left traced, logged, and released by the
    next freeze (or release_orphans) once it finally stops."""
    t = spawn("vfork", "1500")
    t.readline()
    time.sleep(0.1)
    with pytest.raises(FreezeTimeout), freeze(t.pid, timeout=0.2):
        pass
    assert release_orphans() == 1
    assert tracers(t.pid)[t.pid] == os.getpid()
    deadline = time.monotonic() + 5
    while release_orphans() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert release_orphans() == 0
    assert t.readline() == "vfork done"
    _released(t.pid)
    t.send(b"x")
    assert t.proc.wait(timeout=5) == 0


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_exception_in_block_releases(spawn: Callable[..., Target], exc: type) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    with pytest.raises(exc), freeze(t.pid) as proc:
        proc.syscall("getpid")
        with proc.scratch(16):
            raise exc()
    _released(t.pid)
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


def test_keyboard_interrupt_during_blocking_injection(spawn: Callable[..., Target]) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt), freeze(t.pid) as proc:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            proc.syscall("ppoll", 0, 0, 0, 0)  # blocks until our "Ctrl-C"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    _released(t.pid)
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


def _snapshot(pid: int) -> tuple[str, list[str]]:
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    return maps, sorted(os.listdir(f"/proc/{pid}/fd"))


def test_1000_injections_leave_no_trace(spawn: Callable[..., Target]) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    before = _snapshot(t.pid)
    sigs = signal_state(t.pid)
    for _ in range(100):
        with freeze(t.pid) as proc:
            for _ in range(10):
                assert proc.syscall("getpid") == t.pid
                with proc.scratch(8192) as addr:
                    proc.write_memory(addr + 4096, b"x" * 64)
    assert _snapshot(t.pid) == before
    assert signal_state(t.pid) == sigs
    _released(t.pid)
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


def test_frozen_process_api(spawn: Callable[..., Target]) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid) as proc:
        assert isinstance(proc, FrozenProcess) and proc.pid == t.pid and proc.tids == [t.pid]
        with pytest.raises(ValueError):
            proc.syscall("getpid", 1, 2, 3, 4, 5, 6, 7)
        with pytest.raises(KeyError):
            proc.syscall("no_such_call")
    with pytest.raises(InjectorError, match="no longer frozen"):
        proc.syscall("getpid")  # after thaw: nothing is frozen any more
    _released(t.pid)
