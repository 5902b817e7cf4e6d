"""Write eBPF programs in Python: one method per instruction, labels, maps by name.

    b = Builder()
    b.mov64(R1, 0)
    b.jeq(R1, 0, "out")          # forward jump to a label
    b.ld_map_fd(R1, "events")    # map by name, resolved by build()
    b.call("perf_event_output")  # helper by name or id
    b.label("out")
    b.exit()
    insns = b.build(maps={"events": events_map})

A source operand that is a `Reg` (R0..R10) selects the register form; a plain int is an
immediate. Jump targets are label names or relative offsets in slots. Labels and maps are
resolved by `build()`, which can be called more than once (e.g. with different maps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bpf_asm import isa
from bpf_asm.helpers import helper_id
from bpf_asm.isa import Instruction, Instructions, Reg
from bpf_asm.relocate import BuildError, MapFd, UnknownMapError, resolve_maps

__all__ = ["Builder", "BuildError", "LabelError", "UnknownMapError", "Src", "Target"]

Src = Reg | int
Target = str | int

_INT16 = (-(1 << 15), (1 << 15) - 1)
_INT32 = (-(1 << 31), (1 << 31) - 1)


class LabelError(BuildError):
    """A duplicate or missing label, or a jump whose offset does not fit its field."""


@dataclass(frozen=True)
class _Ref:
    """An instruction whose offset/imm waits for a label or a map fd."""

    kind: str            # "off" (16-bit jump), "imm" (gotol, pseudo call), "map"
    insn: Instruction    # template; the field to fill is zero
    target: Target       # label name, relative offset, or map name


class Builder:
    """Collects instructions and labels; `build()` resolves them into `Instructions`."""

    def __init__(self) -> None:
        self._items: list[Instruction | _Ref] = []
        self._labels: dict[str, int] = {}

    def __len__(self) -> int:
        """Number of instructions emitted so far."""
        return len(self._items)

    # -- structure ---------------------------------------------------------------------
    def emit(self, *insns: Instruction) -> Builder:
        """Append ready-made instructions."""
        for insn in insns:
            if not isinstance(insn, Instruction):
                raise TypeError(f"emit() takes Instruction values, not {insn!r}")
            self._items.append(insn)
        return self

    def label(self, name: str) -> Builder:
        """Name the position of the next instruction."""
        if not name or not isinstance(name, str):
            raise LabelError(f"a label needs a non-empty name, not {name!r}", len(self._items))
        if name in self._labels:
            raise LabelError(f"duplicate label {name!r}", len(self._items))
        self._labels[name] = len(self._items)
        return self

    @property
    def labels(self) -> dict[str, int]:
        """Label name -> index of the instruction it names."""
        return dict(self._labels)

    def _ref(self, kind: str, insn: Instruction, target: Target) -> Builder:
        if isinstance(target, int) and kind != "map":
            lo, hi = _INT16 if kind == "off" else _INT32
            if not lo <= target <= hi:
                bits = "16-bit off" if kind == "off" else "32-bit imm"
                raise LabelError(f"jump offset {target} does not fit in the {bits} field "
                                 f"({lo}..{hi})", len(self._items))
            values = {"off": insn.off, "imm": insn.imm, kind: target}
            return self.emit(Instruction(insn.code, insn.dst, insn.src, values["off"],
                                         values["imm"]))
        self._items.append(_Ref(kind, insn, target))
        return self

    # -- build -------------------------------------------------------------------------
    def build(self, maps: Mapping[str, MapFd] | None = None) -> Instructions:
        """Resolve labels and map names and return the program.

        `maps` maps names to objects with an integer `.fd` (or to plain fds). Without
        `maps`, map loads get fd 0 and are only recorded in `map_refs` (for ELF output or
        a later loader); with `maps`, an unknown name is an `UnknownMapError`. The fds are
        filled in by `bpf_asm.relocate.resolve_maps`.
        """
        slots, slot = [], 0
        for item in self._items:
            slots.append(slot)
            slot += (item.insn if isinstance(item, _Ref) else item).slots
        slots.append(slot)  # a label after the last instruction
        out = Instructions()
        for index, item in enumerate(self._items):
            if isinstance(item, Instruction):
                out.append(item)
            elif item.kind == "map":
                out.map_refs[slots[index]] = str(item.target)
                out.append(item.insn)  # fd 0 until resolved
            else:
                out.append(self._resolve_jump(item, index, slots))
        return out if maps is None else resolve_maps(out, maps)

    def _resolve_jump(self, ref: _Ref, index: int, slots: list[int]) -> Instruction:
        name = ref.target
        if name not in self._labels:
            known = ", ".join(sorted(self._labels)) or "none"
            raise LabelError(f"undefined label {name!r} (known labels: {known})", index)
        off = slots[self._labels[name]] - (slots[index] + 1)
        insn = ref.insn
        if ref.kind == "off":
            if not _INT16[0] <= off <= _INT16[1]:
                raise LabelError(f"jump to label {name!r} is {off} slots away, out of the "
                                 f"16-bit range of goto/if (use gotol)", index)
            return Instruction(insn.code, insn.dst, insn.src, off, insn.imm)
        if not _INT32[0] <= off <= _INT32[1]:
            raise LabelError(f"jump to label {name!r} is {off} slots away, out of the 32-bit "
                             "range", index)
        return Instruction(insn.code, insn.dst, insn.src, insn.off, off)

    # -- ALU ---------------------------------------------------------------------------
    def add64(self, dst: Reg, src: Src) -> Builder:
        """`dst += src`."""
        return self.emit(isa.alu("add", dst, src))

    def sub64(self, dst: Reg, src: Src) -> Builder:
        """`dst -= src`."""
        return self.emit(isa.alu("sub", dst, src))

    def mul64(self, dst: Reg, src: Src) -> Builder:
        """`dst *= src`."""
        return self.emit(isa.alu("mul", dst, src))

    def div64(self, dst: Reg, src: Src) -> Builder:
        """`dst /= src` (unsigned)."""
        return self.emit(isa.alu("div", dst, src))

    def sdiv64(self, dst: Reg, src: Src) -> Builder:
        """`dst s/= src` (signed)."""
        return self.emit(isa.alu("sdiv", dst, src))

    def or64(self, dst: Reg, src: Src) -> Builder:
        """`dst |= src`."""
        return self.emit(isa.alu("or", dst, src))

    def and64(self, dst: Reg, src: Src) -> Builder:
        """`dst &= src`."""
        return self.emit(isa.alu("and", dst, src))

    def lsh64(self, dst: Reg, src: Src) -> Builder:
        """`dst <<= src`."""
        return self.emit(isa.alu("lsh", dst, src))

    def rsh64(self, dst: Reg, src: Src) -> Builder:
        """`dst >>= src` (logical)."""
        return self.emit(isa.alu("rsh", dst, src))

    def arsh64(self, dst: Reg, src: Src) -> Builder:
        """`dst s>>= src` (arithmetic)."""
        return self.emit(isa.alu("arsh", dst, src))

    def mod64(self, dst: Reg, src: Src) -> Builder:
        """`dst %= src` (unsigned)."""
        return self.emit(isa.alu("mod", dst, src))

    def smod64(self, dst: Reg, src: Src) -> Builder:
        """`dst s%= src` (signed)."""
        return self.emit(isa.alu("smod", dst, src))

    def xor64(self, dst: Reg, src: Src) -> Builder:
        """`dst ^= src`."""
        return self.emit(isa.alu("xor", dst, src))

    def mov64(self, dst: Reg, src: Src) -> Builder:
        """`dst = src` (an immediate is sign-extended to 64 bits)."""
        return self.emit(isa.alu("mov", dst, src))

    def neg64(self, dst: Reg) -> Builder:
        """`dst = -dst`."""
        return self.emit(isa.neg(dst))

    def movsx64(self, dst: Reg, src: Reg, bits: int) -> Builder:
        """`dst = (s<bits>)src` for bits 8, 16, 32."""
        return self.emit(isa.movsx(dst, src, bits))

    def add32(self, dst: Reg, src: Src) -> Builder:
        """`wdst += src`."""
        return self.emit(isa.alu("add", dst, src, wide=False))

    def sub32(self, dst: Reg, src: Src) -> Builder:
        """`wdst -= src`."""
        return self.emit(isa.alu("sub", dst, src, wide=False))

    def mul32(self, dst: Reg, src: Src) -> Builder:
        """`wdst *= src`."""
        return self.emit(isa.alu("mul", dst, src, wide=False))

    def div32(self, dst: Reg, src: Src) -> Builder:
        """`wdst /= src` (unsigned)."""
        return self.emit(isa.alu("div", dst, src, wide=False))

    def sdiv32(self, dst: Reg, src: Src) -> Builder:
        """`wdst s/= src` (signed)."""
        return self.emit(isa.alu("sdiv", dst, src, wide=False))

    def or32(self, dst: Reg, src: Src) -> Builder:
        """`wdst |= src`."""
        return self.emit(isa.alu("or", dst, src, wide=False))

    def and32(self, dst: Reg, src: Src) -> Builder:
        """`wdst &= src`."""
        return self.emit(isa.alu("and", dst, src, wide=False))

    def lsh32(self, dst: Reg, src: Src) -> Builder:
        """`wdst <<= src`."""
        return self.emit(isa.alu("lsh", dst, src, wide=False))

    def rsh32(self, dst: Reg, src: Src) -> Builder:
        """`wdst >>= src` (logical)."""
        return self.emit(isa.alu("rsh", dst, src, wide=False))

    def arsh32(self, dst: Reg, src: Src) -> Builder:
        """`wdst s>>= src` (arithmetic)."""
        return self.emit(isa.alu("arsh", dst, src, wide=False))

    def mod32(self, dst: Reg, src: Src) -> Builder:
        """`wdst %= src` (unsigned)."""
        return self.emit(isa.alu("mod", dst, src, wide=False))

    def smod32(self, dst: Reg, src: Src) -> Builder:
        """`wdst s%= src` (signed)."""
        return self.emit(isa.alu("smod", dst, src, wide=False))

    def xor32(self, dst: Reg, src: Src) -> Builder:
        """`wdst ^= src`."""
        return self.emit(isa.alu("xor", dst, src, wide=False))

    def mov32(self, dst: Reg, src: Src) -> Builder:
        """`wdst = src` (zero-extends into the upper half)."""
        return self.emit(isa.alu("mov", dst, src, wide=False))

    def neg32(self, dst: Reg) -> Builder:
        """`wdst = -wdst`."""
        return self.emit(isa.neg(dst, wide=False))

    def movsx32(self, dst: Reg, src: Reg, bits: int) -> Builder:
        """`wdst = (s<bits>)wsrc` for bits 8, 16."""
        return self.emit(isa.movsx(dst, src, bits, wide=False))

    def le(self, dst: Reg, bits: int) -> Builder:
        """Convert `dst` to little endian (`dst = le<bits> dst`)."""
        return self.emit(isa.endian("le", dst, bits))

    def be(self, dst: Reg, bits: int) -> Builder:
        """Convert `dst` to big endian (`dst = be<bits> dst`)."""
        return self.emit(isa.endian("be", dst, bits))

    def bswap(self, dst: Reg, bits: int) -> Builder:
        """Unconditional byte swap (`dst = bswap<bits> dst`)."""
        return self.emit(isa.endian("bswap", dst, bits))

    # -- jumps and calls ---------------------------------------------------------------
    def ja(self, target: Target) -> Builder:
        """`goto target` (16-bit offset)."""
        return self._ref("off", isa.ja(0), target)

    def gotol(self, target: Target) -> Builder:
        """`gotol target` (32-bit offset, cpu v4)."""
        return self._ref("imm", isa.gotol(0), target)

    def jcond(self, op: str, dst: Reg, src: Src, target: Target, wide: bool = True) -> Builder:
        """`if dst <op> src goto target`; `op` is a key of `isa.JMP_OPS`."""
        return self._ref("off", isa.jump(op, dst, src, 0, wide), target)

    def jeq(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst == src goto target`."""
        return self.jcond("jeq", dst, src, target)

    def jne(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst != src goto target`."""
        return self.jcond("jne", dst, src, target)

    def jgt(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst > src goto target` (unsigned)."""
        return self.jcond("jgt", dst, src, target)

    def jge(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst >= src goto target` (unsigned)."""
        return self.jcond("jge", dst, src, target)

    def jlt(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst < src goto target` (unsigned)."""
        return self.jcond("jlt", dst, src, target)

    def jle(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst <= src goto target` (unsigned)."""
        return self.jcond("jle", dst, src, target)

    def jset(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst & src goto target`."""
        return self.jcond("jset", dst, src, target)

    def jsgt(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst s> src goto target` (signed)."""
        return self.jcond("jsgt", dst, src, target)

    def jsge(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst s>= src goto target` (signed)."""
        return self.jcond("jsge", dst, src, target)

    def jslt(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst s< src goto target` (signed)."""
        return self.jcond("jslt", dst, src, target)

    def jsle(self, dst: Reg, src: Src, target: Target) -> Builder:
        """`if dst s<= src goto target` (signed)."""
        return self.jcond("jsle", dst, src, target)

    def jcond32(self, op: str, dst: Reg, src: Src, target: Target) -> Builder:
        """JMP32 form: `if wdst <op> src goto target` (compares the low 32 bits)."""
        return self.jcond(op, dst, src, target, wide=False)

    def call(self, helper: str | int) -> Builder:
        """Call a helper by name (`"map_lookup_elem"` / `"bpf_map_lookup_elem"`) or id."""
        return self.emit(isa.call(helper if isinstance(helper, int) else helper_id(helper)))

    def call_func(self, target: Target) -> Builder:
        """BPF-to-BPF call of the function at label `target`."""
        return self._ref("imm", isa.call_pc(0), target)

    def exit(self) -> Builder:
        """`exit` (return r0)."""
        return self.emit(isa.exit_())

    # -- 64-bit loads and maps ---------------------------------------------------------
    def ld_imm64(self, dst: Reg, value: int) -> Builder:
        """`dst = value ll` (a full 64-bit constant, two slots)."""
        return self.emit(isa.ld_imm64(dst, value))

    def ld_map_fd(self, dst: Reg, name: str) -> Builder:
        """`dst = <map name>` (BPF_PSEUDO_MAP_FD), resolved by `build(maps=...)`."""
        return self._ref("map", isa.ld_map_fd(dst, 0), name)

    def ld_map_value(self, dst: Reg, name: str, off: int = 0) -> Builder:
        """`dst = &<map name>[0] + off` (BPF_PSEUDO_MAP_VALUE), resolved by `build()`."""
        return self._ref("map", isa.ld_map_value(dst, 0, off), name)

    # -- memory ------------------------------------------------------------------------
    def ldx(self, bits: int, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(u<bits> *)(src + off)`."""
        return self.emit(isa.ldx(bits, dst, src, off))

    def ldxb(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(u8 *)(src + off)`."""
        return self.ldx(8, dst, src, off)

    def ldxh(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(u16 *)(src + off)`."""
        return self.ldx(16, dst, src, off)

    def ldxw(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(u32 *)(src + off)`."""
        return self.ldx(32, dst, src, off)

    def ldxdw(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(u64 *)(src + off)`."""
        return self.ldx(64, dst, src, off)

    def ldsx(self, bits: int, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`dst = *(s<bits> *)(src + off)` (sign-extending; bits 8, 16, 32)."""
        return self.emit(isa.ldsx(bits, dst, src, off))

    def stx(self, bits: int, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`*(u<bits> *)(dst + off) = src`."""
        return self.emit(isa.stx(bits, dst, src, off))

    def stxb(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`*(u8 *)(dst + off) = src`."""
        return self.stx(8, dst, src, off)

    def stxh(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`*(u16 *)(dst + off) = src`."""
        return self.stx(16, dst, src, off)

    def stxw(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`*(u32 *)(dst + off) = src`."""
        return self.stx(32, dst, src, off)

    def stxdw(self, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """`*(u64 *)(dst + off) = src`."""
        return self.stx(64, dst, src, off)

    def st(self, bits: int, dst: Reg, off: int, imm: int) -> Builder:
        """`*(u<bits> *)(dst + off) = imm`."""
        return self.emit(isa.st(bits, dst, off, imm))

    def atomic(self, op: str, bits: int, dst: Reg, src: Reg, off: int = 0,
               fetch: bool = False) -> Builder:
        """`lock *(u<bits> *)(dst + off) <op>= src` (op: add/or/and/xor); `fetch` returns
        the old value in `src`."""
        return self.emit(isa.atomic(op, bits, dst, src, off, fetch))

    def xchg(self, bits: int, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """Atomically exchange `src` and `*(dst + off)`."""
        return self.emit(isa.xchg(bits, dst, src, off))

    def cmpxchg(self, bits: int, dst: Reg, src: Reg, off: int = 0) -> Builder:
        """Atomic compare (with r0) and exchange; r0 gets the old value."""
        return self.emit(isa.cmpxchg(bits, dst, src, off))
