"""Assemble LLVM's BPF assembly syntax (what `llvm-objdump -d` prints, `llvm-mc` accepts).

    insns = assemble('''
        r1 = events ll          ; a map passed in by name
        r2 = *(u32 *)(r1 + 8)
        if r2 > 5 goto out
        call bpf_get_current_pid_tgid
    out:
        exit
    ''', maps={"events": events})

Accepted besides plain instructions: labels `NAME:`, comments (`;`, `#`, `//`), numbers in
decimal or hex, jump targets as labels or `+N`/`-N` slots, `call NAME` (a label in this
text: BPF-to-BPF call; otherwise a helper) and `call pc+N`, `r1 = map_fd(N) ll` and
`r1 = map_value(NAME or N, OFF) ll`, and pasted `llvm-objdump -d [-r]` output (addresses,
raw bytes, `<sym>:` headers as labels, `R_BPF_64_64 name` relocations as map references).
Errors are one `AssemblerError` naming the line number, the line and what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from bpf_asm import isa
from bpf_asm.builder import Builder, BuildError
from bpf_asm.helpers import UnknownHelperError, helper_id
from bpf_asm.isa import Instructions, Reg
from bpf_asm.relocate import MapFd

__all__ = ["assemble", "AssemblerError"]


class AssemblerError(ValueError):
    """Malformed assembly: `lineno` (1-based), `line` (its text) and `reason`."""

    def __init__(self, lineno: int, line: str, reason: str) -> None:
        super().__init__(f"line {lineno}: {reason}: {line.strip()!r}")
        self.lineno, self.line, self.reason = lineno, line, reason


class _Reject(Exception):
    """Raised inside the parser; turned into an AssemblerError with the line."""


# -- lexical pieces --------------------------------------------------------------------
_REG = r"([rw]\d+)"
_NUM = r"([+-]?\s*(?:0[xX][0-9a-fA-F]+|\d+))"
_NAME = r"([A-Za-z_.$][\w.$]*)"
_TARGET = r"([+-]\s*(?:0[xX][0-9a-fA-F]+|\d+)|[A-Za-z_.$][\w.$]*)"
_ADDR = r"\s*([rw]\d+)\s*([+-])\s*(0[xX][0-9a-fA-F]+|\d+)\s*"
_MEM = r"\*\s*\(\s*([us])(8|16|32|64)\s*\*\s*\)\s*\(" + _ADDR + r"\)"
_ALU_SYM = r"(=|\+=|-=|\*=|/=|s/=|%=|s%=|\|=|&=|<<=|>>=|s>>=|\^=)"
_JMP_SYM = r"(==|!=|s>=|s<=|s>|s<|>=|<=|>|<|&)"

_ALU_BY_SYM = {sym: name for name, (_, sym) in isa.ALU_OPS.items()}
_JMP_BY_SYM = {sym: name for name, (_, sym) in isa.JMP_OPS.items()}
_ATOMIC_BY_SYM = {"+=": "add", "|=": "or", "&=": "and", "^=": "xor"}

# llvm-objdump decorations
_OBJDUMP_INSN = re.compile(r"\s*\d+:\s+(?:(?:[0-9a-f]{2} ){7}[0-9a-f]{2}"
                           r"(?: (?:[0-9a-f]{2} ){7}[0-9a-f]{2})?\s+)?(.*)")
_OBJDUMP_SYMBOL = re.compile(r"[0-9a-f]+ <([^>]+)>:")
_OBJDUMP_RELOC = re.compile(r"[0-9a-f]+:\s+(R_BPF_\w+)\s+(\S+)")
_OBJDUMP_NOISE = re.compile(r"Disassembly of section .*:|\S+:\s+file format .*")
_TARGET_NOTE = re.compile(r"\s*<[^<>]*>\s*$")
_LABEL = re.compile(_NAME + r"\s*:(.*)")


def _num(text: str) -> int:
    return int(text.replace(" ", ""), 0)


def _reg(text: str) -> tuple[Reg, bool]:
    """Parse `r3`/`w3` into (register, is_64_bit)."""
    n = int(text[1:])
    if n > 10:
        raise _Reject(f"no register {text} (registers are r0..r10)")
    return Reg(n), text[0] == "r"


def _base(text: str) -> Reg:
    reg, wide = _reg(text)
    if not wide:
        raise _Reject(f"memory base must be a 64-bit register, not {text}")
    return reg


def _offset(sign: str, text: str) -> int:
    off = _num(text) * (-1 if sign == "-" else 1)
    if not -(1 << 15) <= off < (1 << 15):
        raise _Reject(f"memory offset {off} does not fit in 16 bits")
    return off


def _imm32(text: str) -> int:
    value = _num(text)
    if not -(1 << 31) <= value < (1 << 32):
        raise _Reject(f"immediate {text.strip()} does not fit in 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value


def _target(text: str) -> int | str:
    text = text.replace(" ", "")
    return _num(text) if text[0] in "+-" else text


@dataclass
class _Line:
    """One label or instruction, with where it came from."""

    lineno: int
    text: str                 # the original line
    body: str = ""            # the instruction text, decorations removed
    label: str | None = None  # set for a label instead of an instruction
    reloc: str | None = None  # symbol from an objdump relocation line that follows


class _Parser:
    """Turns one instruction's text into Builder calls."""

    def __init__(self, builder: Builder, labels: set[str]) -> None:
        self.b = builder
        self.labels = labels
        self.forms: list[tuple[re.Pattern[str], Callable[..., object]]] = [
            (re.compile(r"exit"), lambda: self.b.exit()),
            (re.compile(r"call\s+pc\s*" + _NUM), self._call_pc),
            (re.compile(r"call\s+" + _NUM), lambda n: self.b.call(_imm32(n))),
            (re.compile(r"call\s+" + _NAME), self._call_name),
            (re.compile(r"(goto|gotol)\s+" + _TARGET), self._goto),
            (re.compile(r"if\s+" + _REG + r"\s*" + _JMP_SYM + r"\s*(?:" + _REG + "|" + _NUM
                        + r")\s*goto\s+" + _TARGET), self._if),
            (re.compile(r"lock\s+" + _MEM + r"\s*(\+=|\|=|&=|\^=)\s*" + _REG), self._lock),
            (re.compile(_REG + r"\s*=\s*atomic_fetch_(add|or|and|xor)\s*\(\s*\(\s*u(32|64)\s*"
                        r"\*\s*\)\s*\(" + _ADDR + r"\)\s*,\s*" + _REG + r"\s*\)"), self._fetch),
            (re.compile(_REG + r"\s*=\s*xchg(32)?_(32|64)\s*\(" + _ADDR + r",\s*" + _REG
                        + r"\s*\)"), self._xchg),
            (re.compile(_REG + r"\s*=\s*cmpxchg(32)?_(32|64)\s*\(" + _ADDR + r",\s*" + _REG
                        + r"\s*,\s*" + _REG + r"\s*\)"), self._cmpxchg),
            (re.compile(_REG + r"\s*=\s*" + _MEM), self._load),
            (re.compile(_MEM + r"\s*=\s*(?:" + _REG + "|" + _NUM + ")"), self._store),
            (re.compile(_REG + r"\s*=\s*(.+?)\s+ll"), self._ld_imm64),
            (re.compile(_REG + r"\s*=\s*-\s*" + _REG), self._neg),
            (re.compile(_REG + r"\s*=\s*\(\s*s(8|16|32)\s*\)\s*" + _REG), self._movsx),
            (re.compile(_REG + r"\s*=\s*(be|le|bswap)(16|32|64)\s+" + _REG), self._endian),
            (re.compile(_REG + r"\s*" + _ALU_SYM + r"\s*(?:" + _REG + "|" + _NUM + ")"),
             self._alu),
        ]

    def parse(self, body: str, reloc: str | None) -> None:
        if reloc is not None and re.fullmatch(r"call\s+\S+", body):
            self._call_name(reloc)
            return
        if reloc is not None:
            m = re.fullmatch(_REG + r"\s*=\s*(.+?)\s+ll", body)
            if not m:
                raise _Reject(f"relocation to {reloc!r} follows an instruction that is not "
                              "a 64-bit load (r = ... ll)")
            self.b.ld_map_fd(self._wide(m[1], "ld_imm64"), reloc)
            return
        for pattern, action in self.forms:
            m = pattern.fullmatch(body)
            if m:
                action(*m.groups())
                return
        if m := re.fullmatch(_REG + r"\s*=\s*" + _NAME, body):
            raise _Reject(f"a map or 64-bit constant needs ' ll': {m[1]} = {m[2]} ll")
        word = re.match(r"[A-Za-z_][\w]*", body)
        if word and not re.fullmatch(r"[rw]\d+|if|lock|call|goto|gotol|exit", word[0]):
            raise _Reject(f"unknown mnemonic {word[0]!r}")
        raise _Reject("not a BPF instruction in LLVM syntax")

    # -- helpers -----------------------------------------------------------------------
    @staticmethod
    def _same_width(*regs: str) -> bool:
        widths = {r[0] for r in regs if r}
        if len(widths) > 1:
            raise _Reject("mixes 64-bit (r) and 32-bit (w) registers")
        return widths == {"r"}

    @staticmethod
    def _wide(text: str, what: str) -> Reg:
        reg, wide = _reg(text)
        if not wide:
            raise _Reject(f"{what} needs a 64-bit register, not {text}")
        return reg

    # -- forms -------------------------------------------------------------------------
    def _call_pc(self, n: str) -> None:
        self.b.call_func(_imm32(n))

    def _call_name(self, name: str) -> None:
        if name in self.labels:
            self.b.call_func(name)
            return
        try:
            self.b.call(helper_id(name))
        except UnknownHelperError as exc:
            raise _Reject(f"{exc} (and no label of that name)") from None

    def _goto(self, kind: str, target: str) -> None:
        (self.b.ja if kind == "goto" else self.b.gotol)(_target(target))

    def _if(self, dst: str, sym: str, src: str | None, imm: str | None, target: str) -> None:
        wide = self._same_width(dst, src or "")
        operand = _reg(src)[0] if src else _imm32(imm or "")
        self.b.jcond(_JMP_BY_SYM[sym], _reg(dst)[0], operand, _target(target), wide)

    def _lock(self, kind: str, bits: str, base: str, sign: str, off: str, sym: str,
              src: str) -> None:
        if kind != "u":
            raise _Reject("atomic operations take (u32 *) or (u64 *)")
        reg, wide = _reg(src)
        if bits == "64" and not wide:
            raise _Reject(f"a 64-bit atomic operation needs a 64-bit register, not {src}")
        self.b.atomic(_ATOMIC_BY_SYM[sym], int(bits), _base(base), reg, _offset(sign, off))

    def _fetch(self, dst: str, op: str, bits: str, base: str, sign: str, off: str,
               src: str) -> None:
        if dst != src:
            raise _Reject(f"atomic_fetch_{op} returns into its source register ({src}), "
                          f"not {dst}")
        if self._same_width(dst) != (bits == "64"):
            raise _Reject(f"a {bits}-bit atomic operation uses {'r' if bits == '64' else 'w'}"
                          " registers")
        self.b.atomic(op, int(bits), _base(base), _reg(src)[0], _offset(sign, off), fetch=True)

    def _xchg(self, dst: str, w32: str | None, bits: str, base: str, sign: str, off: str,
              src: str) -> None:
        if dst != src:
            raise _Reject(f"xchg returns into its source register ({src}), not {dst}")
        if (w32 is None) != (bits == "64") or self._same_width(dst) != (bits == "64"):
            raise _Reject("use r = xchg_64(...) or w = xchg32_32(...)")
        self.b.xchg(int(bits), _base(base), _reg(src)[0], _offset(sign, off))

    def _cmpxchg(self, dst: str, w32: str | None, bits: str, base: str, sign: str, off: str,
                 old: str, src: str) -> None:
        if (w32 is None) != (bits == "64") or not self._same_width(dst, old, src) == (
                bits == "64"):
            raise _Reject("use r0 = cmpxchg_64(..., r0, rN) or w0 = cmpxchg32_32(..., w0, wN)")
        if _reg(dst)[0] != 0 or _reg(old)[0] != 0:
            raise _Reject("cmpxchg compares with and returns into r0")
        self.b.cmpxchg(int(bits), _base(base), _reg(src)[0], _offset(sign, off))

    def _load(self, dst: str, kind: str, bits: str, base: str, sign: str, off: str) -> None:
        reg, wide = _reg(dst)
        if not wide and (kind == "s" or bits == "64"):
            raise _Reject(f"a *({kind}{bits} *) load needs a 64-bit register, not {dst}")
        if kind == "s":
            if bits == "64":
                raise _Reject("sign-extending loads are s8, s16 or s32")
            self.b.ldsx(int(bits), reg, _base(base), _offset(sign, off))
        else:
            self.b.ldx(int(bits), reg, _base(base), _offset(sign, off))

    def _store(self, kind: str, bits: str, base: str, sign: str, off: str, src: str | None,
               imm: str | None) -> None:
        if kind != "u":
            raise _Reject("stores take (u8/u16/u32/u64 *)")
        if src is None:
            self.b.st(int(bits), _base(base), _offset(sign, off), _imm32(imm or ""))
            return
        reg, wide = _reg(src)
        if bits == "64" and not wide:
            raise _Reject(f"a 64-bit store needs a 64-bit register, not {src}")
        self.b.stx(int(bits), _base(base), reg, _offset(sign, off))

    def _ld_imm64(self, dst: str, value: str) -> None:
        reg = self._wide(dst, "a 64-bit load (ll)")
        value = value.strip()
        if re.fullmatch(_NUM, value):
            number = _num(value)
            if not -(1 << 63) <= number < (1 << 64):
                raise _Reject(f"{value} does not fit in 64 bits")
            self.b.ld_imm64(reg, number)
        elif m := re.fullmatch(r"map_fd\s*\(\s*(?:" + _NAME + "|" + _NUM + r")\s*\)", value):
            if m[1]:
                self.b.ld_map_fd(reg, m[1])
            else:
                self.b.emit(isa.ld_map_fd(reg, _num(m[2])))
        elif m := re.fullmatch(r"map_value\s*\(\s*(?:" + _NAME + "|" + _NUM + r")\s*,\s*" + _NUM
                               + r"\s*\)", value):
            off = _num(m[3])
            if not 0 <= off < (1 << 32):
                raise _Reject(f"map value offset {off} does not fit in 32 bits")
            if m[1]:
                self.b.ld_map_value(reg, m[1], off)
            else:
                self.b.emit(isa.ld_map_value(reg, _num(m[2]), off))
        elif re.fullmatch(_NAME, value):
            self.b.ld_map_fd(reg, value)
        else:
            raise _Reject(f"expected a number or a map name before 'll', not {value!r}")

    def _neg(self, dst: str, src: str) -> None:
        if dst != src:
            raise _Reject(f"negation is in place: {dst} = -{dst}")
        reg, wide = _reg(dst)
        self.b.emit(isa.neg(reg, wide))

    def _movsx(self, dst: str, bits: str, src: str) -> None:
        wide = self._same_width(dst, src)
        try:
            self.b.emit(isa.movsx(_reg(dst)[0], _reg(src)[0], int(bits), wide))
        except ValueError as exc:
            raise _Reject(str(exc)) from None

    def _endian(self, dst: str, kind: str, bits: str, src: str) -> None:
        if dst != src:
            raise _Reject(f"byte swaps are in place: {dst} = {kind}{bits} {dst}")
        self.b.emit(isa.endian(kind, self._wide(dst, "a byte swap"), int(bits)))

    def _alu(self, dst: str, sym: str, src: str | None, imm: str | None) -> None:
        wide = self._same_width(dst, src or "")
        operand = _reg(src)[0] if src else _imm32(imm or "")
        self.b.emit(isa.alu(_ALU_BY_SYM[sym], _reg(dst)[0], operand, wide))


def _strip_comment(line: str) -> str:
    cut = len(line)
    for marker in (";", "#", "//"):
        pos = line.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return line[:cut].strip()


def _scan(text: str) -> list[_Line]:
    """Split text into labels and instructions; attach objdump relocation lines to the
    instruction before them."""
    out: list[_Line] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        body = _strip_comment(line)
        if not body or _OBJDUMP_NOISE.fullmatch(body):
            continue
        if m := _OBJDUMP_SYMBOL.fullmatch(body):
            out.append(_Line(lineno, line, label=m[1]))
            continue
        if m := _OBJDUMP_RELOC.fullmatch(body):
            if m[1] not in ("R_BPF_64_64", "R_BPF_64_32"):
                raise AssemblerError(lineno, line, f"unsupported relocation type {m[1]} "
                                     "(only R_BPF_64_64 and R_BPF_64_32)")
            if not out or out[-1].label is not None or out[-1].reloc is not None:
                raise AssemblerError(lineno, line, "relocation without an instruction before it")
            out[-1].reloc = m[2]
            continue
        if m := _OBJDUMP_INSN.fullmatch(body):
            body = m[1]
        while m := _LABEL.fullmatch(body):
            out.append(_Line(lineno, line, label=m[1]))
            body = m[2].strip()
        if body:
            out.append(_Line(lineno, line, _TARGET_NOTE.sub("", body)))
    return out


def assemble(text: str, maps: Mapping[str, MapFd] | None = None) -> Instructions:
    """Assemble LLVM BPF syntax into `Instructions`.

    `maps` maps the names used in `r1 = NAME ll` to objects with an integer `.fd` (or to
    plain fds); without it, map loads carry fd 0 and are listed in `map_refs` only.
    """
    lines = _scan(text)
    builder = Builder()
    parser = _Parser(builder, {line.label for line in lines if line.label})
    origin: list[_Line] = []  # builder item index -> its line (one item per instruction)
    for line in lines:
        try:
            if line.label is not None:
                builder.label(line.label)
            else:
                parser.parse(line.body, line.reloc)
                origin.append(line)
        except (_Reject, ValueError) as exc:
            raise AssemblerError(line.lineno, line.text, str(exc)) from None
    try:
        return builder.build(maps)
    except BuildError as exc:
        if exc.index is not None and exc.index < len(origin):
            where = origin[exc.index]
            raise AssemblerError(where.lineno, where.text, str(exc)) from None
        raise AssemblerError(0, "", str(exc)) from None
