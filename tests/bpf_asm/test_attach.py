"""Attaching to tracepoints and raw tracepoints on the real kernel; kprobes where absent."""

from __future__ import annotations

import errno
import os

import pytest
import rawprogs as rp

from bpf_asm import attach as attach_mod
from bpf_asm.attach import (
    attach_kprobe,
    attach_raw_tracepoint,
    attach_tracepoint,
    kprobes_supported,
)
from bpf_asm.maps import Map
from bpf_asm.programs import load_program
from bpf_asm.syscall import BPFError, Cmd, NotSupportedError
from bpf_asm.tracefs import TracepointNotFoundError

pytestmark = pytest.mark.root


no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind


def counting_program(counter_fd: int, tgid: int) -> bytes:
    """counter[0] += 1 for every hit from process `tgid`."""
    return b"".join([
        rp.call(rp.GET_CURRENT_PID_TGID),
        rp.rsh64_imm(0, 32),
        rp.jne_imm(0, tgid, 9),
        rp.st_w(10, -4, 0),
        rp.mov64_reg(2, 10),
        rp.add64_imm(2, -4),
        rp.ld_map_fd(1, counter_fd),
        rp.call(rp.MAP_LOOKUP_ELEM),
        rp.jeq_imm(0, 0, 2),
        rp.mov64_imm(1, 1),
        rp.atomic_fetch_add_dw(0, 1, 0),
        rp.return_zero(),
    ])


@pytest.fixture
def counter(unique_name: str):
    with Map.create("array", value_size=8, max_entries=1, name=unique_name,
                    key="<I", value="<Q") as m:
        yield m


def test_tracepoint_counts_our_calls_and_detaches(counter: Map, unique_name: str) -> None:
    with load_program(counting_program(counter.fd, os.getpid()), "tracepoint",
                      name=unique_name) as prog:
        with attach_tracepoint(prog, "syscalls", "sys_enter_getppid") as link:
            for _ in range(37):
                os.getppid()
            assert counter[0] == 37
            info = link.info()
            assert info.prog_id == prog.id
            links = rp.bpftool("link", "show", "id", str(info.id))
            assert links["type"] == "perf_event" and links["prog_id"] == prog.id
        os.getppid()
        assert counter[0] == 37  # detached by closing
        assert link.closed


def test_ioctl_fallback_when_kernel_lacks_perf_links(counter: Map, unique_name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real_bpf = attach_mod.bpf

    def old_kernel_bpf(cmd, attr, what=""):
        if cmd == Cmd.LINK_CREATE:
            raise BPFError(errno.EINVAL, "BPF_LINK_CREATE (simulated pre-5.15 kernel)")
        return real_bpf(cmd, attr, what)

    monkeypatch.setattr(attach_mod, "bpf", old_kernel_bpf)
    with load_program(counting_program(counter.fd, os.getpid()), name=unique_name) as prog:
        with attach_tracepoint(prog, "syscalls", "sys_enter_getppid") as link:
            assert link.fd == -1 and link.perf_fd >= 0
            for _ in range(5):
                os.getppid()
            assert counter[0] == 5
        os.getppid()
        assert counter[0] == 5


def test_missing_tracepoint_is_one_clear_error(counter: Map, unique_name: str) -> None:
    with load_program(counting_program(counter.fd, os.getpid()), name=unique_name) as prog:
        with pytest.raises(TracepointNotFoundError) as info:
            attach_tracepoint(prog, "syscalls", "sys_enter_nope")
        assert "tracepoint syscalls:sys_enter_nope not found" in str(info.value)
        assert isinstance(info.value, FileNotFoundError)
        with pytest.raises(TracepointNotFoundError, match="nosuchcat:x"):
            attach_tracepoint(prog, "nosuchcat", "x")


def test_wrong_program_type_names_the_tracepoint(counter: Map, unique_name: str) -> None:
    with load_program(rp.return_zero(), "socket_filter", name=unique_name) as prog:
        with pytest.raises(ValueError, match=f"cannot attach socket_filter program "
                           f"'{unique_name}' to tracepoint syscalls:sys_enter_getppid: it "
                           "needs a tracepoint program"):
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid")
        with pytest.raises(ValueError, match="needs a raw_tracepoint program"):
            attach_raw_tracepoint(prog, "sys_enter")


def test_raw_tracepoint(counter: Map, unique_name: str) -> None:
    with load_program(counting_program(counter.fd, os.getpid()), "raw_tracepoint",
                      name=unique_name) as prog:
        with attach_raw_tracepoint(prog, "sys_enter") as link:
            os.getppid()
            assert counter[0] >= 1  # every syscall of ours counts
            assert rp.bpftool("link", "show", "id", str(link.info().id))["type"] == \
                "raw_tracepoint"
        seen = counter[0]
        os.getppid()
        assert counter[0] == seen
        with pytest.raises(BPFError, match="BPF_RAW_TRACEPOINT_OPEN 'no_such_tp'") as info:
            attach_raw_tracepoint(prog, "no_such_tp")
        assert info.value.errno == errno.ENOENT


@pytest.mark.skipif(kprobes_supported(), reason="this kernel has kprobes")
def test_kprobe_not_supported_here(counter: Map, unique_name: str) -> None:
    with load_program(rp.return_zero(), "kprobe", name=unique_name) as prog:
        with pytest.raises(NotSupportedError,
                           match="kprobes are not supported by this kernel") as info:
            attach_kprobe(prog, "tcp_v4_connect")
        assert info.value.errno == errno.EOPNOTSUPP
        assert "tcp_v4_connect" in str(info.value)


def test_no_program_left_behind(counter: Map, unique_name: str) -> None:
    prog = load_program(counting_program(counter.fd, os.getpid()), name=unique_name)
    link = attach_tracepoint(prog, "syscalls", "sys_enter_getppid")
    prog.close()  # the link keeps the program alive
    assert unique_name in rp.kernel_prog_names()
    link.close()
    assert rp.gone(unique_name)
