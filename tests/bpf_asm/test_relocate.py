"""bpf_asm.relocate: the one place map fds go into instructions (builder, text, ELF programs)."""

from __future__ import annotations

import pytest

from bpf_asm import isa, relocate
from bpf_asm.builder import Builder, BuildError, UnknownMapError
from bpf_asm.elf import read_elf, write_elf
from bpf_asm.isa import R0, R1, R2, Instruction, Instructions
from bpf_asm.relocate import map_fd, resolve_maps, with_map_fd
from bpf_asm.text import assemble


class FakeMap:
    """Stands in for bpf_asm.maps.Map: relocation only reads `.fd`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


def _program() -> Builder:
    b = Builder()
    b.ld_map_fd(R1, "events")
    b.ld_map_value(R2, "config", 12)
    b.mov64(R0, 0)
    b.exit()
    return b


def test_fds_and_value_offsets_are_written_into_the_loads() -> None:
    unresolved = _program().build()
    assert unresolved.map_refs == {0: "events", 2: "config"}
    out = resolve_maps(unresolved, {"events": FakeMap(7), "config": 8})
    assert out[0] == isa.ld_map_fd(R1, 7)
    assert out[1] == isa.ld_map_value(R2, 8, 12)  # the offset survives
    assert out.map_refs == unresolved.map_refs and out[2:] == unresolved[2:]
    assert unresolved[0] == isa.ld_map_fd(R1, 0)  # a copy: the input is untouched
    assert with_map_fd(isa.ld_imm64(R1, 0), 3) == isa.ld_map_fd(R1, 3)


def test_builder_text_and_elf_programs_all_resolve_here(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = relocate.with_map_fd

    def spy(insn: Instruction, fd: int) -> Instruction:
        calls.append(fd)
        return real(insn, fd)

    monkeypatch.setattr(relocate, "with_map_fd", spy)
    maps = {"events": FakeMap(5), "config": FakeMap(6)}
    built = _program().build(maps)
    assert calls == [5, 6]
    assert assemble(str(_program().build()), maps) == built
    assert calls == [5, 6] * 2
    elf_prog = read_elf(write_elf(assemble("r1 = events ll\nr0 = 0\nexit"),
                                  [{"name": "events", "type": 4}])).program("prog")
    assert elf_prog.insns.with_maps(maps)[0] == isa.ld_map_fd(R1, 5)
    assert calls == [5, 6] * 2 + [5]


def test_errors_name_the_map_and_the_instruction() -> None:
    unresolved = _program().build()
    with pytest.raises(UnknownMapError, match=r"unknown map 'config' \(maps given: events\)") as e:
        resolve_maps(unresolved, {"events": 3})
    assert e.value.index == 1 and isinstance(e.value, BuildError)
    with pytest.raises(ValueError, match="unknown map 'config'"):  # with_maps: a ValueError
        unresolved.with_maps({"events": 3})
    for bad in (FakeMap(-1), -1, 1 << 31, object()):
        with pytest.raises(UnknownMapError, match="map 'x' has no valid file descriptor"):
            map_fd("x", bad)
    assert map_fd("x", FakeMap(4)) == 4 and map_fd("x", 0) == 0
    wrong = Instructions([isa.alu("mov", R1, 0), isa.exit_()], {0: "events"})
    with pytest.raises(BuildError, match="'events' at slot 0 is not on a 64-bit load"):
        resolve_maps(wrong, {"events": 3})
    inside = Instructions([isa.ld_imm64(R1, 0), isa.exit_()], {1: "events"})
    with pytest.raises(BuildError, match="at slot 1 is not on a 64-bit load"):
        resolve_maps(inside, {"events": 3})
