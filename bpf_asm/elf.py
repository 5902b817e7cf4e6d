"""BPF ELF objects: read what clang compiles, write what `llvm-objdump -d -r` reads.

Reading (`read_elf`, through pyelftools) returns plain specs: one `ElfProgram` per global
function in an executable section (the section name is the program's kind, e.g.
`tracepoint/syscalls/sys_enter_getpid`), the `license` string, and `ElfMap`s from the legacy
`maps` section (`struct bpf_map_def`) and from the BTF-defined `.maps` section. Relocations
become references by name: a 64-bit load relocated to a map is `ld_map_fd` with fd 0 and
`insns.map_refs[slot] = map name`; one relocated to `.data`/`.rodata`/`.bss` is
`ld_map_value` naming that section (the loader creates such data maps); calls into `.text`
append that section to the program (as libbpf does) and become BPF-to-BPF calls.
`insns.with_maps(maps)` then fills in real fds.

Writing (`write_elf`, by hand with struct) produces an ELF64 little-endian relocatable
object for EM_BPF with the program sections, `license`, a legacy `maps` section, a symbol
table and `.rel<section>` relocations (R_BPF_64_64) for every map reference.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Symbol, SymbolTableSection

from bpf_asm import isa
from bpf_asm.isa import Instruction, Instructions, Reg, decode

if TYPE_CHECKING:
    from bpf_asm.btf import BTF, BtfType
    from bpf_asm.maps import MapSpec

__all__ = ["ElfError", "ElfMap", "ElfProgram", "ElfObject", "read_elf", "write_elf",
           "EM_BPF", "R_BPF_64_64", "R_BPF_64_32"]

EM_BPF = 247
R_BPF_64_64 = 1   # ld_imm64 of a symbol's address
R_BPF_64_32 = 10  # call of a function (imm in slots)
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_REL = 1, 2, 3, 9
STB_GLOBAL = 1
STT_OBJECT, STT_FUNC = 1, 2
_DATA_SECTIONS = (".data", ".rodata", ".bss")
_MAP_DEF = struct.Struct("<5I")  # struct bpf_map_def: type, key, value, max_entries, flags


class ElfError(ValueError):
    """An object file this module cannot read or write; the message names the thing."""


@dataclass
class ElfMap:
    """A map described in an object (sizes None where the object does not say)."""

    name: str
    type: int
    key_size: int | None = None
    value_size: int | None = None
    max_entries: int | None = None
    flags: int = 0
    section: str = "maps"

    @property
    def type_name(self) -> str:
        """The map type's UAPI name in lower case (`hash`, `perf_event_array`, ...)."""
        try:
            from bpf_asm.syscall import MapType
            return MapType(self.type).name.lower()
        except (ImportError, ValueError):
            return str(self.type)


@dataclass
class ElfProgram:
    """One program: its symbol name, section, and instructions (map refs by name)."""

    name: str
    section: str
    insns: Instructions = field(default_factory=Instructions)


@dataclass
class ElfObject:
    """What `read_elf` found in an object file."""

    license: str
    programs: list[ElfProgram]
    maps: dict[str, ElfMap]

    def program(self, name: str) -> ElfProgram:
        """The program called `name` (its function name, or its section name)."""
        for prog in self.programs:
            if name in (prog.name, prog.section):
                return prog
        known = ", ".join(p.name for p in self.programs) or "none"
        raise ElfError(f"no program {name!r} in the object (programs: {known})")


# -- reading ---------------------------------------------------------------------------

def read_elf(source: str | os.PathLike[str] | bytes) -> ElfObject:
    """Read a BPF ELF object from a path or from its bytes."""
    if isinstance(source, bytes | bytearray):
        label, data = "<bytes>", bytes(source)
    else:
        label = os.fspath(source)
        with open(label, "rb") as f:
            data = f.read()
    try:
        return _Reader(ELFFile(io.BytesIO(data)), label).read()
    except ELFError as exc:
        raise ElfError(f"{label}: not a readable ELF object: {exc}") from None


class _Reader:
    """Walks one parsed object: symbols, relocations, programs and maps."""

    def __init__(self, elf: ELFFile, label: str) -> None:
        self.elf, self.label = elf, label
        machine = elf["e_machine"]
        if machine not in ("EM_BPF", EM_BPF) or not elf.little_endian or elf.elfclass != 64:
            raise ElfError(f"{label}: not a little-endian 64-bit BPF object "
                           f"(machine {machine})")
        symtab = elf.get_section_by_name(".symtab")
        if not isinstance(symtab, SymbolTableSection):
            raise ElfError(f"{label}: no symbol table")
        self.symtab = symtab
        self.sections = list(elf.iter_sections())
        self.rels: dict[int, list[tuple[int, int, int]]] = {}
        for sec in self.sections:
            if isinstance(sec, RelocationSection) and not sec.is_RELA():
                self.rels.setdefault(sec["sh_info"], []).extend(
                    (r["r_offset"], r["r_info_sym"], r["r_info_type"])
                    for r in sec.iter_relocations())

    def read(self) -> ElfObject:
        lic = self.elf.get_section_by_name("license")
        license_ = lic.data().split(b"\0", 1)[0].decode() if lic else ""
        maps = self._legacy_maps()
        maps.update(self._btf_maps())
        programs = []
        for index, sec in enumerate(self.sections):
            if sec["sh_flags"] & SHF_EXECINSTR and sec.name != ".text" and sec.data_size:
                programs.extend(self._programs(index, sec.name))
        return ElfObject(license_, programs, maps)

    def _symbols_in(self, index: int) -> list[Symbol]:
        return [s for s in self.symtab.iter_symbols() if s["st_shndx"] == index]

    def _programs(self, index: int, name: str) -> list[ElfProgram]:
        funcs = [s for s in self._symbols_in(index) if s["st_info"]["type"] == "STT_FUNC"
                 and s["st_info"]["bind"] != "STB_LOCAL"]
        if not funcs:
            size = self.sections[index].data_size
            return [ElfProgram(name, name, self._link(index, 0, size, name))]
        return [ElfProgram(s.name, name, self._link(index, s["st_value"],
                                                    s["st_value"] + s["st_size"], s.name))
                for s in sorted(funcs, key=lambda s: s["st_value"])]

    def _link(self, index: int, start: int, end: int, prog: str) -> Instructions:
        """Decode [start, end) of a section, append called subprogram sections, and turn
        relocations into map references and call offsets."""
        insns: list[Instruction] = []
        index_at: dict[int, int] = {}      # slot -> instruction index
        map_refs: dict[int, str] = {}
        bases: dict[int, int] = {}         # section index -> slot of its byte offset 0
        calls: list[tuple[int, int, int, int]] = []  # insn index, section, goal, slot
        queue, queued = [(index, start, end)], {index}
        while queue:
            sec_index, lo, hi = queue.pop(0)
            base = sum(i.slots for i in insns)
            bases[sec_index] = base - lo // 8
            for insn in decode(self.sections[sec_index].data()[lo:hi]):
                index_at[base] = len(insns)
                insns.append(insn)
                base += insn.slots
            for offset, sym_index, rtype in self.rels.get(sec_index, []):
                if not lo <= offset < hi:
                    continue
                slot = bases[sec_index] + offset // 8
                if slot not in index_at:
                    raise ElfError(f"{self.label}: {prog}: relocation at offset {offset} of "
                                   f"{self.sections[sec_index].name} is inside an instruction")
                i = index_at[slot]
                sym = self.symtab.get_symbol(sym_index)
                callee = self._relocate(insns, i, sym, rtype, slot, map_refs, prog)
                if callee is not None:
                    calls.append((i, callee, sym["st_value"] // 8 + insns[i].imm + 1, slot))
                    if callee not in queued:
                        queued.add(callee)
                        queue.append((callee, 0, self.sections[callee].data_size))
        for i, callee, goal, slot in calls:
            target = bases[callee] + goal
            if target not in index_at:
                raise ElfError(f"{self.label}: {prog}: call at slot {slot} lands outside the "
                               "program and its subprograms")
            insns[i] = isa.call_pc(target - (slot + 1))
        return Instructions(insns, map_refs)

    def _relocate(self, insns: list[Instruction], i: int, sym: Symbol, rtype: int, slot: int,
                  map_refs: dict[int, str], prog: str) -> int | None:
        """Apply one relocation to insns[i]; return the callee's section for a call."""
        insn = insns[i]
        shndx = sym["st_shndx"]
        target = self.sections[shndx] if isinstance(shndx, int) else None
        where = f"{self.label}: {prog}: relocation to {sym.name or '?'}"
        if insn.code == isa.BPF_JMP | isa.BPF_CALL and rtype == R_BPF_64_32:
            if target is None or not target["sh_flags"] & SHF_EXECINSTR:
                raise ElfError(f"{where}: call of a symbol that is not a BPF function "
                               "(extern functions and kfuncs are not supported)")
            return int(shndx)
        if insn.code != isa.LD_IMM64 or rtype != R_BPF_64_64 or target is None:
            raise ElfError(f"{where}: unsupported relocation type {rtype} on {insn}")
        if target.name in ("maps", ".maps"):
            map_refs[slot] = sym.name
            insns[i] = isa.ld_map_fd(Reg(insn.dst), 0)
        elif target.name.startswith(_DATA_SECTIONS):
            map_refs[slot] = target.name
            insns[i] = isa.ld_map_value(Reg(insn.dst), 0,
                                        sym["st_value"] + (insn.imm & 0xFFFFFFFF))
        else:
            raise ElfError(f"{where}: 64-bit load of a symbol in section {target.name!r}, "
                           "which is neither a map nor global data")
        return None

    # -- maps --------------------------------------------------------------------------
    def _section_index(self, name: str) -> int | None:
        for index, sec in enumerate(self.sections):
            if sec.name == name:
                return index
        return None

    def _legacy_maps(self) -> dict[str, ElfMap]:
        index = self._section_index("maps")
        if index is None:
            return {}
        data = self.sections[index].data()
        out = {}
        for sym in self._symbols_in(index):
            if sym["st_info"]["type"] == "STT_SECTION" or not sym.name:
                continue
            off = sym["st_value"]
            if off + _MAP_DEF.size > len(data):
                raise ElfError(f"{self.label}: map {sym.name!r} is shorter than "
                               "struct bpf_map_def")
            mtype, key, value, entries, flags = _MAP_DEF.unpack_from(data, off)
            out[sym.name] = ElfMap(sym.name, mtype, key, value, entries, flags, "maps")
        return out

    def _btf_maps(self) -> dict[str, ElfMap]:
        index = self._section_index(".maps")
        if index is None:
            return {}
        names = [s.name for s in self._symbols_in(index)
                 if s.name and s["st_info"]["type"] != "STT_SECTION"]
        found = {name: ElfMap(name, 0, section=".maps") for name in names}
        btf_sec = self.elf.get_section_by_name(".BTF")
        if btf_sec is None:
            return found  # names and relocations only
        from bpf_asm.btf import BTF, Kind
        btf = BTF(btf_sec.data(), name=f"{self.label} .BTF")
        datasec = btf.find_type(".maps", Kind.DATASEC)
        for info in datasec.secinfos if datasec else ():
            var = btf.type_by_id(info.type_id)
            found[var.name] = self._btf_map(btf, var.name, btf.strip(var.type_id or 0))
        return found

    def _btf_map(self, btf: BTF, name: str, struct_t: BtfType) -> ElfMap:
        from bpf_asm.btf import Kind
        spec = ElfMap(name, 0, section=".maps")
        for member in struct_t.members:
            ptr = btf.strip(member.type_id)
            if ptr.kind != Kind.PTR:
                raise ElfError(f"{self.label}: map {name!r} field {member.name!r} is not "
                               "__uint()/__type() (a pointer)")
            if member.name in ("key", "value"):
                setattr(spec, f"{member.name}_size", btf.sizeof(ptr.type_id or 0))
                continue
            arr = btf.strip(ptr.type_id or 0)
            if arr.kind != Kind.ARRAY:
                continue  # __array(values, ...) of map-in-map: not described here
            value = arr.nelems
            attr = {"type": "type", "max_entries": "max_entries", "map_flags": "flags",
                    "key_size": "key_size", "value_size": "value_size"}.get(member.name)
            if attr:
                setattr(spec, attr, value)
        return spec


# -- writing ---------------------------------------------------------------------------

#: What `write_elf` takes as a map: an ElfMap, a MapSpec (a Map's `.spec`), or a dict with
#: name/type/key_size/value_size/max_entries/flags.
MapDescription: TypeAlias = "ElfMap | MapSpec | Mapping[str, object]"


def _field(spec: MapDescription, name: str) -> object:
    if isinstance(spec, Mapping):
        return spec.get(name)
    return getattr(spec, name, None)


def _map_def(spec: MapDescription) -> tuple[str, bytes]:
    """(name, struct bpf_map_def bytes) for a map spec: ElfMap, maps.MapSpec, a Map's spec
    or a dict with name/type/key_size/value_size/max_entries/flags (None counts as 0)."""
    name = _field(spec, "name")
    if not name:
        raise ElfError(f"a map written to an object needs a name: {spec!r}")
    mtype = _field(spec, "type")
    if isinstance(mtype, str):
        from bpf_asm.syscall import MapType
        mtype = MapType.parse(mtype)
    if not isinstance(mtype, int):
        raise ElfError(f"map {name!r}: type {mtype!r} is not a map type")
    values = [mtype]
    for key in ("key_size", "value_size", "max_entries", "flags"):
        value = _field(spec, key) or 0
        if not isinstance(value, int):
            raise ElfError(f"map {name!r}: {key} {value!r} is not an integer")
        values.append(value)
    return str(name), _MAP_DEF.pack(*values)


class _StrTab:
    def __init__(self) -> None:
        self.data = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}

    def add(self, text: str) -> int:
        if text not in self.offsets:
            self.offsets[text] = len(self.data)
            self.data += text.encode() + b"\0"
        return self.offsets[text]


def write_elf(programs: Sequence[ElfProgram] | Instructions,
              maps: Iterable[MapDescription] = (),
              license: str = "GPL", *, section: str = "prog", name: str = "prog") -> bytes:
    """An ELF relocatable object (EM_BPF, little endian) holding `programs` and `maps`.

    `programs` is a list of `ElfProgram`, or one `Instructions` placed as function `name`
    in `section`. Every map load listed in a program's `map_refs` is written as clang does
    (`r = 0 ll`) plus an R_BPF_64_64 relocation to the map's symbol in the `maps` section.
    """
    if isinstance(programs, Instructions):
        programs = [ElfProgram(name, section, programs)]
    map_defs = [_map_def(spec) for spec in maps]
    map_index = {n: i for i, (n, _) in enumerate(map_defs)}
    if len(map_index) != len(map_defs):
        raise ElfError("two maps share a name")
    by_section: dict[str, list[ElfProgram]] = {}
    for prog in programs:
        by_section.setdefault(prog.section, []).append(prog)

    contents: dict[str, bytes] = {}
    rels: dict[str, list[tuple[int, str]]] = {}
    funcs: list[tuple[str, str, int, int]] = []  # name, section, offset, size
    for sec, progs in by_section.items():
        code = bytearray()
        for prog in progs:
            start = len(code)
            code += _program_bytes(prog, map_index, rels.setdefault(sec, []), start)
            funcs.append((prog.name, sec, start, len(code) - start))
        contents[sec] = bytes(code)
    rels = {sec: entries for sec, entries in rels.items() if entries}

    # section index plan: 0 null, 1 .strtab, programs, their .rel, license, maps, .symtab
    plan = ["", ".strtab", *by_section, *(".rel" + sec for sec in rels),
            "license", "maps", ".symtab"]
    idx = {n: i for i, n in enumerate(plan)}
    strtab = _StrTab()
    symbols: list[tuple[str, int, int, int, int]] = [  # name, info, shndx, value, size
        (fname, (STB_GLOBAL << 4) | STT_FUNC, idx[sec], off, size)
        for fname, sec, off, size in funcs]
    contents["license"] = license.encode() + b"\0"
    symbols.append(("_license", (STB_GLOBAL << 4) | STT_OBJECT, idx["license"], 0,
                    len(contents["license"])))
    contents["maps"] = b"".join(d for _, d in map_defs)
    for i, (map_name, d) in enumerate(map_defs):
        symbols.append((map_name, (STB_GLOBAL << 4) | STT_OBJECT, idx["maps"],
                        i * _MAP_DEF.size, len(d)))
    sym_index = {n: i + 1 for i, (n, *_) in enumerate(symbols)}
    symtab = bytearray(24)  # the null symbol
    for sym_name, info, shndx, value, size in symbols:
        symtab += struct.pack("<IBBHQQ", strtab.add(sym_name), info, 0, shndx, value, size)
    for sec, entries in rels.items():
        contents[".rel" + sec] = b"".join(
            struct.pack("<QQ", off, (sym_index[m] << 32) | R_BPF_64_64) for off, m in entries)
    contents[".symtab"] = bytes(symtab)
    for n in plan[1:]:
        strtab.add(n)
    contents[".strtab"] = bytes(strtab.data)

    out = bytearray(64)
    headers = [bytes(64)]
    for n in plan[1:]:
        data = contents.get(n, b"")
        if n == ".strtab":
            kind, flags, link, info, align, entsize = SHT_STRTAB, 0, 0, 0, 1, 0
        elif n == ".symtab":
            kind, flags, link, info, align, entsize = SHT_SYMTAB, 0, idx[".strtab"], 1, 8, 24
        elif n.startswith(".rel"):
            kind, flags, link, info, align, entsize = (SHT_REL, 0x40, idx[".symtab"],
                                                       idx[n[4:]], 8, 16)
        elif n in by_section:
            kind, flags, link, info, align, entsize = (SHT_PROGBITS, SHF_ALLOC | SHF_EXECINSTR,
                                                       0, 0, 8, 0)
        else:  # license, maps
            kind, flags, link, info, align, entsize = (SHT_PROGBITS, SHF_ALLOC | SHF_WRITE,
                                                       0, 0, 4 if n == "maps" else 1, 0)
        out += bytes(-len(out) % align)
        headers.append(struct.pack("<IIQQQQIIQQ", strtab.offsets[n], kind, flags, 0, len(out),
                                   len(data), link, info, align, entsize))
        out += data
    out += bytes(-len(out) % 8)
    shoff = len(out)
    for h in headers:
        out += h
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, LE, version 1, SysV
    out[:64] = ident + struct.pack("<HHIQQQIHHHHHH", 1, EM_BPF, 1, 0, 0, shoff, 0, 64, 0, 0,
                                   64, len(headers), idx[".strtab"])
    return bytes(out)


def _program_bytes(prog: ElfProgram, map_index: Mapping[str, int],
                   rels: list[tuple[int, str]], start: int) -> bytes:
    """The program's code with map loads zeroed, recording (offset, map name) relocations."""
    code = bytearray()
    for slot, insn in zip(prog.insns.slot_indices(), prog.insns, strict=True):
        map_name = prog.insns.map_refs.get(slot)
        if map_name is not None:
            if map_name not in map_index:
                raise ElfError(f"program {prog.name!r} uses map {map_name!r}, which is not "
                               "among the maps to write")
            if insn.code != isa.LD_IMM64 or insn.src == isa.BPF_PSEUDO_MAP_VALUE:
                raise ElfError(f"program {prog.name!r}: only map fd loads can be relocated, "
                               f"not {insn}")
            insn = isa.ld_imm64(Reg(insn.dst), 0)
            rels.append((start + len(code), map_name))
        code += insn.encode()
    return bytes(code)
