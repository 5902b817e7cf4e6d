"""BPF maps: `MapSpec` (plain data) and `Map` (a kernel object with a dict-like API).

Keys and values are bytes unless a codec is given: a `struct` format string (or
`struct.Struct`) or a ctypes type. Per-CPU maps read and write one value per possible CPU.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from . import bpffs
from ._closing import Closing
from .syscall import (
    BPFError,
    Cmd,
    GetIdAttr,
    MapBatchAttr,
    MapCreateAttr,
    MapElemAttr,
    MapInfo,
    MapType,
    bpf,
    check_obj_name,
    close_fd,
    obj_get,
    obj_get_info,
    obj_pin,
    possible_cpus,
)

# Update flags.
BPF_ANY, BPF_NOEXIST, BPF_EXIST, BPF_F_LOCK = 0, 1, 2, 4
_UPDATE_FLAGS = {"any": BPF_ANY, "noexist": BPF_NOEXIST, "exist": BPF_EXIST, "lock": BPF_F_LOCK}

# Map creation / open flags.
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY = 1 << 3
BPF_F_WRONLY = 1 << 4
BPF_F_RDONLY_PROG = 1 << 7
BPF_F_WRONLY_PROG = 1 << 8
BPF_F_MMAPABLE = 1 << 10

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_PERCPU = {MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH,
           MapType.PERCPU_CGROUP_STORAGE}
_KEYLESS = {MapType.QUEUE, MapType.STACK, MapType.BLOOM_FILTER}
_FD_VALUED = {MapType.PERF_EVENT_ARRAY, MapType.PROG_ARRAY, MapType.CGROUP_ARRAY,
              MapType.ARRAY_OF_MAPS, MapType.HASH_OF_MAPS}


Codec = str | struct.Struct | type | None
# The ctypes data types a codec may be (what has `from_buffer_copy`).
_CTYPES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array, ctypes._Pointer)
if TYPE_CHECKING:
    _CType: TypeAlias = type[ctypes._SimpleCData[Any] | ctypes.Structure | ctypes.Union
                             | ctypes.Array[Any] | ctypes._Pointer[Any]]


class _Codec:
    """Turns Python values into fixed-size bytes and back."""

    def __init__(self, spec: Codec, size: int, what: str) -> None:
        self.size, self.what = size, what
        self.struct: struct.Struct | None = None
        self.ctype: _CType | None = None
        if isinstance(spec, str):
            spec = struct.Struct(spec)
        if isinstance(spec, struct.Struct):
            self.struct = spec
            got = spec.size
        elif isinstance(spec, type) and issubclass(spec, _CTYPES):
            self.ctype = spec
            got = ctypes.sizeof(spec)
        elif spec is None:
            got = size
        else:
            raise TypeError(f"{what}: codec must be a struct format or a ctypes type, not {spec!r}")
        if got != size:
            raise ValueError(f"{what}: codec is {got} bytes but the map's size is {size}")

    def encode(self, value: object) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif self.struct is not None:
            try:
                data = self.struct.pack(*value if isinstance(value, tuple) else (value,))
            except struct.error as e:
                raise ValueError(f"{self.what}: cannot pack {value!r}: {e}") from None
        elif self.ctype is not None:
            data = bytes(value if isinstance(value, ctypes._SimpleCData | ctypes.Structure
                                              | ctypes.Union | ctypes.Array)
                         else self.ctype(value))
        elif isinstance(value, int) and self.size in (1, 2, 4, 8):
            data = value.to_bytes(self.size, "little", signed=value < 0)
        else:
            raise TypeError(f"{self.what}: expected bytes of length {self.size}, got {value!r}")
        if len(data) != self.size:
            raise ValueError(f"{self.what}: expected {self.size} bytes, got {len(data)}")
        return data

    def decode(self, data: bytes) -> Any:
        if self.struct is not None:
            values = self.struct.unpack(data)
            return values[0] if len(values) == 1 else values
        if self.ctype is not None:
            obj = self.ctype.from_buffer_copy(data)
            return obj.value if isinstance(obj, ctypes._SimpleCData) else obj
        return data


@dataclass
class MapSpec:
    """A map description (plain data). `create()` (or `load()`) makes the kernel object.

    Sizes left as None get the type's default (e.g. perf_event_array: 4/4 and one entry per
    possible CPU; ringbuf: 256 KiB); types that need a size and lack one raise ValueError.
    """

    type: MapType | str | int
    key_size: int | None = None
    value_size: int | None = None
    max_entries: int | None = None
    name: str = ""
    flags: int = 0
    inner_map_fd: int = 0
    numa_node: int = 0
    map_extra: int = 0
    btf_fd: int = 0
    btf_key_type_id: int = 0
    btf_value_type_id: int = 0
    key: Codec = field(default=None, repr=False)
    value: Codec = field(default=None, repr=False)

    def resolved(self) -> MapSpec:
        """A copy with the type parsed and defaults filled in; validates sizes."""
        mtype = MapType.parse(self.type)
        key, value, entries, flags = self.key_size, self.value_size, self.max_entries, self.flags
        label = f"map {self.name!r}" if self.name else f"{mtype.name.lower()} map"
        if mtype in _FD_VALUED:
            key, value = key or 4, value or 4
            if mtype == MapType.PERF_EVENT_ARRAY and entries is None:
                entries = len(possible_cpus())
        elif mtype in (MapType.RINGBUF, MapType.USER_RINGBUF):
            key, value = key or 0, value or 0
            entries = entries or 256 * 1024
            if entries % PAGE_SIZE or entries & (entries - 1):
                raise ValueError(f"{label}: ring buffer size {entries} must be a power of two "
                                 f"and a multiple of the page size ({PAGE_SIZE})")
        elif mtype in _KEYLESS:
            key = key or 0
        elif mtype in (MapType.ARRAY, MapType.PERCPU_ARRAY):
            key = key or 4
        if mtype == MapType.LPM_TRIE:
            flags |= BPF_F_NO_PREALLOC
        for what, v in (("key_size", key), ("value_size", value), ("max_entries", entries)):
            if v is None:
                raise ValueError(f"{label}: {what} is required for {mtype.name.lower()} maps")
        check_obj_name(self.name, "map")
        return MapSpec(mtype, key, value, entries, self.name, flags, self.inner_map_fd,
                       self.numa_node, self.map_extra, self.btf_fd, self.btf_key_type_id,
                       self.btf_value_type_id, self.key, self.value)

    def load(self) -> Map:
        """The kernel object, as `ProgramSpec.load()` names it: the same as `create()`."""
        return self.create()

    def create(self) -> Map:
        """BPF_MAP_CREATE; returns the new Map."""
        spec = self.resolved()
        attr = MapCreateAttr(
            map_type=spec.type, key_size=spec.key_size, value_size=spec.value_size,
            max_entries=spec.max_entries, map_flags=spec.flags, inner_map_fd=spec.inner_map_fd,
            numa_node=spec.numa_node, map_name=spec.name.encode(), btf_fd=spec.btf_fd,
            btf_key_type_id=spec.btf_key_type_id, btf_value_type_id=spec.btf_value_type_id,
            map_extra=spec.map_extra,
        )
        label = f"{MapType.parse(spec.type).name.lower()} map {spec.name!r}"
        fd = bpf(Cmd.MAP_CREATE, attr, label)
        return Map(fd, spec)


class Map(Closing):
    """A BPF map in the kernel: dict-like access, pinning, info; closes its fd on exit."""

    def __init__(self, fd: int, spec: MapSpec, readonly: bool = False) -> None:
        self._fd = fd
        self.spec = spec
        self.type: MapType = MapType.parse(spec.type)
        self.name: str = spec.name
        self.key_size: int = spec.key_size or 0
        self.value_size: int = spec.value_size or 0
        self.max_entries: int = spec.max_entries or 0
        self.flags: int = spec.flags
        self.readonly = readonly
        self.percpu = self.type in _PERCPU
        self._ncpus = len(possible_cpus()) if self.percpu else 1
        self._slot = (self.value_size + 7) & ~7 if self.percpu else self.value_size
        self._key = _Codec(spec.key, self.key_size, f"map {self.name!r} key")
        self._value = _Codec(spec.value, self.value_size, f"map {self.name!r} value")

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def create(cls, type: MapType | str | int, key_size: int | None = None,
               value_size: int | None = None, max_entries: int | None = None, name: str = "",
               flags: int = 0, *, key: Codec = None, value: Codec = None, **extra: int) -> Map:
        """Create a map: `Map.create("hash", key_size=4, value_size=8, max_entries=64,
        name="counts")`. `key`/`value` are optional codecs; `extra` goes to MapSpec."""
        return MapSpec(type, key_size, value_size, max_entries, name, flags, key=key,
                       value=value, **extra).create()

    @classmethod
    def from_fd(cls, fd: int, *, readonly: bool = False, key: Codec = None,
                value: Codec = None) -> Map:
        """Wrap an existing map fd (taking ownership), reading its shape from the kernel."""
        try:
            info = obj_get_info(fd, MapInfo, "(map)")
        except BaseException:
            close_fd(fd)
            raise
        spec = MapSpec(MapType(info.type), info.key_size, info.value_size, info.max_entries,
                       info.name.decode(), info.map_flags, key=key, value=value)
        return cls(fd, spec, readonly=readonly)

    @classmethod
    def open_pinned(cls, path: str, *, readonly: bool = False, flags: int = 0,
                    key: Codec = None, value: Codec = None) -> Map:
        """Open a map pinned on bpffs (mounting bpffs if needed). `readonly` opens with
        BPF_F_RDONLY, so writes fail with EPERM."""
        if os.path.abspath(path).startswith(bpffs.DEFAULT_ROOT + "/"):
            bpffs.bpffs_root()
        flags |= BPF_F_RDONLY if readonly else 0
        fd = obj_get(path, flags)
        return cls.from_fd(fd, readonly=bool(flags & BPF_F_RDONLY), key=key, value=value)

    @classmethod
    def from_id(cls, map_id: int, *, flags: int = 0, key: Codec = None,
                value: Codec = None) -> Map:
        """Open a map by its kernel id (BPF_MAP_GET_FD_BY_ID)."""
        fd = bpf(Cmd.MAP_GET_FD_BY_ID, GetIdAttr(id=map_id, open_flags=flags), f"id {map_id}")
        return cls.from_fd(fd, readonly=bool(flags & BPF_F_RDONLY), key=key, value=value)

    # --- object -----------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The map's file descriptor (raises if closed)."""
        if self._fd < 0:
            raise ValueError(f"map {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd (the kernel frees the map when nothing else holds it)."""
        fd, self._fd = self._fd, -1
        close_fd(fd)


    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return (f"<Map {self.name!r} {self.type.name.lower()} key={self.key_size} "
                f"value={self.value_size} max={self.max_entries} {state}>")

    def info(self) -> MapInfo:
        """BPF_OBJ_GET_INFO_BY_FD: the kernel's view (id, type, sizes, name, flags)."""
        return obj_get_info(self.fd, MapInfo, self._label())

    @property
    def id(self) -> int:
        """The kernel's map id (as `bpftool map show` prints)."""
        return int(self.info().id)

    def pin(self, path: str) -> None:
        """Pin the map at `path` on bpffs (mounted at /sys/fs/bpf if needed)."""
        label = f"map {self.name!r}"
        obj_pin(self.fd, bpffs.prepare_pin_path(path, label), label)

    def freeze(self) -> None:
        """BPF_MAP_FREEZE: user space can no longer write the map."""
        bpf(Cmd.MAP_FREEZE, GetIdAttr(id=self.fd), self._label())

    def _label(self) -> str:
        return f"on map {self.name!r}" if self.name else f"on map fd {self._fd}"

    # --- raw element operations -------------------------------------------------------------

    def _call(self, cmd: Cmd, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None,
              flags: int = 0) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key)) if key else None
        attr = MapElemAttr(map_fd=self.fd, key=ctypes.addressof(kbuf) if kbuf else 0,
                           value=ctypes.addressof(value) if value is not None else 0,
                           flags=flags)
        try:
            bpf(cmd, attr, self._label())
        except BPFError as e:
            if e.errno == errno.EPERM and self.readonly and cmd != Cmd.MAP_LOOKUP_ELEM:
                e.strerror += " (the map fd was opened read-only)"
            raise

    def _value_buf(self) -> ctypes.Array[ctypes.c_char]:
        return ctypes.create_string_buffer(max(self._slot * self._ncpus, 1))

    def lookup_bytes(self, key: bytes) -> bytes | None:
        """Raw lookup: the value bytes (all CPUs' slots for per-CPU maps), or None."""
        buf = self._value_buf()
        try:
            self._call(Cmd.MAP_LOOKUP_ELEM, key, buf)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return buf.raw[: self._slot * self._ncpus]

    def update(self, key: object, value: object, flags: int | str = BPF_ANY) -> None:
        """Set key to value. flags: "any" (default), "noexist", "exist", or BPF_* ints.
        Per-CPU maps take a list (one value per possible CPU) or one value for all."""
        if isinstance(flags, str):
            flags = _UPDATE_FLAGS[flags]
        kbytes = self._key.encode(key) if self.key_size else None
        size = max(self._slot * self._ncpus, 1)
        buf = ctypes.create_string_buffer(self._encode_value(value), size)
        self._call(Cmd.MAP_UPDATE_ELEM, kbytes, buf, flags)

    def _encode_value(self, value: object) -> bytes:
        if not self.percpu:
            return self._value.encode(value)
        values = value if isinstance(value, list) else [value] * self._ncpus
        if len(values) != self._ncpus:
            raise ValueError(f"map {self.name!r}: per-CPU value needs {self._ncpus} items, "
                             f"got {len(values)}")
        pad = b"\0" * (self._slot - self.value_size)
        return b"".join(self._value.encode(v) + pad for v in values)

    def _decode_value(self, data: bytes) -> Any:
        if not self.percpu:
            return self._value.decode(data[: self.value_size])
        return [self._value.decode(data[i * self._slot: i * self._slot + self.value_size])
                for i in range(self._ncpus)]

    def get(self, key: object, default: Any = None) -> Any:
        """Value for key (decoded), or `default` if absent."""
        data = self.lookup_bytes(self._key.encode(key))
        return default if data is None else self._decode_value(data)

    def delete(self, key: object) -> bool:
        """Delete key; returns False if it was absent."""
        try:
            self._call(Cmd.MAP_DELETE_ELEM, self._key.encode(key), None)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def pop(self) -> Any:
        """Queue/stack maps: remove and return the next value (KeyError if empty)."""
        buf = self._value_buf()
        try:
            self._call(Cmd.MAP_LOOKUP_AND_DELETE_ELEM, None, buf)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                raise KeyError(f"map {self.name!r} is empty") from None
            raise
        return self._decode_value(buf.raw)

    def take(self, key: object) -> Any:
        """Hash maps: remove `key` and return its value in one step
        (BPF_MAP_LOOKUP_AND_DELETE_ELEM, 5.14+), or None if it was absent. Of a program
        deleting the same key at the same time and this call, exactly one succeeds."""
        buf = self._value_buf()
        try:
            self._call(Cmd.MAP_LOOKUP_AND_DELETE_ELEM, self._key.encode(key), buf)
        except BPFError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return self._decode_value(buf.raw)

    def lookup_batch(self, chunk: int = 256) -> list[tuple[Any, Any]]:
        """Every (key, value) of a hash, LRU or array map, read `chunk` entries per
        BPF_MAP_LOOKUP_BATCH call (one syscall for a small map instead of two per entry).
        Not a snapshot: entries changed meanwhile may or may not be seen."""
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, not {chunk}")
        out: list[tuple[Any, Any]] = []
        token_in = ctypes.create_string_buffer(8)
        token_out = ctypes.create_string_buffer(8)
        first = True
        while True:
            keys = ctypes.create_string_buffer(max(self.key_size, 1) * chunk)
            slot = max(self._slot * self._ncpus, 1)
            values = ctypes.create_string_buffer(slot * chunk)
            attr = MapBatchAttr(in_batch=0 if first else ctypes.addressof(token_in),
                                out_batch=ctypes.addressof(token_out),
                                keys=ctypes.addressof(keys), values=ctypes.addressof(values),
                                count=chunk, map_fd=self.fd)
            done = False
            try:
                bpf(Cmd.MAP_LOOKUP_BATCH, attr, self._label())
            except BPFError as e:
                if e.errno == errno.ENOSPC and attr.count == 0:  # a bucket larger than chunk
                    chunk *= 2
                    continue
                if e.errno != errno.ENOENT:
                    raise
                done = True  # the last batch (`count` entries still came back)
            ks, vs = keys.raw, values.raw
            for i in range(attr.count):
                out.append((self._key.decode(ks[i * self.key_size:(i + 1) * self.key_size]),
                            self._decode_value(vs[i * slot:(i + 1) * slot])))
            if done:
                return out
            ctypes.memmove(token_in, token_out, 8)
            first = False

    def push(self, value: object, flags: int | str = BPF_ANY) -> None:
        """Queue/stack maps: add a value."""
        self.update(None, value, flags)

    # --- dict protocol ------------------------------------------------------------------------

    def __getitem__(self, key: object) -> Any:
        data = self.lookup_bytes(self._key.encode(key))
        if data is None:
            raise KeyError(key)
        return self._decode_value(data)

    def __setitem__(self, key: object, value: object) -> None:
        self.update(key, value)

    def __delitem__(self, key: object) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return self.lookup_bytes(self._key.encode(key)) is not None

    def _raw_keys(self) -> Iterator[bytes]:
        nxt = ctypes.create_string_buffer(self.key_size)
        cur: bytes | None = None
        while True:
            try:
                self._call(Cmd.MAP_GET_NEXT_KEY, cur, nxt)
            except BPFError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            cur = nxt.raw
            yield cur

    def keys(self) -> Iterator[Any]:
        """Iterate keys with BPF_MAP_GET_NEXT_KEY (decoded)."""
        for k in self._raw_keys():
            yield self._key.decode(k)

    __iter__ = keys

    def values(self) -> Iterator[Any]:
        """Iterate values (decoded)."""
        for _, v in self.items():
            yield v

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Iterate (key, value) pairs; keys deleted meanwhile are skipped."""
        for k in self._raw_keys():
            data = self.lookup_bytes(k)
            if data is not None:
                yield self._key.decode(k), self._decode_value(data)

    def __len__(self) -> int:
        return sum(1 for _ in self._raw_keys())

    def clear(self) -> None:
        """Delete every key (array maps cannot delete; they raise)."""
        for k in list(self._raw_keys()):
            self.delete(k)
