"""bpf_asm.builder and bpf_asm.helpers: labels, maps by name, helper names, their errors."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from bpf_asm import isa
from bpf_asm.builder import Builder, LabelError, UnknownMapError
from bpf_asm.helpers import HELPERS, UnknownHelperError, helper_id, helper_name
from bpf_asm.isa import R0, R1, R2, R3, R4, R5, R6, R10
from bpf_asm.text import assemble


class FakeMap:
    """Stands in for bpf_asm.maps.Map: the builder only reads `.fd`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


def test_forward_and_backward_jumps_count_slots() -> None:
    b = Builder()
    b.label("top")
    b.ld_imm64(R1, 1 << 40)       # two slots between top and the jump
    b.jeq(R1, 0, "out")
    b.ja("top")
    b.label("out")
    b.exit()
    prog = b.build()
    assert prog[1] == isa.jump("jeq", R1, 0, 1)
    assert prog[2] == isa.ja(-4)   # back over itself, jeq and both ld_imm64 slots
    assert prog == assemble(str(prog))


def test_labels_target_the_same_place_as_text() -> None:
    b = Builder()
    b.mov64(R0, 0).jsgt(R0, R1, "end").gotol("end").call_func("fn").label("end").exit()
    b.label("fn").mov64(R0, 1).exit()
    text = ("r0 = 0\nif r0 s> r1 goto end\ngotol end\ncall fn\nend:\nexit\n"
            "fn:\nr0 = 1\nexit\n")
    assert b.build() == assemble(text)


def test_duplicate_label_names_it() -> None:
    b = Builder().label("again")
    with pytest.raises(LabelError, match="duplicate label 'again'"):
        b.label("again")


def test_missing_label_names_it_and_the_known_ones() -> None:
    b = Builder().label("here").ja("there").exit()
    with pytest.raises(LabelError, match=r"undefined label 'there' \(known labels: here\)"):
        b.build()


def test_out_of_range_jump_names_the_label() -> None:
    b = Builder().jne(R1, R2, "far")
    for _ in range(1 << 15):
        b.mov64(R0, 0)
    b.label("far").exit()
    with pytest.raises(LabelError, match="label 'far' is 32768 slots away"):
        b.build()
    b2 = Builder().gotol("far")
    for _ in range(1 << 15):
        b2.mov64(R0, 0)
    assert b2.label("far").exit().build()[0] == isa.gotol(1 << 15)


def test_numeric_offsets_are_range_checked() -> None:
    with pytest.raises(LabelError, match="16-bit"):
        Builder().ja(1 << 15)
    with pytest.raises(LabelError, match="32-bit"):
        Builder().gotol(1 << 31)
    assert Builder().ja(-(1 << 15)).build() == [isa.ja(-(1 << 15))]


def test_maps_resolve_by_name_and_are_recorded() -> None:
    b = Builder()
    b.mov64(R6, R1)
    b.ld_map_fd(R1, "events")
    b.ld_map_value(R2, "config", 4)
    b.exit()
    prog = b.build(maps={"events": FakeMap(5), "config": 6})
    assert prog.map_refs == {1: "events", 3: "config"}
    assert prog[1] == isa.ld_map_fd(R1, 5)
    assert prog[2] == isa.ld_map_value(R2, 6, 4)
    again = b.build(maps={"events": FakeMap(9), "config": FakeMap(10)})  # build is repeatable
    assert again[1] == isa.ld_map_fd(R1, 9) and again.map_refs == prog.map_refs
    unresolved = b.build()
    assert unresolved[1] == isa.ld_map_fd(R1, 0) and unresolved.map_refs == prog.map_refs


def test_unknown_map_names_it_and_lists_the_given_maps() -> None:
    b = Builder().ld_map_fd(R1, "evnets").exit()
    with pytest.raises(UnknownMapError, match=r"unknown map 'evnets' \(maps given: events\)"):
        b.build(maps={"events": FakeMap(3)})
    with pytest.raises(UnknownMapError, match="map 'events' has no valid file descriptor"):
        Builder().ld_map_fd(R1, "events").build(maps={"events": FakeMap(-1)})


def test_helpers_by_name_or_id() -> None:
    a = Builder().call("map_lookup_elem").call("bpf_perf_event_output").call(14).build()
    assert [i.imm for i in a] == [1, 25, 14]
    with pytest.raises(UnknownHelperError, match="unknown BPF helper 'bpf_frobnicate'"):
        Builder().call("bpf_frobnicate")
    assert helper_name(helper_id("get_current_pid_tgid")) == "bpf_get_current_pid_tgid"
    with pytest.raises(UnknownHelperError, match="id 0"):
        helper_name(0)


def test_emit_rejects_non_instructions() -> None:
    with pytest.raises(TypeError, match="Instruction"):
        Builder().emit(0x95)  # type: ignore[arg-type]


def test_tracepoint_style_program_reads_well() -> None:
    """The shape the router's tracer uses: filter on a ctx field, build a record, output."""
    b = Builder()
    b.mov64(R6, R1)                          # ctx
    b.ldxdw(R2, R6, 16)                      # an argument
    b.jslt(R2, 0, "out")
    b.stxdw(R10, R2, -8)
    b.call("get_current_pid_tgid")
    b.stxdw(R10, R0, -16)
    b.mov64(R1, R6)
    b.ld_map_fd(R2, "events")
    b.ld_imm64(R3, 0xFFFFFFFF)               # BPF_F_CURRENT_CPU
    b.mov64(R4, R10).add64(R4, -16)
    b.mov64(R5, 16)
    b.call("perf_event_output")
    b.label("out").mov64(R0, 0).exit()
    prog = b.build(maps={"events": FakeMap(4)})
    assert len(prog) == 15 and prog.slots == 17
    assert str(prog).splitlines()[2] == "if r2 s< 0 goto +12"
    assert "r2 = events ll" in str(prog)


@pytest.mark.skipif(not shutil.which("bpftool") or not __import__("os").path.exists(
    "/sys/kernel/btf/vmlinux"), reason="needs bpftool and kernel BTF")
def test_helper_table_matches_running_kernel_enum() -> None:
    """The static table agrees with `enum bpf_func_id` in this kernel's BTF (append-only)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", "/sys/kernel/btf/vmlinux",
                          "format", "raw"], capture_output=True, text=True, check=True).stdout
    kernel = {int(v): n for n, v in re.findall(r"'BPF_FUNC_(\w+)' val=(\d+)", out)}
    assert kernel, "enum bpf_func_id not found in kernel BTF"
    for hid, name in kernel.items():
        assert HELPERS[hid] == name, (hid, name)
