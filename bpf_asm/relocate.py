"""Map references: the one place where map fds are written into instructions.

Programs name their maps. `Builder.ld_map_fd(R1, "events")`, the assembly line
`r1 = events ll` and an ELF relocation to a map symbol all give a 64-bit load that carries
fd 0 and an entry in `Instructions.map_refs` (slot -> map name). `resolve_maps` returns the
copy the kernel can load: every such load carries the fd of the map given for its name
(`BPF_PSEUDO_MAP_FD`, or `BPF_PSEUDO_MAP_VALUE` with its value offset kept). `Builder.build`,
`bpf_asm.text.assemble` and `Instructions.with_maps` (for ELF programs) all go through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from bpf_asm.isa import BPF_PSEUDO_MAP_FD, LD_IMM64, Instruction, Instructions

__all__ = ["BuildError", "HasFd", "MapFd", "UnknownMapError", "map_fd", "resolve_maps",
           "with_map_fd"]

_FD_LIMIT = 1 << 31  # an fd is a non-negative C int


class BuildError(ValueError):
    """A program that cannot be built; `index` is the offending item's position (or None).

    For `Builder.build` and `resolve_maps` that is the index of the instruction (a builder
    emits one instruction per item)."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class UnknownMapError(BuildError):
    """A map referenced by name that is not among the maps given, or has no valid fd."""


class HasFd(Protocol):
    """A kernel object with an integer file descriptor (`bpf_asm.Map` is one)."""

    @property
    def fd(self) -> int: ...


#: What a map name may stand for: an object with `.fd`, or the fd itself.
MapFd = HasFd | int


def map_fd(name: str, obj: object) -> int:
    """The fd of map `name`: `obj` if it is an int, else `obj.fd`; UnknownMapError unless it
    is a valid fd (0 <= fd < 2**31)."""
    fd = obj if isinstance(obj, int) else getattr(obj, "fd", None)
    if not isinstance(fd, int) or not 0 <= fd < _FD_LIMIT:
        raise UnknownMapError(f"map {name!r} has no valid file descriptor (.fd): {obj!r}")
    return fd


def with_map_fd(insn: Instruction, fd: int) -> Instruction:
    """`insn`, a 64-bit map load, carrying `fd` in the low half of `imm`. A map value load
    keeps its offset (the high half); a plain `ld_imm64` becomes a `BPF_PSEUDO_MAP_FD` load."""
    if insn.code != LD_IMM64:
        raise BuildError(f"a map fd goes into a 64-bit load (ld_imm64), not {insn}")
    if not 0 <= fd < _FD_LIMIT:
        raise BuildError(f"map fd {fd} is not a valid file descriptor")
    return Instruction(insn.code, insn.dst, insn.src or BPF_PSEUDO_MAP_FD, insn.off,
                       (insn.imm & ~0xFFFFFFFF) | fd)


def resolve_maps(insns: Instructions, maps: Mapping[str, MapFd]) -> Instructions:
    """A copy of `insns` (same `map_refs`) whose map loads carry the fds of `maps`.

    A name missing from `maps`, or given something without a valid fd, is an
    `UnknownMapError` naming it, with `index` the instruction's position; a reference to a
    slot that does not start a 64-bit load is a `BuildError`.
    """
    out = Instructions(insns, insns.map_refs)
    index_of = {slot: i for i, slot in enumerate(insns.slot_indices())}
    for slot, name in sorted(insns.map_refs.items()):
        index = index_of.get(slot)
        if index is None or insns[index].code != LD_IMM64:
            raise BuildError(f"map reference {name!r} at slot {slot} is not on a 64-bit load",
                             index)
        if name not in maps:
            known = ", ".join(sorted(maps)) or "none"
            raise UnknownMapError(f"unknown map {name!r} (maps given: {known})", index)
        try:
            fd = map_fd(name, maps[name])
        except UnknownMapError as exc:
            exc.index = index
            raise
        out[index] = with_map_fd(insns[index], fd)
    return out
