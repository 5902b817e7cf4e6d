"""Least privilege, on the real kernel: each operation of the daemon works with exactly the
capabilities `privileges.OPERATION_CAPS` names and fails without any one of them; after
`drop_privileges(daemon_required())` the daemon's run-time operations still work and the
dropped ones fail. Every drop happens in a forked child (capabilities never come back).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ebpfrouter import privileges
from ebpfrouter.privileges import OPERATION_CAPS, drop_privileges

pytestmark = pytest.mark.root

RETURN_ZERO = b"\xb7" + bytes(7) + b"\x95" + bytes(7)  # r0 = 0; exit
DENIED = (errno.EPERM, errno.EACCES)


def in_child(prepare: Callable[[], Any], keep: set[str],
             then: Callable[[Any], Any]) -> tuple[str, Any]:
    """Fork; in the child run `prepare()` with full privileges, drop to `keep`, run
    `then(prepared)`. Returns ("ok", result) or ("error", errno, message)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            state = prepare()
            drop_privileges(keep)
            out: tuple[Any, ...] = ("ok", then(state))
        except OSError as exc:
            out = ("error", exc.errno, f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # noqa: BLE001
            out = ("crash", f"{type(exc).__name__}: {exc}")
        try:
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    result = pickle.loads(b"".join(chunks))
    assert result[0] != "crash", result
    return result


@pytest.fixture(scope="module")
def target() -> Iterator[subprocess.Popen]:
    """A root process with full capabilities, not a child of the dropping process."""
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def netns_proc() -> Iterator[subprocess.Popen]:
    """A process in its own network namespace (the namespace dies with it)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    deadline = time.monotonic() + 5
    while os.stat(f"/proc/{proc.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino:
        assert time.monotonic() < deadline, "unshare did not enter a new netns"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


def _nothing() -> None:
    return None


def operations(target_pid: int, netns_pid: int,
               other_uid_pid: int = 1) -> dict[str, tuple[Callable, Callable]]:
    """operation name -> (prepare with full privileges, act after the drop)."""
    from bpf_asm.attach import attach_tracepoint
    from bpf_asm.maps import Map
    from bpf_asm.programs import load_program
    from injector.errors import InjectorError
    from injector.freeze import freeze
    from injector.inspect import getfd

    def load(_: Any) -> None:
        load_program(RETURN_ZERO, prog_type="tracepoint", name="privtest").close()

    def create_map(_: Any) -> None:
        Map.create("array", key_size=4, value_size=8, max_entries=1, name="privtest").close()

    def open_map() -> Map:
        return Map.create("hash", key_size=4, value_size=8, max_entries=4, name="privtest")

    def use_map(m: Map) -> None:
        m.update(b"\1\0\0\0", b"\2" * 8)
        assert m.lookup_bytes(b"\1\0\0\0") == b"\2" * 8

    def prog() -> Any:
        return load_program(RETURN_ZERO, prog_type="tracepoint", name="privtest")

    def attach(p: Any) -> None:
        attach_tracepoint(p, "syscalls", "sys_enter_getppid").close()

    def seize(_: Any) -> None:
        try:
            with freeze(target_pid, timeout=5):
                pass
        except InjectorError as exc:  # carries the ptrace errno in its text or cause
            cause = exc.__cause__ or exc.__context__
            err = getattr(cause, "errno", None)
            if err is None and "Operation not permitted" in str(exc):
                err = errno.EPERM
            raise OSError(err, str(exc)) from exc

    def pidfd(_: Any) -> None:
        os.close(getfd(target_pid, 0))

    def open_ns() -> int:
        return os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)

    def enter_ns(fd: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    def own_netns() -> None:  # bind in a private netns: nothing to collide with
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")

    def other_uid_fds(_: Any) -> None:
        # the router's view of a non-root pod's process: list its fds, read one, its fdinfo
        names = os.listdir(f"/proc/{other_uid_pid}/fd")
        assert names
        os.readlink(f"/proc/{other_uid_pid}/fd/{names[0]}")
        with open(f"/proc/{other_uid_pid}/fdinfo/{names[0]}") as f:
            f.read()

    def other_uid_memory(_: Any) -> None:
        # what replace_fd does inside a non-root pod's process: scratch memory, written, read
        try:
            with freeze(other_uid_pid, timeout=5) as proc, proc.scratch(16) as addr:
                proc.write_memory(addr, b"swap")
                assert proc.read_memory(addr, 4) == b"swap"
        except InjectorError as exc:
            cause = exc.__cause__ or exc.__context__
            err = getattr(cause, "errno", None)
            if err is None and "Operation not permitted" in str(exc):
                err = errno.EPERM
            raise OSError(err, str(exc)) from exc

    def low_bind(_: Any) -> None:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 80))

    def sigcont(_: Any) -> None:  # the eager swap's resume of a non-root pod's process
        os.kill(other_uid_pid, signal.SIGCONT)

    return {
        "bpf_load_tracing_program": (_nothing, load),
        "bpf_create_map": (_nothing, create_map),
        "bpf_use_open_map": (open_map, use_map),
        "perf_event_open_tracepoint": (prog, attach),
        "ptrace_seize_other_process": (_nothing, seize),
        "pidfd_getfd": (_nothing, pidfd),
        "setns_network": (open_ns, enter_ns),
        "read_proc_fd_other_uid": (_nothing, other_uid_fds),
        "inject_other_uid": (_nothing, other_uid_memory),
        "bind_port_below_1024": (own_netns, low_bind),
        "sigcont_other_uid": (_nothing, sigcont),
    }


def test_every_operation_is_tested() -> None:
    assert set(operations(1, 1)) == set(OPERATION_CAPS)


@pytest.fixture(scope="module")
def other_uid_proc() -> Iterator[subprocess.Popen]:
    """A process of uid/gid 65534 (nobody), dumpable: its /proc/PID/fd is 0500 and its own."""
    # (its own session, like a pod's: SIGCONT within one session needs no privilege)
    proc = subprocess.Popen(["sleep", "60"], user=65534, group=65534, extra_groups=[],
                            start_new_session=True)
    deadline = time.monotonic() + 5
    while os.stat(f"/proc/{proc.pid}/fd").st_uid != 65534:  # until the exec is done
        assert time.monotonic() < deadline, "the uid 65534 process did not start"
        time.sleep(0.01)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("name", sorted(OPERATION_CAPS))
def test_operation_needs_exactly_its_capabilities(name: str, target, netns_proc,
                                                  other_uid_proc) -> None:
    prepare, act = operations(target.pid, netns_proc.pid, other_uid_proc.pid)[name]
    needs = set(OPERATION_CAPS[name])
    result = in_child(prepare, needs, act)
    assert result[0] == "ok", f"{name} with {sorted(needs)}: {result}"
    for cap in sorted(needs):
        result = in_child(prepare, needs - {cap}, act)
        assert result[0] == "error" and result[1] in DENIED, \
            f"{name} without {cap} should be refused: {result}"
    if not needs:  # nothing at all is needed: also fine with an empty set
        assert in_child(prepare, set(), act)[0] == "ok"


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_daemon_set_keeps_run_time_operations_and_loses_the_rest(target, netns_proc) -> None:
    """After the drop: the open tracer-style map still works, a process can be frozen, a
    socket taken with pidfd_getfd, a listener made in a pod netns (fdpass's setns path);
    chown, raw sockets and raising priority are refused; /proc shows the reduced sets and
    NoNewPrivs."""
    from bpf_asm.maps import Map
    from injector.fdpass import listen_in_netns
    from injector.freeze import freeze
    from injector.inspect import getfd

    keep = privileges.daemon_required(tracer_open=True)

    def prepare() -> Map:
        return Map.create("lru_hash", key_size=8, value_size=8, max_entries=8, name="privtest")

    def act(tracked: Map) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tracked.update(bytes(8), bytes(8))
        with freeze(target.pid, timeout=5):
            out["frozen"] = True
        os.close(getfd(target.pid, 0))
        listen_in_netns(netns_proc.pid, b"\0privtest-%d" % os.getpid()).close()
        for what, call in (("chown", lambda: os.chown("/proc/self/fd/0", 1, 1)),
                           ("raw_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW,
                                                                socket.IPPROTO_ICMP).close()),
                           ("nice", lambda: os.setpriority(os.PRIO_PROCESS, 0, -5))):
            try:
                call()
                out[what] = "allowed"
            except OSError as exc:
                out[what] = exc.errno
        status = _status()
        out["CapEff"] = int(status["CapEff"], 16)
        out["CapBnd"] = int(status["CapBnd"], 16)
        out["CapPrm"] = int(status["CapPrm"], 16)
        out["NoNewPrivs"] = status["NoNewPrivs"]
        out["exec"] = subprocess.run(["grep", "^Cap[EB]", "/proc/self/status"],
                                     capture_output=True, text=True, check=True).stdout
        return out

    status, out = in_child(prepare, keep, act)
    assert status == "ok", out
    mask = privileges._mask(keep & privileges.current().permitted)
    assert out["frozen"]
    assert out["chown"] == out["raw_socket"] == errno.EPERM, out
    assert out["nice"] == errno.EACCES, out  # setpriority's word for it
    assert out["CapEff"] == out["CapPrm"] == out["CapBnd"] == mask
    assert out["NoNewPrivs"] == "1"
    # a root program exec'd by the daemon cannot get more than the bounding set
    assert f"CapEff:\t{mask:016x}" in out["exec"] and f"CapBnd:\t{mask:016x}" in out["exec"]


def test_drop_in_the_charts_container_without_setpcap() -> None:
    """The chart's container: bounding set = the chart's list, no CAP_SETPCAP. The drop still
    happens (it used to give up and keep everything): permitted and effective reduced,
    no_new_privs set, the start-up capabilities left in the bounding set but out of reach,
    also for a root program exec'd afterwards."""
    chart = {f"CAP_{c}" for c in privileges.chart_capabilities()}
    keep = privileges.daemon_required(tracer_open=True)

    def prepare() -> None:
        for name in sorted(privileges.current().bounding - chart):
            privileges._prctl(privileges.PR_CAPBSET_DROP, privileges.CAP_NUMBERS[name], name)
        privileges._capset(privileges._mask(chart), privileges._mask(chart), 0)

    def act(_: Any) -> Any:
        report = drop_privileges(keep)  # again, for the report (idempotent)
        status = _status()
        execd = subprocess.run(["grep", "^Cap[EPB]", "/proc/self/status"],
                               capture_output=True, text=True, check=True).stdout
        return report, status, execd

    result = in_child(prepare, keep, act)
    assert result[0] == "ok", result
    report, status, execd = result[1]
    mask = privileges._mask(keep)
    assert report.bounding_kept == ("CAP_PERFMON", "CAP_BPF") and report.no_new_privs
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == mask
    assert int(status["CapBnd"], 16) == privileges._mask(chart)
    assert f"CapPrm:\t{mask:016x}" in execd and f"CapEff:\t{mask:016x}" in execd, execd


def test_report_and_idempotence() -> None:
    def act(_: Any) -> Any:
        again = drop_privileges({"CAP_SYS_PTRACE", "CAP_CHOWN"})  # CAP_CHOWN is gone already
        return again

    status, again = in_child(_nothing, {"CAP_SYS_PTRACE"}, act)
    assert status == "ok"
    assert again.kept == ("CAP_SYS_PTRACE",) and again.missing == ("CAP_CHOWN",)
    assert again.dropped == () and again.bounding_dropped == () and again.no_new_privs


def test_threads_started_before_the_drop_are_named() -> None:
    def prepare() -> threading.Event:
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        return stop

    def act(stop: threading.Event) -> Any:
        report = drop_privileges({"CAP_SYS_PTRACE"})
        stop.set()
        return report.other_threads

    status, others = in_child(prepare, {"CAP_SYS_PTRACE", "CAP_SETPCAP"}, act)
    assert status == "ok" and len(others) == 1


def test_unknown_capability_is_named() -> None:
    with pytest.raises(ValueError, match="CAP_FLY"):
        drop_privileges({"CAP_FLY"})



def test_open_tracer_keeps_working_without_bpf_and_perfmon() -> None:
    """daemon_required(tracer_open=True) has neither CAP_BPF nor CAP_PERFMON: the tracer
    opened before the drop still reports connections, tracks fds and detaches cleanly."""
    from ebpfrouter.tracer import EventKind, Tracer

    keep = privileges.daemon_required(tracer_open=True)
    assert not keep & {"CAP_BPF", "CAP_PERFMON"}

    def prepare() -> Tracer:
        tracer = Tracer(host_netns_inode=0, max_tracked=1024)  # trace our own namespace too
        tracer.open()
        return tracer

    def act(tracer: Tracer) -> list[str]:
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen()
            with socket.socket() as cli:
                cli.connect(srv.getsockname())
                conn, _ = srv.accept()
                conn.close()
        kinds: set[EventKind] = set()
        deadline = time.monotonic() + 5
        while not {EventKind.CONNECT, EventKind.ACCEPT, EventKind.CLOSE} <= kinds:
            assert time.monotonic() < deadline, kinds
            kinds |= {e.kind for e in tracer.read(timeout=0.1) if e.pid == os.getpid()}
        with socket.socket() as extra:
            tracer.track(os.getpid(), extra.fileno())
            assert (os.getpid(), extra.fileno()) in tracer.tracked()
        tracer.close()
        return sorted(k.name for k in kinds)

    status, kinds = in_child(prepare, keep, act)
    assert status == "ok", kinds
    assert {"CONNECT", "ACCEPT", "CLOSE"} <= set(kinds)
