"""bpf(2) wrapper: enums, errors that name the operation, the verifier log and its growth."""

from __future__ import annotations

import errno
import os

import pytest
import rawprogs as rp

from bpf_asm import programs
from bpf_asm.programs import load_program
from bpf_asm.syscall import (
    BPFError,
    Cmd,
    MapElemAttr,
    MapType,
    ProgType,
    VerifierError,
    bpf,
    check_obj_name,
    parse_cpu_list,
    possible_cpus,
)


def test_enum_names_parse_case_and_aliases() -> None:
    assert MapType.parse("hash") is MapType.HASH
    assert MapType.parse("PERCPU_ARRAY") is MapType.PERCPU_ARRAY
    assert MapType.parse("ring_buffer") is MapType.RINGBUF
    assert MapType.parse(27) is MapType.RINGBUF
    assert ProgType.parse("tracepoint") == 5
    assert ProgType.parse("raw_tp") is ProgType.RAW_TRACEPOINT


def test_unknown_enum_value_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown map type 'hashh'; known: hash, array"):
        MapType.parse("hashh")
    with pytest.raises(ValueError, match="unknown program type 999"):
        ProgType.parse(999)


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-3,5,7-8\n") == [0, 1, 2, 3, 5, 7, 8]
    assert parse_cpu_list("0") == [0]
    assert possible_cpus()[0] == 0


def test_object_names_are_checked() -> None:
    assert check_obj_name("ok_name.1", "map") == b"ok_name.1"
    with pytest.raises(ValueError, match="longer than 15"):
        check_obj_name("x" * 16, "map")
    with pytest.raises(ValueError, match="may only contain"):
        check_obj_name("bad-name", "program")


def test_bpf_error_is_an_oserror_naming_the_command() -> None:
    err = BPFError(errno.EPERM, "BPF_MAP_UPDATE_ELEM on map 'x'")
    assert isinstance(err, OSError)
    assert err.errno == errno.EPERM
    assert str(err) == "[Errno 1] BPF_MAP_UPDATE_ELEM on map 'x': Operation not permitted"


def test_verifier_error_shows_tail_keeps_whole_log() -> None:
    log = "\n".join(f"{i}: line {i}" for i in range(100)) + "\nprocessed 5 insns\n"
    err = VerifierError(errno.EACCES, "BPF_PROG_LOAD p", log)
    text = str(err)
    assert "99: line 99" in text and "88: line 88" in text
    assert "87: line 87" not in text  # only the tail
    assert "processed 5 insns" not in text
    assert err.log == log


@pytest.mark.root
def test_kernel_error_names_command_and_errno() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)  # not a map
    try:
        with pytest.raises(BPFError) as info:
            bpf(Cmd.MAP_LOOKUP_ELEM, MapElemAttr(map_fd=fd), "on map fd")
    finally:
        os.close(fd)
    assert info.value.errno == errno.EINVAL
    assert "BPF_MAP_LOOKUP_ELEM on map fd" in str(info.value)


@pytest.mark.root
def test_log_buffer_grows_on_enospc(monkeypatch: pytest.MonkeyPatch, unique_name: str) -> None:
    monkeypatch.setattr(programs, "LOG_SIZE_START", 64)
    with load_program(rp.return_zero(), name=unique_name, log_level=2) as prog:
        assert "processed 2 insns" in prog.log  # the full log, not a truncated 64 bytes
        assert len(prog.log) > 64
    with pytest.raises(VerifierError) as info:
        load_program(rp.mov64_imm(6, 1) * 40 + rp.rejected_program(), name=unique_name)
    assert len(info.value.log) > 64
    assert info.value.log.startswith("0: R1=ctx")
    assert "R2 !read_ok" in str(info.value)
