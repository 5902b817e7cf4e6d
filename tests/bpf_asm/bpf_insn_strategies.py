"""Hypothesis strategies for valid eBPF instructions (shared by the bpf_asm tests)."""

from __future__ import annotations

from hypothesis import strategies as st

from bpf_asm import isa
from bpf_asm.isa import Instruction, Reg

regs = st.sampled_from(list(Reg))
off16 = st.integers(-(1 << 15), (1 << 15) - 1)
imm32 = st.integers(-(1 << 31), (1 << 31) - 1)
imm64 = st.integers(-(1 << 63), (1 << 64) - 1)
wide = st.booleans()
operand = st.one_of(regs, imm32)


@st.composite
def _movsx(draw: st.DrawFn) -> Instruction:
    w = draw(wide)
    bits = draw(st.sampled_from([8, 16, 32] if w else [8, 16]))
    return isa.movsx(draw(regs), draw(regs), bits, w)


def llvm_forms() -> st.SearchStrategy[Instruction]:
    """Every instruction form that llvm-mc can also write (no pseudo calls or map loads)."""
    return st.one_of(
        st.builds(isa.alu, st.sampled_from(sorted(isa.ALU_OPS)), regs, operand, wide),
        st.builds(isa.neg, regs, wide),
        _movsx(),
        st.builds(isa.endian, st.sampled_from(["le", "be", "bswap"]), regs,
                  st.sampled_from([16, 32, 64])),
        st.builds(isa.jump, st.sampled_from(sorted(isa.JMP_OPS)), regs, operand, off16, wide),
        st.builds(isa.ja, off16),
        st.builds(isa.gotol, off16),  # llvm-mc 19 takes only 16-bit numeric gotol targets
        st.builds(isa.call, st.integers(1, 211)),
        st.just(isa.exit_()),
        st.builds(isa.ld_imm64, regs, imm64),
        st.builds(isa.ldx, st.sampled_from([8, 16, 32, 64]), regs, regs, off16),
        st.builds(isa.ldsx, st.sampled_from([8, 16, 32]), regs, regs, off16),
        st.builds(isa.stx, st.sampled_from([8, 16, 32, 64]), regs, regs, off16),
        st.builds(isa.st, st.sampled_from([8, 16, 32, 64]), regs, off16, imm32),
        st.builds(isa.atomic, st.sampled_from(sorted(isa.ATOMIC_OPS)), st.sampled_from([32, 64]),
                  regs, regs, off16, st.booleans()),
        st.builds(isa.xchg, st.sampled_from([32, 64]), regs, regs, off16),
        st.builds(isa.cmpxchg, st.sampled_from([32, 64]), regs, regs, off16),
    )


def all_forms() -> st.SearchStrategy[Instruction]:
    """Every form, including BPF-to-BPF calls and map loads by fd."""
    fd = st.integers(0, (1 << 31) - 1)
    return st.one_of(
        llvm_forms(),
        st.builds(isa.call_pc, imm32),
        st.builds(isa.gotol, imm32),
        st.builds(isa.ld_map_fd, regs, fd),
        st.builds(isa.ld_map_value, regs, fd, st.integers(0, (1 << 32) - 1)),
    )
