"""The eBPF instruction set: registers, opcodes, `Instruction` values, encode/decode, disassembly.

An `Instruction` is a plain frozen value (code, dst, src, off, imm). The 16-byte `ld_imm64`
is *one* `Instruction` whose `imm` holds the whole 64-bit constant (for map values: fd in the
low 32 bits, offset in the high 32 bits, exactly as the kernel reads the two halves).

`str(insn)` prints LLVM's BPF syntax as `llvm-objdump -d --mcpu=v4 --no-print-imm-hex` does,
with two additions LLVM has no syntax for: a BPF-to-BPF call is `call pc+N` (as bpftool
prints it) and a map reference is `r1 = map_fd(FD) ll` / `r1 = map_value(FD, OFF) ll`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bpf_asm.relocate import MapFd

__all__ = [
    "Reg", "R0", "R1", "R2", "R3", "R4", "R5", "R6", "R7", "R8", "R9", "R10",
    "Instruction", "Instructions", "DecodeError", "decode", "ALU_OPS", "JMP_OPS", "ATOMIC_OPS",
    "alu", "neg", "movsx", "endian", "jump", "ja", "gotol", "call", "call_pc", "exit_",
    "ld_imm64", "ld_map_fd", "ld_map_value", "ldx", "ldsx", "stx", "st", "atomic", "xchg",
    "cmpxchg",
]


class Reg(IntEnum):
    """The eleven eBPF registers (r10 is the read-only frame pointer)."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = Reg

# Instruction classes (low 3 bits of the opcode).
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_JMP32, BPF_ALU64 = range(8)
# Sizes (load/store).
BPF_W, BPF_H, BPF_B, BPF_DW = 0x00, 0x08, 0x10, 0x18
# Modes (load/store).
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_MEMSX, BPF_ATOMIC = 0x00, 0x20, 0x40, 0x60, 0x80, 0xC0
# Operand source (ALU/JMP): immediate or register.
BPF_K, BPF_X = 0x00, 0x08
# ALU operations.
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH = range(0x00, 0x80, 0x10)
BPF_NEG, BPF_MOD, BPF_XOR, BPF_MOV, BPF_ARSH, BPF_END = range(0x80, 0xE0, 0x10)
BPF_TO_LE, BPF_TO_BE = BPF_K, BPF_X
# JMP operations.
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET, BPF_JNE, BPF_JSGT, BPF_JSGE = range(0x00, 0x80, 0x10)
BPF_CALL, BPF_EXIT, BPF_JLT, BPF_JLE, BPF_JSLT, BPF_JSLE = range(0x80, 0xE0, 0x10)
# Atomic operations (in imm).
BPF_FETCH = 0x01
BPF_XCHG = 0xE0 | BPF_FETCH
BPF_CMPXCHG = 0xF0 | BPF_FETCH
# Pseudo sources.
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
BPF_PSEUDO_CALL = 1
# The one 16-byte instruction.
LD_IMM64 = BPF_LD | BPF_IMM | BPF_DW

#: ALU operation name -> (op, assignment operator in LLVM syntax).
ALU_OPS: dict[str, tuple[int, str]] = {
    "add": (BPF_ADD, "+="), "sub": (BPF_SUB, "-="), "mul": (BPF_MUL, "*="),
    "div": (BPF_DIV, "/="), "or": (BPF_OR, "|="), "and": (BPF_AND, "&="),
    "lsh": (BPF_LSH, "<<="), "rsh": (BPF_RSH, ">>="), "mod": (BPF_MOD, "%="),
    "xor": (BPF_XOR, "^="), "mov": (BPF_MOV, "="), "arsh": (BPF_ARSH, "s>>="),
    "sdiv": (BPF_DIV, "s/="), "smod": (BPF_MOD, "s%="),
}
#: Conditional jump name -> (op, comparison operator in LLVM syntax).
JMP_OPS: dict[str, tuple[int, str]] = {
    "jeq": (BPF_JEQ, "=="), "jgt": (BPF_JGT, ">"), "jge": (BPF_JGE, ">="),
    "jset": (BPF_JSET, "&"), "jne": (BPF_JNE, "!="), "jsgt": (BPF_JSGT, "s>"),
    "jsge": (BPF_JSGE, "s>="), "jlt": (BPF_JLT, "<"), "jle": (BPF_JLE, "<="),
    "jslt": (BPF_JSLT, "s<"), "jsle": (BPF_JSLE, "s<="),
}
ATOMIC_OPS: dict[str, int] = {"add": BPF_ADD, "or": BPF_OR, "and": BPF_AND, "xor": BPF_XOR}
SIZES: dict[int, int] = {8: BPF_B, 16: BPF_H, 32: BPF_W, 64: BPF_DW}
SIZE_BITS: dict[int, int] = {v: k for k, v in SIZES.items()}

_ALU_SYMBOL = {op: sym for name, (op, sym) in ALU_OPS.items() if name not in ("sdiv", "smod")}
_ALU_SYMBOL[BPF_ARSH] = "s>>="
_JMP_SYMBOL = {op: sym for op, sym in JMP_OPS.values()}
_ATOMIC_SYMBOL = {BPF_ADD: ("+=", "add"), BPF_OR: ("|=", "or"), BPF_AND: ("&=", "and"),
                  BPF_XOR: ("^=", "xor")}


class DecodeError(ValueError):
    """Bytes that are not a whole number of eBPF instruction slots."""


def _signed(value: int, bits: int, what: str) -> int:
    """Return `value` as a signed `bits`-bit integer; accept the unsigned spelling too."""
    if not -(1 << (bits - 1)) <= value < (1 << bits):
        raise ValueError(f"{what} {value} does not fit in {bits} bits")
    return value - (1 << bits) if value >= (1 << (bits - 1)) else value


@dataclass(frozen=True, slots=True)
class Instruction:
    """One eBPF instruction; `ld_imm64` is one value with a 64-bit `imm` (two slots)."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF:
            raise ValueError(f"opcode {self.code:#x} does not fit in 8 bits")
        for name in ("dst", "src"):
            value = getattr(self, name)
            if not 0 <= value <= 15:
                raise ValueError(f"{name} register {value} is not 0..15")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "off", _signed(self.off, 16, "offset"))
        bits = 64 if self.code == LD_IMM64 else 32
        object.__setattr__(self, "imm", _signed(self.imm, bits, "immediate"))

    # -- shape -------------------------------------------------------------------------
    @property
    def cls(self) -> int:
        """The instruction class (`BPF_LD` .. `BPF_ALU64`)."""
        return self.code & 0x07

    @property
    def slots(self) -> int:
        """Number of 8-byte slots: 2 for `ld_imm64`, else 1."""
        return 2 if self.code == LD_IMM64 else 1

    @property
    def is_jump(self) -> bool:
        """True for `goto`, `gotol` and conditional jumps (not call/exit)."""
        if self.cls not in (BPF_JMP, BPF_JMP32):
            return False
        return (self.code & 0xF0) not in (BPF_CALL, BPF_EXIT)

    # -- bytes -------------------------------------------------------------------------
    def encode(self) -> bytes:
        """The kernel encoding: 8 bytes, or 16 for `ld_imm64`."""
        regs = (self.src << 4) | self.dst
        if self.code == LD_IMM64:
            lo, hi = self.imm & 0xFFFFFFFF, (self.imm >> 32) & 0xFFFFFFFF
            return (struct.pack("<BBhI", self.code, regs, self.off, lo)
                    + struct.pack("<BBhI", 0, 0, 0, hi))
        return struct.pack("<BBhi", self.code, regs, self.off, self.imm)

    def __bytes__(self) -> bytes:
        return self.encode()

    @staticmethod
    def decode_all(data: bytes) -> Instructions:
        """Decode raw bytes (8 per slot) into `Instructions`."""
        return decode(data)

    # -- text --------------------------------------------------------------------------
    def __str__(self) -> str:
        return _format(self)


def decode(data: bytes) -> Instructions:
    """Decode raw bytes (8 per slot, little endian) into `Instructions`."""
    if len(data) % 8:
        raise DecodeError(f"{len(data)} bytes is not a whole number of 8-byte slots")
    out = Instructions()
    pos = 0
    while pos < len(data):
        code, regs, off, imm = struct.unpack_from("<BBhi", data, pos)
        if code == LD_IMM64:
            if pos + 16 > len(data):
                raise DecodeError(f"ld_imm64 at slot {pos // 8} is missing its second half")
            if data[pos + 8:pos + 12] != b"\0\0\0\0":
                raise DecodeError(f"ld_imm64 at slot {pos // 8}: the second slot's code, "
                                  "registers and offset must be zero")
            lo = imm & 0xFFFFFFFF
            hi = struct.unpack_from("<I", data, pos + 12)[0]
            imm = lo | (hi << 32)
            pos += 16
        else:
            pos += 8
        out.append(Instruction(code, regs & 0x0F, regs >> 4, off, imm))
    return out


class Instructions(list[Instruction]):
    """A program: a list of `Instruction` plus `map_refs` (ld_imm64 slot -> map name).

    `len()` counts instructions; `slots` counts 8-byte slots (jump offsets and the
    kernel's `insn_cnt` are in slots). `bytes()` is the raw encoding, `str()` a listing
    that `bpf_asm.text.assemble` reads back.
    """

    def __init__(self, insns: Iterable[Instruction] = (),
                 map_refs: dict[int, str] | None = None) -> None:
        super().__init__(insns)
        self.map_refs: dict[int, str] = dict(map_refs or {})

    @property
    def slots(self) -> int:
        """Total number of 8-byte slots."""
        return sum(insn.slots for insn in self)

    def slot_indices(self) -> list[int]:
        """The slot index at which each instruction starts."""
        out, slot = [], 0
        for insn in self:
            out.append(slot)
            slot += insn.slots
        return out

    def __bytes__(self) -> bytes:
        return b"".join(insn.encode() for insn in self)

    def with_maps(self, maps: Mapping[str, MapFd]) -> Instructions:
        """A copy whose map loads (`map_refs`) carry the fds of `maps` (name -> object with
        an integer `.fd`, or a plain fd); a name missing from `maps` is an UnknownMapError
        (a ValueError) naming it. See `bpf_asm.relocate.resolve_maps`."""
        from bpf_asm.relocate import resolve_maps  # relocate builds on this module

        return resolve_maps(self, maps)

    def __str__(self) -> str:
        return self.listing(numbered=False)

    def listing(self, numbered: bool = True) -> str:
        """The disassembly, one instruction a line; `numbered` prefixes each line with its
        slot index as llvm-objdump does (the numbers the verifier log uses). Both forms
        assemble back with `bpf_asm.text.assemble`."""
        lines = []
        for slot, insn in zip(self.slot_indices(), self, strict=True):
            name = self.map_refs.get(slot)
            text = _format_map_ref(insn, name) if name and insn.code == LD_IMM64 else str(insn)
            lines.append(f"{slot:>5}:\t{text}" if numbered else text)
        return "\n".join(lines) + ("\n" if lines else "")

    def __repr__(self) -> str:
        return f"Instructions({list.__repr__(self)}, map_refs={self.map_refs!r})"


# -- disassembly -----------------------------------------------------------------------

def _reg(n: int, wide: bool = True) -> str:
    return f"{'r' if wide else 'w'}{n}"


def _mem(size: int, base: int, off: int, signed: bool = False) -> str:
    kind = "s" if signed else "u"
    return f"*({kind}{SIZE_BITS[size]} *)({_addr(base, off)})"


def _addr(base: int, off: int) -> str:
    return f"r{base} {'-' if off < 0 else '+'} {abs(off)}"


def _rel(off: int) -> str:
    return f"{'-' if off < 0 else '+'}{abs(off)}"


def _format_map_ref(insn: Instruction, name: str) -> str:
    if insn.src == BPF_PSEUDO_MAP_VALUE:
        return f"r{insn.dst} = map_value({name}, {(insn.imm >> 32) & 0xFFFFFFFF}) ll"
    return f"r{insn.dst} = {name} ll"


def _unknown(insn: Instruction) -> str:
    return f"<unknown: {insn.encode().hex(' ')}>"


def _unused_fields_are_zero(insn: Instruction) -> bool:
    """False when a field the instruction does not use is non-zero (or a register is
    beyond r10): such bytes print as `<unknown>` rather than as a lossy line."""
    if insn.dst > 10 or insn.src > 10:
        return False
    cls, op, x = insn.cls, insn.code & 0xF0, insn.code & BPF_X
    if cls in (BPF_ALU, BPF_ALU64):
        if op in (BPF_NEG, BPF_END):
            return insn.src == 0 and insn.off == 0 and (op == BPF_END or insn.imm == 0) and (
                op == BPF_END or not x)
        offs = {BPF_DIV: (0, 1), BPF_MOD: (0, 1), BPF_MOV: (0, 8, 16, 32) if x else (0,)}
        return insn.off in offs.get(op, (0,)) and (insn.imm == 0 if x else insn.src == 0)
    if cls in (BPF_JMP, BPF_JMP32):
        if op == BPF_JA:
            zero = (insn.imm,) if cls == BPF_JMP else (insn.off,)
            return not x and insn.dst == insn.src == 0 and zero == (0,)
        if op in (BPF_CALL, BPF_EXIT):
            return not x and insn.dst == 0 and insn.off == 0 and (
                op == BPF_CALL or insn.src == insn.imm == 0)
        return insn.imm == 0 if x else insn.src == 0
    mode = insn.code & 0xE0
    if insn.code == LD_IMM64:
        return insn.off == 0
    if cls == BPF_LDX or (cls == BPF_STX and mode == BPF_MEM):
        return insn.imm == 0
    if cls == BPF_ST:
        return insn.src == 0
    return True


def _format(insn: Instruction) -> str:
    if not _unused_fields_are_zero(insn):
        return _unknown(insn)
    cls, code, d, s = insn.cls, insn.code, insn.dst, insn.src
    if cls in (BPF_ALU, BPF_ALU64):
        return _format_alu(insn)
    if cls in (BPF_JMP, BPF_JMP32):
        return _format_jmp(insn)
    size, mode = code & 0x18, code & 0xE0
    if code == LD_IMM64:
        if s == 0:
            return f"r{d} = {insn.imm} ll"
        if s == BPF_PSEUDO_MAP_FD:
            return f"r{d} = map_fd({insn.imm & 0xFFFFFFFF}) ll"
        if s == BPF_PSEUDO_MAP_VALUE:
            return f"r{d} = map_value({insn.imm & 0xFFFFFFFF}, {(insn.imm >> 32) & 0xFFFFFFFF}) ll"
        return _unknown(insn)
    if cls == BPF_LDX and mode == BPF_MEM:
        return f"{_reg(d, size == BPF_DW)} = {_mem(size, s, insn.off)}"
    if cls == BPF_LDX and mode == BPF_MEMSX and size != BPF_DW:
        return f"r{d} = {_mem(size, s, insn.off, signed=True)}"
    if cls == BPF_STX and mode == BPF_MEM:
        return f"{_mem(size, d, insn.off)} = {_reg(s, size == BPF_DW)}"
    if cls == BPF_ST and mode == BPF_MEM:
        return f"{_mem(size, d, insn.off)} = {insn.imm}"
    if cls == BPF_STX and mode == BPF_ATOMIC and size in (BPF_W, BPF_DW):
        return _format_atomic(insn)
    return _unknown(insn)


def _format_alu(insn: Instruction) -> str:
    wide = insn.cls == BPF_ALU64
    op, x = insn.code & 0xF0, insn.code & BPF_X
    d = _reg(insn.dst, wide)
    operand = _reg(insn.src, wide) if x else str(insn.imm)
    if op == BPF_END:
        if insn.imm not in (16, 32, 64) or (wide and x):
            return _unknown(insn)
        kind = "bswap" if wide else ("be" if x else "le")
        return f"r{insn.dst} = {kind}{insn.imm} r{insn.dst}"
    if op == BPF_NEG:
        return f"{d} = -{d}"
    if op == BPF_MOV and x and insn.off:
        if insn.off not in (8, 16, 32) or (insn.off == 32 and not wide):
            return _unknown(insn)
        return f"{d} = (s{insn.off}){operand}"
    if op in (BPF_DIV, BPF_MOD) and insn.off == 1:
        return f"{d} s{_ALU_SYMBOL[op]} {operand}"
    if op not in _ALU_SYMBOL or insn.off:
        return _unknown(insn)
    return f"{d} {_ALU_SYMBOL[op]} {operand}"


def _format_jmp(insn: Instruction) -> str:
    wide = insn.cls == BPF_JMP
    op, x = insn.code & 0xF0, insn.code & BPF_X
    if op == BPF_JA:
        return f"goto {_rel(insn.off)}" if wide else f"gotol {_rel(insn.imm)}"
    if op == BPF_CALL and wide:
        if insn.src == BPF_PSEUDO_CALL:
            return f"call pc{_rel(insn.imm)}"
        return f"call {insn.imm}" if insn.src == 0 else _unknown(insn)
    if op == BPF_EXIT and wide:
        return "exit"
    if op not in _JMP_SYMBOL:
        return _unknown(insn)
    operand = _reg(insn.src, wide) if x else str(insn.imm)
    return f"if {_reg(insn.dst, wide)} {_JMP_SYMBOL[op]} {operand} goto {_rel(insn.off)}"


def _format_atomic(insn: Instruction) -> str:
    wide = (insn.code & 0x18) == BPF_DW
    bits = 64 if wide else 32
    mem = _mem(insn.code & 0x18, insn.dst, insn.off)
    s = _reg(insn.src, wide)
    op, fetch = insn.imm & ~BPF_FETCH, insn.imm & BPF_FETCH
    if insn.imm == BPF_XCHG:
        return f"{s} = xchg{'' if wide else '32'}_{bits}({_addr(insn.dst, insn.off)}, {s})"
    if insn.imm == BPF_CMPXCHG:
        r0 = _reg(0, wide)
        return (f"{r0} = cmpxchg{'' if wide else '32'}_{bits}({_addr(insn.dst, insn.off)}, "
                f"{r0}, {s})")
    if op not in _ATOMIC_SYMBOL:
        return _unknown(insn)
    sym, name = _ATOMIC_SYMBOL[op]
    if fetch:
        return f"{s} = atomic_fetch_{name}((u{bits} *)({_addr(insn.dst, insn.off)}), {s})"
    return f"lock {mem} {sym} {s}"


# -- constructors ----------------------------------------------------------------------
# A source operand that is a `Reg` selects the register form (BPF_X); a plain int is an
# immediate (BPF_K). Sizes are given in bits (8, 16, 32, 64).

def _size(bits: int) -> int:
    if bits not in SIZES:
        raise ValueError(f"size must be 8, 16, 32 or 64 bits, not {bits}")
    return SIZES[bits]


def _is_reg(src: Reg | int) -> bool:
    return isinstance(src, Reg)


def alu(op: str, dst: Reg, src: Reg | int, wide: bool = True) -> Instruction:
    """ALU64 (`wide`) or ALU32 operation `op` (a key of `ALU_OPS`): `dst op= src`."""
    if op not in ALU_OPS:
        raise ValueError(f"unknown ALU operation {op!r} (known: {', '.join(ALU_OPS)})")
    code, _ = ALU_OPS[op]
    off = 1 if op in ("sdiv", "smod") else 0
    cls = BPF_ALU64 if wide else BPF_ALU
    if _is_reg(src):
        return Instruction(cls | code | BPF_X, dst, src, off, 0)
    return Instruction(cls | code | BPF_K, dst, 0, off, src)


def neg(dst: Reg, wide: bool = True) -> Instruction:
    """`dst = -dst`."""
    return Instruction((BPF_ALU64 if wide else BPF_ALU) | BPF_NEG, dst)


def movsx(dst: Reg, src: Reg, bits: int, wide: bool = True) -> Instruction:
    """Sign-extending move `dst = (s<bits>)src` (bits 8/16, or 32 when `wide`)."""
    if bits not in (8, 16, 32) or (bits == 32 and not wide):
        raise ValueError(f"movsx{'64' if wide else '32'} cannot sign-extend from {bits} bits")
    return Instruction((BPF_ALU64 if wide else BPF_ALU) | BPF_MOV | BPF_X, dst, src, bits)


def endian(kind: str, dst: Reg, bits: int) -> Instruction:
    """Byte swap: `kind` is "le", "be" (to that order) or "bswap" (unconditional)."""
    codes = {"le": BPF_ALU | BPF_END | BPF_TO_LE, "be": BPF_ALU | BPF_END | BPF_TO_BE,
             "bswap": BPF_ALU64 | BPF_END | BPF_TO_LE}
    if kind not in codes:
        raise ValueError(f"unknown byte swap {kind!r} (known: le, be, bswap)")
    if bits not in (16, 32, 64):
        raise ValueError(f"{kind}{bits}: byte swaps are 16, 32 or 64 bits")
    return Instruction(codes[kind], dst, 0, 0, bits)


def jump(op: str, dst: Reg, src: Reg | int, off: int, wide: bool = True) -> Instruction:
    """Conditional jump `if dst <op> src goto +off` (op a key of `JMP_OPS`)."""
    if op not in JMP_OPS:
        raise ValueError(f"unknown jump condition {op!r} (known: {', '.join(JMP_OPS)})")
    code = (BPF_JMP if wide else BPF_JMP32) | JMP_OPS[op][0]
    if _is_reg(src):
        return Instruction(code | BPF_X, dst, src, off, 0)
    return Instruction(code | BPF_K, dst, 0, off, src)


def ja(off: int) -> Instruction:
    """`goto +off` (16-bit offset)."""
    return Instruction(BPF_JMP | BPF_JA, off=off)


def gotol(off: int) -> Instruction:
    """`gotol +off` (JMP32 ja, 32-bit offset in imm)."""
    return Instruction(BPF_JMP32 | BPF_JA, imm=off)


def call(helper: int) -> Instruction:
    """Call helper number `helper` (see `bpf_asm.helpers` for names)."""
    return Instruction(BPF_JMP | BPF_CALL, imm=helper)


def call_pc(off: int) -> Instruction:
    """BPF-to-BPF call of the function starting `off` slots after the next one."""
    return Instruction(BPF_JMP | BPF_CALL, src=BPF_PSEUDO_CALL, imm=off)


def exit_() -> Instruction:
    """`exit` (return r0)."""
    return Instruction(BPF_JMP | BPF_EXIT)


def ld_imm64(dst: Reg, value: int) -> Instruction:
    """`dst = value ll` (any 64-bit constant, signed or unsigned spelling)."""
    return Instruction(LD_IMM64, dst, 0, 0, value)


def ld_map_fd(dst: Reg, fd: int) -> Instruction:
    """`dst = map` (BPF_PSEUDO_MAP_FD): the kernel replaces the fd with the map pointer."""
    if not 0 <= fd < (1 << 32):
        raise ValueError(f"map fd {fd} does not fit in 32 bits")
    return Instruction(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd)


def ld_map_value(dst: Reg, fd: int, off: int = 0) -> Instruction:
    """`dst = &map_value[off]` (BPF_PSEUDO_MAP_VALUE, for array maps / global data)."""
    if not 0 <= off < (1 << 32) or not 0 <= fd < (1 << 32):
        raise ValueError(f"map fd {fd} / value offset {off} does not fit in 32 bits")
    return Instruction(LD_IMM64, dst, BPF_PSEUDO_MAP_VALUE, 0, fd | (off << 32))


def ldx(bits: int, dst: Reg, src: Reg, off: int = 0) -> Instruction:
    """`dst = *(u<bits> *)(src + off)` (zero-extending load)."""
    return Instruction(BPF_LDX | BPF_MEM | _size(bits), dst, src, off)


def ldsx(bits: int, dst: Reg, src: Reg, off: int = 0) -> Instruction:
    """`dst = *(s<bits> *)(src + off)` (sign-extending load, bits 8/16/32)."""
    if bits == 64:
        raise ValueError("sign-extending loads are 8, 16 or 32 bits")
    return Instruction(BPF_LDX | BPF_MEMSX | _size(bits), dst, src, off)


def stx(bits: int, dst: Reg, src: Reg, off: int = 0) -> Instruction:
    """`*(u<bits> *)(dst + off) = src`."""
    return Instruction(BPF_STX | BPF_MEM | _size(bits), dst, src, off)


def st(bits: int, dst: Reg, off: int, imm: int) -> Instruction:
    """`*(u<bits> *)(dst + off) = imm`."""
    return Instruction(BPF_ST | BPF_MEM | _size(bits), dst, 0, off, imm)


def _atomic_size(bits: int) -> int:
    if bits not in (32, 64):
        raise ValueError(f"atomic operations are 32 or 64 bits, not {bits}")
    return SIZES[bits]


def atomic(op: str, bits: int, dst: Reg, src: Reg, off: int = 0,
           fetch: bool = False) -> Instruction:
    """`lock *(u<bits> *)(dst + off) <op>= src`; with `fetch`, src receives the old value."""
    if op not in ATOMIC_OPS:
        raise ValueError(f"unknown atomic operation {op!r} (known: {', '.join(ATOMIC_OPS)})")
    imm = ATOMIC_OPS[op] | (BPF_FETCH if fetch else 0)
    return Instruction(BPF_STX | BPF_ATOMIC | _atomic_size(bits), dst, src, off, imm)


def xchg(bits: int, dst: Reg, src: Reg, off: int = 0) -> Instruction:
    """Atomically swap `src` with `*(dst + off)`."""
    return Instruction(BPF_STX | BPF_ATOMIC | _atomic_size(bits), dst, src, off, BPF_XCHG)


def cmpxchg(bits: int, dst: Reg, src: Reg, off: int = 0) -> Instruction:
    """If `*(dst + off) == r0` store `src`; r0 receives the old value."""
    return Instruction(BPF_STX | BPF_ATOMIC | _atomic_size(bits), dst, src, off, BPF_CMPXCHG)
