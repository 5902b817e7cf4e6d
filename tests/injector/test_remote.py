"""injector.remote: syscalls inside real, blocked processes; the app must see exactly what
the kernel alone would have shown it (no spurious EINTR, no leaked restart code)."""

from __future__ import annotations

import os
import signal
import socket
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
)

from injector import ptrace as pt
from injector.errors import FreezeTimeout, RemoteSyscallError
from injector.freeze import FrozenProcess, freeze

root = pytest.mark.root


@pytest.fixture(scope="session")
def ctarget(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ctarget(tmp_path_factory.mktemp("ctarget"))


@pytest.fixture
def spawn(ctarget: Path) -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(mode: str, *args: str) -> Target:
        t = Target([str(ctarget), mode, *args])
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill()


def _exercise(proc: FrozenProcess) -> None:
    """A few real injections in every thread: identity, memory, an error."""
    assert proc.syscall("getpid") == proc.pid
    for tid in proc.tids:
        assert proc.syscall("gettid", tid=tid) == tid
    with proc.scratch(64) as addr:
        proc.write_memory(addr, b"injected")
        assert proc.read_memory(addr, 8) == b"injected"
    with pytest.raises(RemoteSyscallError) as err:
        proc.syscall("close", 100000)
    assert err.value.errno == 9 and str(proc.pid) in str(err.value) and "close" in str(err.value)


def _assert_released(pid: int) -> None:
    assert set(tracers(pid).values()) == {0}
    assert "t" not in task_states(pid).values()


# -- blocked in a syscall: freeze, inject, thaw; the call must carry on as if untouched --

WAKERS: dict[str, Callable[[Target, str], None]] = {
    "read": lambda t, first: t.send(b"x"),
    "epoll": lambda t, first: t.send(b"x"),
    "poll": lambda t, first: t.send(b"x"),
    "select": lambda t, first: t.send(b"x"),
    "futex": lambda t, first: t.send(b"x"),
    "accept": lambda t, first: socket.create_connection(("127.0.0.1", parse(first)["port"])),
}


@root
@pytest.mark.parametrize("mode", sorted(WAKERS))
def test_blocked_syscall_continues_unaware(spawn: Callable[..., Target], mode: str) -> None:
    t = spawn(mode)
    first = t.readline()
    wait_blocked(t.pid)
    before = signal_state(t.pid)
    for _ in range(3):
        with freeze(t.pid) as proc:
            assert set(task_states(t.pid).values()) == {"t"}
            _exercise(proc)
        _assert_released(t.pid)
    assert signal_state(t.pid) == before
    # Still blocked: no spurious return (EINTR or a leaked -ERESTARTSYS) reached the app.
    assert not t.has_output(0.2), t.readline()
    keep = WAKERS[mode](t, first)
    result = parse(t.readline())
    del keep
    assert result["errno"] == 0, result
    assert list(result.values())[0] >= 0


@root
def test_nanosleep_restarts_with_remaining_time(spawn: Callable[..., Target]) -> None:
    t = spawn("nanosleep", "400")
    t.readline()
    start = time.monotonic()
    wait_blocked(t.pid)
    time.sleep(0.1)
    with freeze(t.pid) as proc:
        for _ in range(20):
            _exercise(proc)
        time.sleep(0.05)
    thawed_ms = (time.monotonic() - start) * 1000
    result = parse(t.readline())
    assert result["nanosleep"] == 0 and result["errno"] == 0, result
    # restart_syscall keeps the original deadline: not early, and not a fresh 400 ms
    # counted from the thaw (which would end at least thawed_ms + 400 after the start).
    assert 395 <= result["elapsed_ms"] < 400 + thawed_ms - 50, (result, thawed_ms)


@root
def test_pause_gets_eintr_only_if_a_handler_ran(spawn: Callable[..., Target]) -> None:
    t = spawn("pause")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid) as proc:
        _exercise(proc)
    assert not t.has_output(0.2)  # no handler ran: the kernel restarts pause()
    with freeze(t.pid) as proc:
        _exercise(proc)
        os.kill(t.pid, signal.SIGUSR1)  # arrives while frozen, delivered after thaw
        _exercise(proc)
    # A handler ran during pause(): the kernel's answer is EINTR, and so is ours.
    assert parse(t.readline()) == {"pause": -1, "errno": 4, "usr1": 1}


@root
@pytest.mark.parametrize("timer", ["posix", "setitimer"])
def test_signals_during_injections_are_all_delivered(
    spawn: Callable[..., Target], timer: str
) -> None:
    """SIGALRM every ms (SA_RESTART) and 200 queued SIGRTMIN across 150 freezes: every RT
    signal is handled exactly once, read() with SA_RESTART never sees EINTR, and with a
    POSIX timer each expiry is accounted for (handler runs + si_overrun == expiries).
    setitimer() signals coalesce while pending, so there only "keeps firing" is checked."""
    t = spawn("signals", timer)
    t.readline()
    sent = 0
    for i in range(150):
        with freeze(t.pid) as proc:
            proc.syscall("getpid")
            with proc.scratch(128) as addr:
                proc.write_memory(addr, b"x" * 128)
                if i % 3 == 0:
                    os.kill(t.pid, signal.SIGRTMIN)
                    sent += 1
            proc.syscall("getppid")
        if i % 3 != 2:
            os.kill(t.pid, signal.SIGRTMIN)
            sent += 1
        time.sleep(0.002)
    _assert_released(t.pid)
    time.sleep(0.05)
    t.send(b"q")
    r = parse(t.readline())
    assert r["eintr"] == 0 and r["other"] == 0, r
    assert r["rt"] == sent, r
    if timer == "posix":
        assert abs(r["alrm"] + r["overruns"] - r["elapsed_ms"]) <= 3, r
    else:
        assert r["elapsed_ms"] / 4 < r["alrm"] <= r["elapsed_ms"] + 1, r


@root
def test_blocking_injection_times_out_and_thread_stays_usable(
    spawn: Callable[..., Target],
) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid, timeout=0.3) as proc:
        began = time.monotonic()
        with pytest.raises(FreezeTimeout, match=str(t.pid)):
            proc.syscall("ppoll", 0, 0, 0, 0)  # blocks forever in the target
        assert time.monotonic() - began < 2
        assert proc.syscall("getpid") == t.pid
    _assert_released(t.pid)
    assert not t.has_output(0.2)
    t.send(b"x")
    assert parse(t.readline()) == {"read": 1, "errno": 0}


@root
def test_syscall_insn_is_real_and_code_untouched(spawn: Callable[..., Target]) -> None:
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid) as proc:
        addr = proc.syscall_insn_addr()
        assert proc.read_memory(addr, 2) == proc.arch.syscall_insn
        regs = pt.getregs(t.pid)
        ip = getattr(regs, proc.arch.ip_reg)
        code_before = proc.read_memory(ip - 16, 32)
        _exercise(proc)
        assert proc.read_memory(ip - 16, 32) == code_before
        after = pt.getregs(t.pid)
        assert bytes(after) == bytes(regs)  # registers put back after every call


def _exec_ranges(pid: int) -> list[tuple[int, int]]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            addr, perms = line.split()[:2]
            if perms[2] == "x":
                lo, hi = (int(x, 16) for x in addr.split("-"))
                out.append((lo, hi))
    return out


@root
@pytest.mark.parametrize("via", ["auxv", "maps"])
def test_syscall_insn_found_in_executable_memory(
    spawn: Callable[..., Target], monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    if via == "maps":  # as if there were no AT_SYSINFO_EHDR: scan /proc/PID/maps
        monkeypatch.setattr(FrozenProcess, "_vdso_text", lambda self: None)
    t = spawn("read")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid) as proc:
        addr = proc.syscall_insn_addr()
        assert any(lo <= addr < hi - 1 for lo, hi in _exec_ranges(t.pid))
        assert proc.syscall("getpid") == t.pid


@root
def test_many_threads_inject_in_each(spawn: Callable[..., Target]) -> None:
    """ptrace obeys only the tracing thread: a call from another Python thread is refused
    cleanly (and harms nothing); calls from the freezing thread work in every thread."""
    t = spawn("futex")
    t.readline()
    wait_blocked(t.pid)
    with freeze(t.pid) as proc:
        assert len(proc.tids) == 2
        errors: list[BaseException] = []

        def other() -> None:
            try:
                proc.syscall("getpid")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "thread that froze" in str(errors[0])
        _exercise(proc)
    _assert_released(t.pid)
    t.send(b"x")
    assert parse(t.readline())["errno"] == 0
