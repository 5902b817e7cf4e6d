"""BTF reader: parse the kernel's type information and resolve struct field paths.

The kernel describes its own types in BTF at ``/sys/kernel/btf/vmlinux`` (and one file
per module, as *split* BTF on top of vmlinux). This module parses that format by hand:

* header (magic ``0xeB9F``, version 1, then offsets relative to the end of the header),
* a type section of ``struct btf_type`` records (name_off, info, size|type) each followed
  by kind-specific data, type ids counting from 1 (0 is ``void``),
* a string section of NUL-terminated names addressed by byte offset.

Loading only walks the type section once to record where every type starts and which
types carry which name (integers only, no objects); a type is decoded into a
:class:`BtfType` the first time it is asked for. Field paths such as
``sock.__sk_common.skc_daddr`` resolve through typedefs, qualifiers and anonymous
structs/unions into a :class:`FieldLocation` (byte offset and size, and for bitfields the
bit offset and width plus the load size and shifts to extract them).
"""

from __future__ import annotations

import os
import sys
from array import array
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Literal, TypedDict

__all__ = [
    "BTF",
    "BTFError",
    "BtfEnumValue",
    "BtfMember",
    "BtfParam",
    "BtfSecInfo",
    "BtfType",
    "FieldLocation",
    "Kind",
    "VMLINUX_PATH",
]

VMLINUX_PATH = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F
_HEADER_MIN = 24


class BTFError(LookupError):
    """A BTF blob is malformed, or a type, member or enum value is not in it."""


class Kind(IntEnum):
    """BTF type kinds (``BTF_KIND_*``)."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Kinds whose third word is a type id rather than a size.
_REF_KINDS = frozenset(
    {
        Kind.PTR,
        Kind.TYPEDEF,
        Kind.VOLATILE,
        Kind.CONST,
        Kind.RESTRICT,
        Kind.FUNC,
        Kind.FUNC_PROTO,
        Kind.VAR,
        Kind.DECL_TAG,
        Kind.TYPE_TAG,
    }
)
# Kinds that only modify another type; skipped when looking for the "real" type.
_MODIFIERS = frozenset({Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_QUALIFIERS = frozenset({Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG})
_COMPOSITE = frozenset({Kind.STRUCT, Kind.UNION})

# INT encoding bits.
INT_SIGNED = 1
INT_CHAR = 2
INT_BOOL = 4


def _extra_words(kind: int, vlen: int) -> int:
    """Number of 32-bit words of kind-specific data after a ``btf_type`` record."""
    if kind in (1, 14, 17):  # INT, VAR, DECL_TAG: one u32
        return 1
    if kind == 3:  # ARRAY: type, index_type, nelems
        return 3
    if kind in (4, 5, 15, 19):  # STRUCT/UNION members, DATASEC var_secinfo, ENUM64 values
        return 3 * vlen
    if kind in (6, 13):  # ENUM values, FUNC_PROTO params
        return 2 * vlen
    if kind in (0, 2, 7, 8, 9, 10, 11, 12, 16, 18):
        return 0
    raise BTFError(f"unknown BTF kind {kind}")


@dataclass(frozen=True, slots=True)
class BtfMember:
    """A struct/union member. ``bit_size`` is 0 unless the member is a bitfield."""

    name: str
    type_id: int
    bit_offset: int
    bit_size: int = 0


@dataclass(frozen=True, slots=True)
class BtfEnumValue:
    """One enumerator of an ENUM or ENUM64."""

    name: str
    value: int


@dataclass(frozen=True, slots=True)
class BtfParam:
    """One parameter of a FUNC_PROTO (unnamed and ``type_id`` 0 for ``...``)."""

    name: str
    type_id: int


@dataclass(frozen=True, slots=True)
class BtfSecInfo:
    """One variable placed in a DATASEC."""

    type_id: int
    offset: int
    size: int


class _Common(TypedDict, total=False):
    """The fields every decoded type starts from (`BTF._decode`)."""

    id: int
    kind: Kind
    name: str
    kind_flag: bool
    vlen: int
    type_id: int
    size: int


@dataclass(frozen=True, slots=True)
class BtfType:
    """One decoded BTF type.

    ``size`` is set for INT, ENUM, ENUM64, STRUCT, UNION, DATASEC and FLOAT; ``type_id``
    for the kinds that refer to another type (PTR, TYPEDEF, qualifiers, FUNC, FUNC_PROTO's
    return type, VAR, DECL_TAG, TYPE_TAG) and ARRAY's element type.
    """

    id: int
    kind: Kind
    name: str
    size: int | None = None
    type_id: int | None = None
    kind_flag: bool = False
    vlen: int = 0
    # INT
    int_encoding: int = 0
    int_offset: int = 0
    int_bits: int = 0
    # ARRAY
    index_type_id: int = 0
    nelems: int = 0
    # STRUCT/UNION, ENUM/ENUM64, FUNC_PROTO, DATASEC
    members: tuple[BtfMember, ...] = ()
    values: tuple[BtfEnumValue, ...] = ()
    params: tuple[BtfParam, ...] = ()
    secinfos: tuple[BtfSecInfo, ...] = ()
    # VAR / FUNC linkage, DECL_TAG component index
    linkage: int = 0
    component_idx: int = -1

    @property
    def is_signed(self) -> bool:
        """Signedness of an INT, ENUM or ENUM64 (False for other kinds)."""
        if self.kind == Kind.INT:
            return bool(self.int_encoding & INT_SIGNED)
        if self.kind in (Kind.ENUM, Kind.ENUM64):
            return self.kind_flag
        return False

    def describe(self) -> str:
        """``struct sock``, ``typedef u32``, ``int``: a short human name for messages."""
        name = self.name or "(anon)"
        prefix = {
            Kind.STRUCT: "struct ",
            Kind.UNION: "union ",
            Kind.ENUM: "enum ",
            Kind.ENUM64: "enum ",
            Kind.TYPEDEF: "typedef ",
            Kind.FWD: "fwd ",
        }.get(self.kind, "")
        if self.kind in (Kind.PTR, Kind.CONST, Kind.VOLATILE, Kind.RESTRICT, Kind.ARRAY):
            return f"{self.kind.name.lower()} (id {self.id})"
        return prefix + name


@dataclass(frozen=True, slots=True)
class FieldLocation:
    """Where a field lives relative to the start of the root struct of a path.

    For an ordinary field ``offset``/``size`` are its byte offset and size, and
    ``bit_offset == offset * 8``, ``bit_size == size * 8``. For a bitfield ``bit_offset``
    is the field's absolute bit offset and ``bit_size`` its width; ``offset``/``size``
    then describe an aligned load (1, 2, 4 or 8 bytes) that contains the whole field, and
    :meth:`extract` / :attr:`lshift` / :attr:`rshift` get the value out of that load.
    """

    path: str
    offset: int
    size: int
    bit_offset: int
    bit_size: int
    type_id: int
    type_name: str
    kind: Kind
    is_bitfield: bool = False
    signed: bool = False
    #: The member's type with typedefs/qualifiers stripped (e.g. PTR, STRUCT, INT).
    resolved_kind: Kind = field(default=Kind.UNKN)

    @property
    def lshift(self) -> int:
        """Left shift of the zero-extended little-endian load (as u64) before :attr:`rshift`."""
        return 64 - (self.bit_offset - self.offset * 8) - self.bit_size

    @property
    def rshift(self) -> int:
        """Right shift (logical, or arithmetic if :attr:`signed`) after :attr:`lshift`."""
        return 64 - self.bit_size

    def extract(self, raw: int) -> int:
        """The field's value from the integer read (little-endian) at ``offset``/``size``."""
        value = ((raw << self.lshift) & 0xFFFF_FFFF_FFFF_FFFF) >> self.rshift
        if self.signed and value >> (self.bit_size - 1):
            value -= 1 << self.bit_size
        return value


class BTF:
    """A parsed BTF blob (vmlinux or a module's split BTF on top of a base)."""

    _vmlinux: ClassVar[BTF | None] = None

    def __init__(self, data: bytes, base: BTF | None = None, name: str = "<bytes>") -> None:
        """Parse ``data``; ``base`` is the BTF that split (module) BTF builds upon."""
        self.name = name
        self.base = base
        if len(data) < _HEADER_MIN:
            raise BTFError(f"{name}: {len(data)} bytes is too short for a BTF header")
        magic = int.from_bytes(data[0:2], "little")
        order: Literal["little", "big"]
        if magic == BTF_MAGIC:
            order = "little"
        elif int.from_bytes(data[0:2], "big") == BTF_MAGIC:
            order = "big"
        else:
            raise BTFError(f"{name}: bad BTF magic {data[0:2].hex()}")
        self.byteorder = order
        self.version = data[2]
        if self.version != 1:
            raise BTFError(f"{name}: unsupported BTF version {self.version}")
        self.flags = data[3]

        def u32(off: int) -> int:
            return int.from_bytes(data[off : off + 4], order)

        hdr_len = u32(4)
        type_off, type_len, str_off, str_len = u32(8), u32(12), u32(16), u32(20)
        if hdr_len < _HEADER_MIN or hdr_len > len(data):
            raise BTFError(f"{name}: bad header length {hdr_len}")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data) or type_len % 4:
            raise BTFError(f"{name}: type or string section out of bounds")
        self._strings = bytes(data[s0 : s0 + str_len])
        words = array("I")
        words.frombytes(bytes(data[t0 : t0 + type_len]))
        if order != sys.byteorder:
            words.byteswap()
        self._words = words
        # Split BTF continues the base's type ids and string offsets.
        self._first_id = base.type_count if base else 1
        self._str_base: int = base._str_base + len(base._strings) if base else 0
        self._starts, self._by_name_off = self._index(words)
        self._cache: dict[int, BtfType] = {}
        self._name_cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str = VMLINUX_PATH, base: BTF | None = None) -> BTF:
        """Read and parse a BTF file; module files under /sys/kernel/btf get vmlinux as base."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BTFError(f"cannot read BTF from {path}: {e.strerror}") from e
        if (
            base is None
            and os.path.dirname(os.path.abspath(path)) == os.path.dirname(VMLINUX_PATH)
            and os.path.basename(path) != "vmlinux"
        ):
            base = cls.vmlinux()
        return cls(data, base=base, name=path)

    @classmethod
    def vmlinux(cls) -> BTF:
        """The running kernel's BTF, parsed once per process."""
        if cls._vmlinux is None:
            cls._vmlinux = cls.load(VMLINUX_PATH)
        return cls._vmlinux

    @classmethod
    def module(cls, module: str) -> BTF:
        """A kernel module's split BTF (``/sys/kernel/btf/<module>``) on top of vmlinux."""
        return cls.load(os.path.join(os.path.dirname(VMLINUX_PATH), module), base=cls.vmlinux())

    def _index(self, words: array[int]) -> tuple[array[int], dict[int, int | list[int]]]:
        """One pass over the type section: start word of each type, types by name offset."""
        starts = array("I")
        by_name: dict[int, int | list[int]] = {}
        n = len(words)
        i = 0
        tid = self._first_id
        append = starts.append
        while i < n:
            if i + 3 > n:
                raise BTFError(f"{self.name}: truncated type record for id {tid}")
            append(i)
            name_off = words[i]
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind == 1 or kind == 14 or kind == 17:
                i += 4
            elif kind == 4 or kind == 5 or kind == 15 or kind == 19:
                i += 3 + 3 * vlen
            elif kind == 6 or kind == 13:
                i += 3 + 2 * vlen
            elif kind == 3:
                i += 6
            else:
                i += 3 + _extra_words(kind, vlen)
            if name_off:
                prev = by_name.get(name_off)
                if prev is None:
                    by_name[name_off] = tid
                elif isinstance(prev, list):
                    prev.append(tid)
                else:
                    by_name[name_off] = [prev, tid]
            tid += 1
        if i != n:
            raise BTFError(f"{self.name}: type section overruns its length")
        return starts, by_name

    # ------------------------------------------------------------------ basics

    @property
    def type_count(self) -> int:
        """One past the highest type id (ids 0..type_count-1 exist, 0 being void)."""
        return self._first_id + len(self._starts)

    def __len__(self) -> int:
        return self.type_count

    def string(self, off: int) -> str:
        """The NUL-terminated string at ``off`` in the (possibly base's) string section."""
        if off < self._str_base:
            assert self.base is not None
            return self.base.string(off)
        rel = off - self._str_base
        s = self._strings
        if rel >= len(s):
            raise BTFError(f"{self.name}: string offset {off} out of bounds")
        end = s.index(b"\0", rel)
        return s[rel:end].decode("utf-8", "replace")

    def __getitem__(self, type_id: int) -> BtfType:
        """The type with id ``type_id`` (decoded on first use)."""
        return self.type_by_id(type_id)

    def type_by_id(self, type_id: int) -> BtfType:
        """The type with id ``type_id`` (0 is void)."""
        if type_id < self._first_id:
            if type_id == 0:
                return _VOID
            if self.base is None or type_id < 0:
                raise BTFError(f"{self.name}: no type id {type_id}")
            return self.base.type_by_id(type_id)
        t = self._cache.get(type_id)
        if t is None:
            idx = type_id - self._first_id
            if idx >= len(self._starts):
                raise BTFError(f"{self.name}: no type id {type_id} (max {self.type_count - 1})")
            t = self._decode(type_id, self._starts[idx])
            self._cache[type_id] = t
        return t

    def types(self) -> list[BtfType]:
        """Every type of this blob (not the base's), decoded. Slow on vmlinux: for tests."""
        return [self.type_by_id(i) for i in range(self._first_id, self.type_count)]

    def _decode(self, tid: int, i: int) -> BtfType:
        w = self._words
        name = self.string(w[i]) if w[i] else ""
        info = w[i + 1]
        kind = Kind((info >> 24) & 0x1F)
        vlen = info & 0xFFFF
        kflag = bool(info >> 31)
        third = w[i + 2]
        j = i + 3
        common: _Common = {"id": tid, "kind": kind, "name": name, "kind_flag": kflag, "vlen": vlen}
        if kind in _REF_KINDS:
            common["type_id"] = third
        elif kind != Kind.ARRAY:
            common["size"] = third
        if kind == Kind.INT:
            v = w[j]
            return BtfType(
                **common,
                int_encoding=(v >> 24) & 0x0F,
                int_offset=(v >> 16) & 0xFF,
                int_bits=v & 0xFF,
            )
        if kind == Kind.ARRAY:
            common["type_id"] = w[j]  # the element type
            return BtfType(**common, index_type_id=w[j + 1], nelems=w[j + 2])
        if kind in _COMPOSITE:
            members = []
            for k in range(vlen):
                m = j + 3 * k
                off = w[m + 2]
                if kflag:
                    bit_off, bit_sz = off & 0xFFFFFF, off >> 24
                else:
                    bit_off, bit_sz = off, 0
                mname = self.string(w[m]) if w[m] else ""
                members.append(BtfMember(mname, w[m + 1], bit_off, bit_sz))
            return BtfType(**common, members=tuple(members))
        if kind == Kind.ENUM:
            vals = []
            for k in range(vlen):
                m = j + 2 * k
                v = w[m + 1]
                if kflag and v & 0x8000_0000:
                    v -= 1 << 32
                vals.append(BtfEnumValue(self.string(w[m]), v))
            return BtfType(**common, values=tuple(vals))
        if kind == Kind.ENUM64:
            vals = []
            for k in range(vlen):
                m = j + 3 * k
                v = w[m + 1] | (w[m + 2] << 32)
                if kflag and v >> 63:
                    v -= 1 << 64
                vals.append(BtfEnumValue(self.string(w[m]), v))
            return BtfType(**common, values=tuple(vals))
        if kind == Kind.FUNC_PROTO:
            params = tuple(
                BtfParam(self.string(w[j + 2 * k]) if w[j + 2 * k] else "", w[j + 2 * k + 1])
                for k in range(vlen)
            )
            return BtfType(**common, params=params)
        if kind == Kind.DATASEC:
            secs = tuple(
                BtfSecInfo(w[j + 3 * k], w[j + 3 * k + 1], w[j + 3 * k + 2]) for k in range(vlen)
            )
            return BtfType(**common, secinfos=secs)
        if kind == Kind.VAR:
            return BtfType(**common, linkage=w[j])
        if kind == Kind.FUNC:
            return BtfType(**common, linkage=vlen)
        if kind == Kind.DECL_TAG:
            idx = w[j]
            return BtfType(**common, component_idx=idx - (1 << 32) if idx >> 31 else idx)
        return BtfType(**common)

    # ------------------------------------------------------------------ lookups

    def ids_by_name(self, name: str) -> tuple[int, ...]:
        """Ids of every type called ``name`` (base types first)."""
        hit = self._name_cache.get(name)
        if hit is not None:
            return hit
        ids: list[int] = list(self.base.ids_by_name(name)) if self.base else []
        needle = name.encode()
        s = self._strings
        pos = s.find(b"\0" + needle + b"\0")
        # The string section starts with "" at offset 0, so every name is preceded by NUL.
        while pos != -1:
            off = pos + 1 + self._str_base
            hit_ids = self._by_name_off.get(off)
            if isinstance(hit_ids, list):
                ids.extend(hit_ids)
            elif hit_ids is not None:
                ids.append(hit_ids)
            pos = s.find(b"\0" + needle + b"\0", pos + 1)
        if self.base is not None:
            # Split BTF may name its types with the base's strings.
            pos = self.base._strings.find(b"\0" + needle + b"\0")
            while pos != -1:
                off = pos + 1 + self.base._str_base
                hit_ids = self._by_name_off.get(off)
                if isinstance(hit_ids, list):
                    ids.extend(hit_ids)
                elif hit_ids is not None:
                    ids.append(hit_ids)
                pos = self.base._strings.find(b"\0" + needle + b"\0", pos + 1)
        result = tuple(sorted(set(ids)))
        self._name_cache[name] = result
        return result

    def find_type(self, name: str, kind: Kind | str | None = None) -> BtfType | None:
        """Like :meth:`type_by_name` but returns None when there is no such type."""
        want = _kind_arg(kind)
        candidates = [self.type_by_id(i) for i in self.ids_by_name(name)]
        if want is not None:
            candidates = [t for t in candidates if t.kind == want]
        if not candidates:
            return None
        # Prefer a complete definition over a forward declaration, and real types over
        # functions/variables that happen to share the name.
        rank = {
            Kind.STRUCT: 0,
            Kind.UNION: 0,
            Kind.ENUM: 1,
            Kind.ENUM64: 1,
            Kind.TYPEDEF: 2,
            Kind.INT: 3,
            Kind.FLOAT: 3,
        }
        return min(candidates, key=lambda t: (rank.get(t.kind, 5), t.id))

    def type_by_name(self, name: str, kind: Kind | str | None = None) -> BtfType:
        """The type called ``name`` (optionally of ``kind``, e.g. ``"struct"`` or Kind.ENUM).

        Accepts C spellings like ``"struct sock"``. Raises :class:`BTFError` if absent.
        """
        if kind is None:
            for prefix, k in (
                ("struct ", Kind.STRUCT),
                ("union ", Kind.UNION),
                ("enum ", Kind.ENUM),
            ):
                if name.startswith(prefix):
                    name, kind = name[len(prefix) :].strip(), k
                    break
        t = self.find_type(name, kind)
        if t is None and _kind_arg(kind) == Kind.ENUM:
            t = self.find_type(name, Kind.ENUM64)
        if t is None:
            want = _kind_arg(kind)
            what = f"{want.name.lower()} " if want is not None else ""
            raise BTFError(f"{self.name}: no type {what}'{name}'")
        return t

    def strip(self, type_id: int, typedefs: bool = True) -> BtfType:
        """Follow qualifiers (and typedefs unless ``typedefs=False``) to the underlying type."""
        t = self.type_by_id(type_id)
        seen = 0
        while t.kind in (_MODIFIERS if typedefs else _QUALIFIERS):
            t = self.type_by_id(t.type_id or 0)
            seen += 1
            if seen > 64:
                raise BTFError(f"{self.name}: modifier loop at type id {type_id}")
        return t

    def _sizeof_id(self, type_id: int) -> int:
        t = self.strip(type_id)
        if t.kind == Kind.ARRAY:
            return t.nelems * self._sizeof_id(t.type_id or 0)
        if t.kind == Kind.PTR:
            return self.pointer_size
        if t.size is None or t.kind in (Kind.FWD, Kind.FUNC, Kind.FUNC_PROTO, Kind.UNKN):
            raise BTFError(f"{self.name}: {t.describe()} has no size")
        return t.size

    @property
    def pointer_size(self) -> int:
        """Pointer size of the described machine (size of ``long``, else this host's)."""
        long_t = self.find_type("long unsigned int", Kind.INT) or self.find_type("long int")
        return long_t.size if long_t and long_t.size else 8

    def sizeof(self, type_name: str | int) -> int:
        """Size in bytes of a named type (``"sock"``, ``"struct sock"``, ``"u32"``) or id."""
        if isinstance(type_name, int):
            return self._sizeof_id(type_name)
        return self._sizeof_id(self.type_by_name(type_name).id)

    def enum_value(self, enum_name: str | None, member: str) -> int:
        """Value of enumerator ``member`` of ``enum_name`` (None: any enum, e.g. anonymous)."""
        if enum_name is None:
            for tid in self._enum_ids_with(member):
                for v in self.type_by_id(tid).values:
                    if v.name == member:
                        return v.value
            raise BTFError(f"{self.name}: no enumerator '{member}' in any enum")
        cands = [self.type_by_id(i) for i in self.ids_by_name(enum_name)]
        enums = [t for t in cands if t.kind in (Kind.ENUM, Kind.ENUM64)]
        if not enums:
            td = [t for t in cands if t.kind == Kind.TYPEDEF]
            enums = [
                self.strip(t.id) for t in td if self.strip(t.id).kind in (Kind.ENUM, Kind.ENUM64)
            ]
        if not enums:
            raise BTFError(f"{self.name}: no enum '{enum_name}'")
        for e in enums:
            for v in e.values:
                if v.name == member:
                    return v.value
        raise BTFError(f"{self.name}: enum {enum_name} has no member '{member}'")

    def _enum_ids_with(self, member: str) -> list[int]:
        """Enums that may contain ``member``: enumerator names are strings too, so scan."""
        out = []
        for tid in range(self._first_id, self.type_count):
            k = (self._words[self._starts[tid - self._first_id] + 1] >> 24) & 0x1F
            if k in (Kind.ENUM, Kind.ENUM64):
                out.append(tid)
        return out

    # ------------------------------------------------------------------ field paths

    def members_of(self, type_name: str | int) -> tuple[BtfMember, ...]:
        """Direct members of a struct/union given by name or id (typedefs followed)."""
        t = (
            self.type_by_name(type_name)
            if isinstance(type_name, str)
            else self.type_by_id(type_name)
        )
        t = self.strip(t.id)
        if t.kind not in _COMPOSITE:
            raise BTFError(f"{self.name}: {t.describe()} is not a struct or union")
        return t.members

    def _find_member(self, comp: BtfType, name: str) -> list[BtfMember] | None:
        """Chain of members leading to ``name`` in ``comp``, descending anonymous members."""
        for m in comp.members:
            if m.name == name:
                return [m]
        for m in comp.members:
            if m.name:
                continue
            sub = self.strip(m.type_id)
            if sub.kind in _COMPOSITE:
                chain = self._find_member(sub, name)
                if chain is not None:
                    return [m, *chain]
        return None

    def resolve(self, path: str) -> FieldLocation:
        """Locate a field path like ``sock.__sk_common.skc_daddr`` or ``fdtable.fd``.

        The first component names a struct/union (or a typedef of one; ``struct sock``
        also works); each further component is a member, found directly or through
        anonymous structs/unions. ``member[N]`` indexes an array member. Paths cannot
        continue through a pointer (that needs a memory read): resolve from the pointee.
        """
        parts = path.split(".")
        if len(parts) < 2 or not all(parts):
            raise BTFError(f"bad field path '{path}': expected 'type.member[.member...]'")
        root = self.type_by_name(parts[0])
        cur = self.strip(root.id)
        if cur.kind not in _COMPOSITE:
            raise BTFError(f"{path}: {root.describe()} is not a struct or union")
        bit_off = 0
        bit_size = 0
        member_type = root.id
        walked = parts[0]
        for depth, raw in enumerate(parts[1:]):
            name, indices = _split_indices(raw, path)
            if cur.kind not in _COMPOSITE:
                label = _type_label(self, self.type_by_id(member_type))
                hint = ""
                if cur.kind == Kind.PTR:
                    target = self.strip(cur.type_id or 0)
                    if target.name:
                        hint = f"; resolve '{target.name}.{name}' from the pointee instead"
                raise BTFError(
                    f"{path}: {walked} is '{label}', not a struct or union, so it has no "
                    f"member '{name}'{hint}"
                )
            chain = self._find_member(cur, name)
            if chain is None:
                raise BTFError(f"{path}: {cur.describe().split(' ', 1)[-1]} has no member '{name}'")
            for m in chain:
                bit_off += m.bit_offset
            last = chain[-1]
            bit_size = last.bit_size
            member_type = last.type_id
            walked = f"{walked}.{name}"
            for idx in indices:
                arr = self.strip(member_type)
                if arr.kind != Kind.ARRAY:
                    raise BTFError(f"{path}: {walked} is not an array, cannot index [{idx}]")
                if arr.nelems and idx >= arr.nelems:
                    raise BTFError(f"{path}: index {idx} out of range for {walked}[{arr.nelems}]")
                member_type = arr.type_id or 0
                bit_off += idx * self._sizeof_id(member_type) * 8
                walked = f"{walked}[{idx}]"
            cur = self.strip(member_type)
            if bit_size and depth != len(parts) - 2:
                raise BTFError(f"{path}: {walked} is a bitfield, cannot go deeper")
        res = self.strip(member_type)
        tname = self.type_by_id(member_type)
        signed = res.is_signed
        if bit_size:
            size = self._sizeof_id(member_type)
            off = (bit_off // 8) // size * size
            while bit_off + bit_size - off * 8 > size * 8:
                if size >= 8:
                    raise BTFError(f"{path}: bitfield spans more than 8 bytes")
                size *= 2
                off = (bit_off // 8) // size * size
            return FieldLocation(
                path,
                off,
                size,
                bit_off,
                bit_size,
                member_type,
                _type_label(self, tname),
                tname.kind,
                is_bitfield=True,
                signed=signed,
                resolved_kind=res.kind,
            )
        if bit_off % 8:
            raise BTFError(f"{path}: field at bit {bit_off} is not byte aligned")
        size = self._sizeof_id(member_type)
        return FieldLocation(
            path,
            bit_off // 8,
            size,
            bit_off,
            size * 8,
            member_type,
            _type_label(self, tname),
            tname.kind,
            signed=signed,
            resolved_kind=res.kind,
        )

    def offsetof(self, path: str) -> int:
        """Byte offset of a (non-bitfield) field path; see :meth:`resolve`."""
        loc = self.resolve(path)
        if loc.is_bitfield:
            raise BTFError(f"{path}: is a bitfield; use resolve() for its bit offset")
        return loc.offset


_VOID = BtfType(id=0, kind=Kind.UNKN, name="void")


def _kind_arg(kind: Kind | str | int | None) -> Kind | None:
    if kind is None:
        return None
    if isinstance(kind, str):
        try:
            return Kind[kind.upper()]
        except KeyError:
            raise BTFError(f"unknown BTF kind '{kind}'") from None
    return Kind(kind)


def _split_indices(raw: str, path: str) -> tuple[str, list[int]]:
    if "[" not in raw:
        return raw, []
    name, rest = raw.split("[", 1)
    indices = []
    for chunk in ("[" + rest).split("[")[1:]:
        if not chunk.endswith("]") or not chunk[:-1].isdigit():
            raise BTFError(f"bad field path '{path}': bad index in '{raw}'")
        indices.append(int(chunk[:-1]))
    if not name:
        raise BTFError(f"bad field path '{path}': index without a member name")
    return name, indices


def _type_label(btf: BTF, t: BtfType) -> str:
    """A C-ish spelling of a member type: ``struct nsproxy *``, ``u32``, ``int[4]``."""
    suffix = ""
    for _ in range(16):
        if t.kind == Kind.PTR:
            suffix = "*" + suffix
            t = btf.type_by_id(t.type_id or 0)
        elif t.kind in _QUALIFIERS:
            t = btf.type_by_id(t.type_id or 0)
        elif t.kind == Kind.ARRAY:
            suffix = f"{suffix}[{t.nelems}]"
            t = btf.type_by_id(t.type_id or 0)
        else:
            break
    if t.kind == Kind.UNKN:
        base = "void"
    elif t.kind == Kind.FUNC_PROTO:
        base = "func"
    elif t.kind in (Kind.TYPEDEF, Kind.INT, Kind.FLOAT):
        base = t.name
    else:
        base = t.describe()
    if suffix.startswith("*"):
        suffix = " " + suffix
    return base + suffix
