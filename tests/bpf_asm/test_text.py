"""bpf_asm.text: the LLVM-syntax assembler, its round trip with str(), and its errors."""

from __future__ import annotations

import pytest
from bpf_insn_strategies import all_forms
from hypothesis import given, settings
from hypothesis import strategies as st

from bpf_asm import isa
from bpf_asm.isa import R0, R1, R2, Instruction, Instructions
from bpf_asm.text import AssemblerError, assemble


class FakeMap:
    """Stands in for bpf_asm.maps.Map: the assembler only reads `.fd`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


@given(all_forms())
def test_assemble_str_roundtrip(insn: Instruction) -> None:
    assert assemble(str(insn)) == [insn]


@given(st.lists(all_forms(), max_size=40))
def test_listing_roundtrip(insns: list[Instruction]) -> None:
    prog = Instructions(insns)
    again = assemble(str(prog))
    assert again == prog and bytes(again) == bytes(prog)


@given(st.lists(all_forms(), max_size=20))
def test_numbered_listing_roundtrip(insns: list[Instruction]) -> None:
    prog = Instructions(insns)
    listing = prog.listing()
    assert assemble(listing) == prog
    assert [int(line.split(":")[0]) for line in listing.splitlines()] == prog.slot_indices()


def test_map_names_roundtrip_through_listing() -> None:
    maps = {"events": FakeMap(11), "counts": FakeMap(12)}
    prog = assemble("r1 = events ll\nr2 = map_value(counts, 8) ll\nexit", maps=maps)
    assert prog[0] == isa.ld_map_fd(R1, 11)
    assert prog[1] == isa.ld_map_value(R2, 12, 8)
    assert prog.map_refs == {0: "events", 2: "counts"}
    assert str(prog).splitlines()[:2] == ["r1 = events ll", "r2 = map_value(counts, 8) ll"]
    assert assemble(str(prog), maps=maps) == prog


def test_without_maps_names_are_recorded_with_fd_zero() -> None:
    prog = assemble("r1 = events ll\nexit")
    assert prog[0] == isa.ld_map_fd(R1, 0)
    assert prog.map_refs == {0: "events"}


def test_comments_whitespace_labels_and_hex() -> None:
    prog = assemble("""
        ; a comment
        # another
        start:  r1 = 0x10     // trailing
                r1 += -0x2
        loop:   if r1 s> 0 goto loop_end
                goto loop
        loop_end:
                w0 = w1
                exit
    """)
    assert [str(i) for i in prog] == [
        "r1 = 16", "r1 += -2", "if r1 s> 0 goto +1", "goto -2", "w0 = w1", "exit"]


def test_call_names_helpers_and_labels() -> None:
    prog = assemble("call bpf_map_lookup_elem\ncall get_current_pid_tgid\ncall sub\n"
                    "exit\nsub:\nr0 = 0\nexit")
    assert [str(i) for i in prog[:3]] == ["call 1", "call 14", "call pc+1"]


def test_flexible_spacing_like_llvm_mc() -> None:
    assert assemble("r1=*(u32*)(r2+8)") == assemble("r1 = *(u32 *)(r2 + 8)")
    assert assemble("if r1>r2 goto +1") == assemble("if r1 > r2 goto +1")


BAD = [
    ("r1 = 5\nfrobnicate r1, r2\n", 2, "unknown mnemonic 'frobnicate'"),
    ("r1 +=\n", 1, "not a BPF instruction"),
    ("r1 = events\n", 1, "needs ' ll'"),
    ("r11 = 1\n", 1, "no register r11"),
    ("r1 += w2\n", 1, "mixes 64-bit (r) and 32-bit (w)"),
    ("if r1 > w2 goto +1\n", 1, "mixes"),
    ("w1 = *(u64 *)(r2 + 0)\n", 1, "needs a 64-bit register"),
    ("r1 = *(u32 *)(w2 + 0)\n", 1, "memory base"),
    ("r1 = *(u32 *)(r2 + 40000)\n", 1, "16 bits"),
    ("r1 = 4294967296\n", 1, "32 bits"),
    ("r1 = 18446744073709551616 ll\n", 1, "64 bits"),
    ("w1 = 1 ll\n", 1, "64-bit register"),
    ("r1 = be16 r2\n", 1, "in place"),
    ("w1 = (s32)w2\n", 1, "movsx32"),
    ("r1 = xchg_64(r1 + 0, r2)\n", 1, "source register"),
    ("r1 = cmpxchg_64(r1 + 0, r1, r2)\n", 1, "r0"),
    ("exit\ncall bpf_no_such_helper\n", 2, "unknown BPF helper 'bpf_no_such_helper'"),
    ("r1 = events ll\nr2 = nomap ll\n", 2, "unknown map 'nomap'"),
    ("a:\nexit\na:\nexit\n", 3, "duplicate label 'a'"),
    ("r0 = 0\ngoto nowhere\nexit\n", 2, "undefined label 'nowhere'"),
    ("goto +40000\n", 1, "16-bit"),
]


@pytest.mark.parametrize("text, lineno, reason", BAD, ids=[b[2] for b in BAD])
def test_bad_input_is_one_clear_error(text: str, lineno: int, reason: str) -> None:
    with pytest.raises(AssemblerError) as info:
        assemble(text, maps={"events": FakeMap(3)})
    err = info.value
    assert err.lineno == lineno
    assert err.line == text.splitlines()[lineno - 1]
    assert reason in str(err)
    assert f"line {lineno}:" in str(err) and repr(err.line.strip()) in str(err)


def test_jump_out_of_16_bit_range_names_the_label() -> None:
    body = "r0 = 0\n" * 40000
    with pytest.raises(AssemblerError, match="label 'far'.*16-bit") as info:
        assemble("goto far\n" + body + "far:\nexit\n")
    assert info.value.lineno == 1
    prog = assemble("gotol far\n" + body + "far:\nexit\n")  # gotol reaches it
    assert prog[0] == isa.gotol(40000)


def test_map_object_without_fd_is_rejected() -> None:
    with pytest.raises(AssemblerError, match="map 'events' has no valid file descriptor"):
        assemble("r1 = events ll", maps={"events": object()})


def test_single_instruction_and_r0_exit_example() -> None:
    prog = assemble("r0 = 0\nexit")
    assert prog == [isa.alu("mov", R0, 0), isa.exit_()]
    assert bytes(prog) == bytes.fromhex("b700000000000000 9500000000000000")


# opcodes some valid form uses, so random bytes mostly hit real instruction classes
_SAMPLES = (
    [isa.alu(op, R1, src, w) for op in isa.ALU_OPS for src in (R2, 1) for w in (True, False)]
    + [isa.neg(R1, w) for w in (True, False)]
    + [isa.endian(k, R1, 16) for k in ("le", "be", "bswap")]
    + [isa.jump(op, R1, src, 0, w) for op in isa.JMP_OPS for src in (R2, 1)
       for w in (True, False)]
    + [isa.ja(0), isa.gotol(0), isa.call(1), isa.exit_(), isa.ld_imm64(R1, 0)]
    + [f(bits, R1, R2) for f in (isa.ldx, isa.stx) for bits in (8, 16, 32, 64)]
    + [isa.ldsx(bits, R1, R2) for bits in (8, 16, 32)]
    + [isa.st(bits, R1, 0, 0) for bits in (8, 16, 32, 64)]
    + [isa.xchg(bits, R1, R2) for bits in (32, 64)]
)
CODES = sorted({insn.code for insn in _SAMPLES})


@settings(max_examples=2000)
@given(st.sampled_from(CODES) | st.integers(0, 255), st.binary(min_size=15, max_size=15),
       st.sampled_from([0, 1, 8, 16, 32, 64, 0xE1, 0xF1, 0x41]))
def test_any_bytes_either_print_unknown_or_roundtrip_exactly(code: int, rest: bytes,
                                                             imm: int) -> None:
    """The disassembler never prints a lossy line: unused non-zero fields mean `<unknown>`."""
    raw = bytes([code]) + rest
    if code == isa.LD_IMM64:
        raw = raw[:8] + bytes(4) + raw[12:]
    else:
        raw = raw[:8]
        if rest[0] & 1:  # often a small, meaningful imm (sizes, atomic ops) and zero off
            raw = raw[:2] + bytes(2) + imm.to_bytes(4, "little")
    insns = isa.decode(raw)
    text = str(insns)
    if "<unknown" not in text:
        assert bytes(assemble(text)) == raw
