"""bpf_asm.isa: instruction values, encoding, decoding and their invariants."""

from __future__ import annotations

import struct

import pytest
from bpf_insn_strategies import all_forms
from hypothesis import given
from hypothesis import strategies as st

from bpf_asm import isa
from bpf_asm.isa import R0, R1, R2, R10, DecodeError, Instruction, Instructions, decode


@given(all_forms())
def test_decode_encode_roundtrip(insn: Instruction) -> None:
    data = insn.encode()
    assert len(data) == 8 * insn.slots
    assert decode(data) == [insn]


@given(st.lists(all_forms(), max_size=30))
def test_program_roundtrip_and_slots(insns: list[Instruction]) -> None:
    prog = Instructions(insns)
    raw = bytes(prog)
    assert len(raw) == 8 * prog.slots
    assert prog.slots == len(prog) + sum(1 for i in insns if i.code == isa.LD_IMM64)
    assert Instruction.decode_all(raw) == prog


def test_field_layout_is_kernel_layout() -> None:
    # struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; } (little endian)
    insn = Instruction(0x61, dst=3, src=7, off=-2, imm=-5)
    code, regs, off, imm = struct.unpack("<BBhi", insn.encode())
    assert (code, regs & 0xF, regs >> 4, off, imm) == (0x61, 3, 7, -2, -5)


def test_ld_imm64_is_one_value_of_two_slots() -> None:
    insn = isa.ld_imm64(R1, 0x1122334455667788)
    raw = insn.encode()
    assert insn.slots == 2 and len(raw) == 16
    assert struct.unpack_from("<I", raw, 4)[0] == 0x55667788
    assert struct.unpack_from("<I", raw, 12)[0] == 0x11223344
    assert raw[8:12] == b"\0\0\0\0"


def test_unsigned_spellings_normalise_to_equal_values() -> None:
    assert isa.ld_imm64(R1, 2**64 - 1) == isa.ld_imm64(R1, -1)
    assert Instruction(0xB7, 1, imm=0xFFFFFFFF) == Instruction(0xB7, 1, imm=-1)
    assert Instruction(0x79, 1, 2, off=0xFFF8) == Instruction(0x79, 1, 2, off=-8)


def test_map_value_packs_fd_and_offset() -> None:
    insn = isa.ld_map_value(R2, 7, 16)
    raw = insn.encode()
    assert raw[1] == (isa.BPF_PSEUDO_MAP_VALUE << 4) | 2
    assert struct.unpack_from("<I", raw, 4)[0] == 7
    assert struct.unpack_from("<I", raw, 12)[0] == 16


@pytest.mark.parametrize("kwargs, message", [
    ({"code": 0x100}, "opcode"),
    ({"code": 0xB7, "dst": 16}, "dst register"),
    ({"code": 0xB7, "off": 1 << 16}, "offset"),
    ({"code": 0xB7, "imm": 1 << 32}, "immediate"),
    ({"code": 0x18, "imm": 1 << 64}, "immediate"),
])
def test_out_of_range_fields_are_rejected(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Instruction(**kwargs)


@pytest.mark.parametrize("make, message", [
    (lambda: isa.alu("rol", R1, R2), "unknown ALU operation 'rol'"),
    (lambda: isa.jump("jfoo", R1, 1, 0), "unknown jump condition 'jfoo'"),
    (lambda: isa.movsx(R1, R2, 32, wide=False), "movsx32"),
    (lambda: isa.endian("le", R1, 8), "le8"),
    (lambda: isa.ldx(12, R1, R2), "12"),
    (lambda: isa.ldsx(64, R1, R2), "sign-extending"),
    (lambda: isa.atomic("add", 16, R1, R2), "atomic"),
    (lambda: isa.atomic("nand", 64, R1, R2), "unknown atomic operation 'nand'"),
])
def test_bad_constructor_arguments_name_the_problem(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_decode_rejects_partial_slots() -> None:
    with pytest.raises(DecodeError, match="12 bytes"):
        decode(b"\0" * 12)
    with pytest.raises(DecodeError, match="second half"):
        decode(isa.ld_imm64(R1, 5).encode()[:8])
    bad = bytearray(isa.ld_imm64(R1, 5).encode())
    bad[9] = 0x12  # registers in the second slot
    with pytest.raises(DecodeError, match="slot 0: the second slot"):
        decode(bytes(bad))


def test_unknown_opcode_decodes_and_prints_as_unknown() -> None:
    (insn,) = decode(b"\xff\x00\x00\x00\x00\x00\x00\x00")
    assert insn.code == 0xFF
    assert str(insn).startswith("<unknown")


def test_instructions_listing_and_map_refs() -> None:
    prog = Instructions([isa.ld_map_fd(R1, 4), isa.alu("mov", R0, 0), isa.exit_()],
                        map_refs={0: "events"})
    assert str(prog).splitlines() == ["r1 = events ll", "r0 = 0", "exit"]
    assert prog.slot_indices() == [0, 2, 3]
    assert "map_refs={0: 'events'}" in repr(prog)


def test_registers_and_jump_shape() -> None:
    assert int(R10) == 10 and R10.name == "R10"
    assert isa.ja(3).is_jump and isa.jump("jeq", R1, 0, 1).is_jump
    assert not isa.exit_().is_jump and not isa.call(1).is_jump
