"""Program loading against the real verifier, cross-checked with bpftool."""

from __future__ import annotations

import errno
import os

import pytest
import rawprogs as rp

from bpf_asm.maps import BPF_F_RDONLY_PROG, Map
from bpf_asm.programs import Program, ProgramSpec, load_program
from bpf_asm.syscall import BPFError, ProgType, VerifierError

pytestmark = pytest.mark.root


no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind


def test_load_and_bpftool_sees_it(unique_name: str) -> None:
    with Map.create("array", value_size=8, max_entries=1, name=unique_name) as ctr, \
            Map.create("ringbuf", max_entries=4096, name=unique_name) as rb:
        code = rp.event_program(ctr.fd, rb.fd, os.getpid(), ringbuf=True)
        with load_program(code, prog_type="tracepoint", name=unique_name) as prog:
            info = prog.info()
            assert info.name.decode() == unique_name
            assert info.type == ProgType.TRACEPOINT
            assert info.nr_map_ids == 2
            shown = rp.bpftool("prog", "show", "id", str(prog.id))
            assert shown["name"] == unique_name and shown["type"] == "tracepoint"
            assert shown["tag"] == bytes(info.tag).hex()
            assert sorted(shown["map_ids"]) == sorted([ctr.id, rb.id])
            assert shown["gpl_compatible"] is True
            xlated = rp.bpftool("prog", "dump", "xlated", "id", str(prog.id))
            assert xlated[0]["disasm"] == "(bf) r6 = r1"
            assert "call bpf_get_current_pid_tgid" in xlated[1]["disasm"]
            assert f"if r0 != {hex(os.getpid())} goto" in xlated[4]["disasm"]
    assert rp.gone(unique_name)


def test_spec_is_plain_data_and_loads_twice(unique_name: str) -> None:
    spec = ProgramSpec(rp.return_zero(), "socket_filter", unique_name, license="MIT")
    with spec.load() as a, spec.load() as b:
        assert a.id != b.id
        assert a.info().type == ProgType.SOCKET_FILTER
        assert not rp.bpftool("prog", "show", "id", str(a.id))["gpl_compatible"]
    assert rp.gone(unique_name)


def test_log_level_keeps_the_log_of_a_good_program(unique_name: str) -> None:
    with load_program(rp.return_zero(), name=unique_name, log_level=1) as prog:
        assert "processed 2 insns" in prog.log
    with load_program(rp.return_zero(), name=unique_name) as prog:
        assert prog.log == ""


def test_verifier_rejection_is_one_clear_error(unique_name: str) -> None:
    before = rp.kernel_prog_names().count(unique_name)
    with pytest.raises(VerifierError) as info:
        load_program(rp.rejected_program(), prog_type="tracepoint", name=unique_name)
    err = info.value
    assert err.errno == errno.EACCES
    text = str(err)
    assert text.startswith(f"[Errno 13] BPF_PROG_LOAD tracepoint program '{unique_name}': "
                           "Permission denied; verifier log (last lines):")
    assert text.rstrip().endswith("R2 !read_ok")
    assert err.log.startswith("0: R1=ctx")  # the whole log
    assert "processed" in err.log and "processed" not in text
    assert rp.kernel_prog_names().count(unique_name) == before


def test_helper_not_allowed_for_type(unique_name: str) -> None:
    # bpf_perf_event_output with a null context: rejected, the reason is the last line
    code = rp.mov64_imm(1, 0) + rp.mov64_imm(2, 0) + rp.call(rp.PERF_EVENT_OUTPUT) + \
        rp.return_zero()
    with pytest.raises(VerifierError, match="R1 type=scalar expected=ctx"):
        load_program(code, prog_type="socket_filter", name=unique_name)


def test_map_read_only_for_programs(unique_name: str) -> None:
    """A map created with BPF_F_RDONLY_PROG: user space writes, a program that writes is
    rejected by the verifier with a message saying so."""
    with Map.create("array", value_size=8, max_entries=1, name=unique_name,
                    flags=BPF_F_RDONLY_PROG) as m:
        m[b"\0\0\0\0"] = (5).to_bytes(8, "little")  # user space may write
        code = b"".join([
            rp.st_w(10, -4, 0), rp.mov64_reg(2, 10), rp.add64_imm(2, -4),
            rp.ld_map_fd(1, m.fd), rp.call(rp.MAP_LOOKUP_ELEM), rp.jeq_imm(0, 0, 2),
            rp.mov64_imm(1, 1), rp.stx_dw(0, 1, 0), rp.return_zero(),
        ])
        with pytest.raises(VerifierError, match="write into map forbidden"):
            load_program(code, name=unique_name)


def test_bad_input_before_the_kernel(unique_name: str) -> None:
    with pytest.raises(ValueError, match="multiple of 8 bytes, got 12"):
        load_program(b"\0" * 12, name=unique_name)
    with pytest.raises(ValueError, match="unknown program type 'tracepoin'"):
        load_program(rp.return_zero(), prog_type="tracepoin")
    with pytest.raises(ValueError, match="longer than 15"):
        load_program(rp.return_zero(), name="x" * 16)


def test_kernel_errors_without_a_log_name_the_program(unique_name: str) -> None:
    # An unknown program type number reaches the kernel, which refuses without a log.
    with pytest.raises(BPFError) as info:
        load_program(rp.return_zero(), prog_type=ProgType.NETFILTER, name=unique_name)
    assert f"BPF_PROG_LOAD netfilter program '{unique_name}'" in str(info.value)


def test_test_run_executes_the_program(unique_name: str) -> None:
    with load_program(rp.mov64_imm(0, 2) + rp.exit_(), prog_type="xdp",
                      name=unique_name) as prog:
        retval, _ = prog.test_run(data=bytes(64), repeat=3)
        assert retval == 2  # XDP_PASS
        assert prog.info().type == ProgType.XDP


def test_accepts_anything_bytes_accepts(unique_name: str) -> None:
    class Insns:
        def __bytes__(self) -> bytes:
            return rp.return_zero()

    with load_program(Insns(), "socket_filter", name=unique_name) as prog:
        assert prog.info().xlated_prog_len == 16


def test_pin_and_open_pinned(unique_name: str) -> None:
    path = f"/sys/fs/bpf/{unique_name}"
    with load_program(rp.return_zero(), "socket_filter", name=unique_name) as prog:
        prog.pin(path)
        try:
            with Program.open_pinned(path) as again:
                assert again.id == prog.id and again.name == unique_name
                assert again.prog_type == ProgType.SOCKET_FILTER
        finally:
            os.unlink(path)
