"""BTF reader tests: the running kernel's BTF checked against bpftool's raw dump.

``bpftool btf dump file /sys/kernel/btf/vmlinux format raw`` is an independent parser
(libbpf's); its text is parsed here and every type is compared, then a few dozen field
paths are resolved both by :mod:`bpf_asm.btf` and by a small walker over bpftool's data.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from bpf_asm.btf import BTF, BTFError, Kind

VMLINUX = "/sys/kernel/btf/vmlinux"

needs_vmlinux = pytest.mark.skipif(not os.path.exists(VMLINUX), reason="no kernel BTF")
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="no bpftool")


# --------------------------------------------------------------------------- oracle


@dataclass
class RawType:
    """One type as bpftool prints it."""

    id: int
    kind: str
    name: str
    attrs: dict[str, str]
    members: list[tuple[str, dict[str, str]]] = field(default_factory=list)


_HEAD = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_SUB = re.compile(r"^\t(?:'([^']*)' )?(.*)$")
_KV = re.compile(r"(\w+)=([^\s,]+)")


def parse_bpftool_raw(text: str) -> dict[int, RawType]:
    """Parse bpftool's ``format raw`` output into types by id."""
    types: dict[int, RawType] = {}
    cur: RawType | None = None
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m:
            cur = RawType(int(m[1]), m[2], m[3], dict(_KV.findall(m[4])))
            types[cur.id] = cur
            continue
        s = _SUB.match(line)
        if s and cur is not None:
            cur.members.append((s[1] or "", dict(_KV.findall(s[2]))))
    return types


@pytest.fixture(scope="module")
def oracle() -> dict[int, RawType]:
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX, "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    types = parse_bpftool_raw(out)
    assert len(types) > 1000, "bpftool printed too few types; parser out of date?"
    return types


@pytest.fixture(scope="module")
def btf() -> BTF:
    t0 = time.perf_counter()
    b = BTF.load(VMLINUX)
    elapsed = time.perf_counter() - t0
    print(f"\nBTF.load({VMLINUX}): {elapsed * 1000:.0f} ms, {b.type_count - 1} types")
    return b


class OracleWalker:
    """Resolve ``a.b.c`` over bpftool's data, independently of bpf_asm.btf."""

    MODS = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}

    def __init__(self, types: dict[int, RawType]) -> None:
        self.types = types
        self.by_name: dict[str, list[RawType]] = {}
        for t in types.values():
            self.by_name.setdefault(t.name, []).append(t)

    def strip(self, tid: int) -> RawType | None:
        while tid:
            t = self.types[tid]
            if t.kind not in self.MODS:
                return t
            tid = int(t.attrs["type_id"])
        return None

    def size(self, tid: int) -> int:
        t = self.strip(tid)
        assert t is not None
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return int(t.attrs["nr_elems"]) * self.size(int(t.attrs["type_id"]))
        return int(t.attrs["size"])

    def find(self, t: RawType, name: str) -> tuple[int, int, int] | None:
        """(bit offset, type id, bitfield size) of member ``name``, via anonymous members."""
        for mname, a in t.members:
            if mname == name:
                return int(a["bits_offset"]), int(a["type_id"]), int(a.get("bitfield_size", 0))
        for mname, a in t.members:
            if mname in ("", "(anon)"):
                sub = self.strip(int(a["type_id"]))
                if sub and sub.kind in ("STRUCT", "UNION"):
                    hit = self.find(sub, name)
                    if hit:
                        return int(a["bits_offset"]) + hit[0], hit[1], hit[2]
        return None

    def resolve(self, path: str) -> tuple[int, int, int]:
        """(bit offset, bit size, type id); bit size is the byte size * 8 unless a bitfield."""
        root, *rest = path.split(".")
        cur = next(t for t in self.by_name[root] if t.kind in ("STRUCT", "UNION"))
        bits, bsize, tid = 0, 0, cur.id
        for name in rest:
            hit = self.find(cur, name)
            assert hit, f"oracle: {path} not found"
            bits += hit[0]
            tid = hit[1]
            bsize = hit[2] or self.size(tid) * 8
            cur = self.strip(tid)
        return bits, bsize, tid


PATHS = [
    "task_struct.nsproxy",
    "task_struct.files",
    "task_struct.pid",
    "task_struct.tgid",
    "task_struct.comm",
    "task_struct.real_parent",
    "task_struct.mm",
    "task_struct.sched_reset_on_fork",  # bitfield
    "task_struct.sched_contributes_to_load",  # bitfield
    "task_struct.__state",
    "nsproxy.net_ns",
    "nsproxy.mnt_ns",
    "net.ns.inum",
    "net.ns",
    "files_struct.fdt",
    "fdtable.fd",
    "fdtable.max_fds",
    "file.private_data",
    "file.f_inode",
    "file.f_flags",
    "inode.i_ino",
    "inode.i_mode",
    "socket.sk",
    "socket.type",
    "socket.file",
    "socket_alloc.socket",
    "socket_alloc.vfs_inode",
    "sock.sk_protocol",
    "sock.sk_type",
    "sock.sk_socket",
    "sock.__sk_common",
    "sock.__sk_common.skc_daddr",  # inside anonymous union/struct (skc_addrpair)
    "sock.__sk_common.skc_rcv_saddr",
    "sock.__sk_common.skc_family",
    "sock.__sk_common.skc_dport",  # anonymous struct inside anonymous union
    "sock.__sk_common.skc_num",
    "sock.__sk_common.skc_state",
    "sock.__sk_common.skc_v6_daddr",
    "sock.__sk_common.skc_net",
    "sock_common.skc_hash",
    "inet_sock.inet_sport",
    "inet_sock.inet_saddr",
    "tcp_sock.snd_una",
    "tcp_sock.rcv_nxt",
    "sk_buff.len",
    "sk_buff.protocol",
    "sk_buff.pkt_type",  # bitfield on most kernels
    "page.flags",
]


# --------------------------------------------------------------------------- tests


@needs_vmlinux
def test_load_time_and_cache(btf: BTF) -> None:
    t0 = time.perf_counter()
    again = BTF.load(VMLINUX)
    elapsed = time.perf_counter() - t0
    print(f"\nBTF.load: {elapsed * 1000:.0f} ms")
    assert again.type_count == btf.type_count
    assert elapsed < 2.0, f"BTF.load took {elapsed:.2f}s; too slow for daemon start"
    assert BTF.vmlinux() is BTF.vmlinux()


@needs_vmlinux
@needs_bpftool
def test_every_type_matches_bpftool(btf: BTF, oracle: dict[int, RawType]) -> None:
    assert btf.type_count - 1 == max(oracle)
    for tid, raw in oracle.items():
        t = btf[tid]
        where = f"type [{tid}] {raw.kind} '{raw.name}'"
        assert t.kind.name == raw.kind, where
        assert (t.name or "(anon)") == raw.name, where
        a = raw.attrs
        if raw.kind == "INT":
            assert (t.size, t.int_offset, t.int_bits) == (
                int(a["size"]),
                int(a["bits_offset"]),
                int(a["nr_bits"]),
            ), where
            assert t.is_signed == ("SIGNED" in a["encoding"]), where
        elif raw.kind in (
            "PTR",
            "TYPEDEF",
            "CONST",
            "VOLATILE",
            "RESTRICT",
            "TYPE_TAG",
            "VAR",
            "FUNC",
            "DECL_TAG",
        ):
            assert t.type_id == int(a["type_id"]), where
            if raw.kind == "DECL_TAG":
                assert t.component_idx == int(a["component_idx"]), where
        elif raw.kind == "ARRAY":
            assert (t.type_id, t.index_type_id, t.nelems) == (
                int(a["type_id"]),
                int(a["index_type_id"]),
                int(a["nr_elems"]),
            ), where
        elif raw.kind in ("STRUCT", "UNION"):
            assert t.size == int(a["size"]) and t.vlen == int(a["vlen"]), where
            got = [(m.name or "(anon)", m.type_id, m.bit_offset, m.bit_size) for m in t.members]
            want = [
                (n, int(m["type_id"]), int(m["bits_offset"]), int(m.get("bitfield_size", 0)))
                for n, m in raw.members
            ]
            assert got == want, where
        elif raw.kind in ("ENUM", "ENUM64"):
            assert t.size == int(a["size"]), where
            got = [(v.name, v.value) for v in t.values]
            want = [(n, int(re.sub(r"U?LL$", "", m["val"]))) for n, m in raw.members]
            assert got == want, where
        elif raw.kind == "FUNC_PROTO":
            assert t.type_id == int(a["ret_type_id"]), where
            assert [p.type_id for p in t.params] == [int(m["type_id"]) for _, m in raw.members]
        elif raw.kind == "DATASEC":
            got = [(s.type_id, s.offset, s.size) for s in t.secinfos]
            want = [(int(m["type_id"]), int(m["offset"]), int(m["size"])) for _, m in raw.members]
            assert got == want, where
        elif raw.kind == "FLOAT":
            assert t.size == int(a["size"]), where


@needs_vmlinux
@needs_bpftool
@pytest.mark.parametrize("path", PATHS)
def test_field_paths_match_bpftool(btf: BTF, oracle: dict[int, RawType], path: str) -> None:
    walker = _walker(oracle)
    try:
        bits, bsize, tid = walker.resolve(path)
    except (KeyError, StopIteration, AssertionError):
        pytest.skip(f"{path} does not exist on this kernel")
    loc = btf.resolve(path)
    assert loc.bit_offset == bits
    assert loc.bit_size == bsize
    assert loc.type_id == tid
    if loc.is_bitfield:
        # The load window must contain the whole field and be naturally aligned.
        assert loc.offset % loc.size == 0
        assert loc.offset * 8 <= bits and bits + bsize <= (loc.offset + loc.size) * 8
    else:
        assert loc.offset * 8 == bits and loc.size * 8 == bsize


_WALKER: dict[int, OracleWalker] = {}


def _walker(oracle: dict[int, RawType]) -> OracleWalker:
    key = id(oracle)
    if key not in _WALKER:
        _WALKER[key] = OracleWalker(oracle)
    return _WALKER[key]


@needs_vmlinux
@needs_bpftool
def test_anonymous_members_are_really_anonymous(btf: BTF, oracle: dict[int, RawType]) -> None:
    """skc_daddr must only be reachable through an anonymous member, or the test is moot."""
    common = btf.type_by_name("sock_common", Kind.STRUCT)
    assert "skc_daddr" not in [m.name for m in common.members]
    assert (
        btf.resolve("sock_common.skc_daddr").offset
        == btf.resolve("sock.__sk_common.skc_daddr").offset
    )


@needs_vmlinux
@needs_bpftool
def test_sizeof_matches_bpftool(btf: BTF, oracle: dict[int, RawType]) -> None:
    walker = _walker(oracle)
    for name in [
        "task_struct",
        "sock",
        "sock_common",
        "socket",
        "file",
        "fdtable",
        "net",
        "nsproxy",
        "inode",
        "socket_alloc",
        "u32",
        "__be16",
        "pid_t",
    ]:
        want = walker.size(
            next(
                t.id
                for t in walker.by_name[name]
                if t.kind in ("STRUCT", "UNION", "TYPEDEF", "INT")
            )
        )
        assert btf.sizeof(name) == want, name
    assert btf.sizeof("struct sock") == btf.sizeof("sock")


@needs_vmlinux
@needs_bpftool
def test_enum_values_match_bpftool(btf: BTF, oracle: dict[int, RawType]) -> None:
    walker = _walker(oracle)
    enum = next(t for t in walker.by_name["bpf_func_id"] if t.kind == "ENUM")
    vals = {n: int(a["val"]) for n, a in enum.members}
    for name in [
        "BPF_FUNC_probe_read_kernel",
        "BPF_FUNC_get_current_task",
        "BPF_FUNC_perf_event_output",
        "BPF_FUNC_ringbuf_output",
        "BPF_FUNC_map_lookup_elem",
    ]:
        assert btf.enum_value("bpf_func_id", name) == vals[name]
    assert btf.enum_value(None, "BPF_FUNC_map_lookup_elem") == vals["BPF_FUNC_map_lookup_elem"]
    assert btf.type_by_name("bpf_func_id", "enum").vlen == len(vals)


@needs_vmlinux
def test_bad_paths_give_clear_errors(btf: BTF) -> None:
    with pytest.raises(BTFError, match=r"task_struct has no member 'nspxy'"):
        btf.resolve("task_struct.nspxy")
    with pytest.raises(BTFError, match=r"no type 'no_such_struct_xyz'"):
        btf.resolve("no_such_struct_xyz.a")
    with pytest.raises(BTFError, match=r"resolve 'nsproxy.net_ns' from the pointee"):
        btf.resolve("task_struct.nsproxy.net_ns")
    with pytest.raises(BTFError, match=r"expected 'type.member"):
        btf.resolve("task_struct")
    with pytest.raises(BTFError, match=r"enum bpf_func_id has no member 'BPF_FUNC_nope'"):
        btf.enum_value("bpf_func_id", "BPF_FUNC_nope")
    with pytest.raises(BTFError, match=r"no enum 'task_struct'"):
        btf.enum_value("task_struct", "x")
    with pytest.raises(BTFError, match=r"no type struct 'bpf_func_id'"):
        btf.type_by_name("bpf_func_id", Kind.STRUCT)


@needs_vmlinux
def test_array_index_and_typenames(btf: BTF) -> None:
    comm = btf.resolve("task_struct.comm")
    assert btf.resolve("task_struct.comm[3]").offset == comm.offset + 3
    assert comm.type_name.startswith("char[")
    assert btf.resolve("fdtable.fd").type_name == "struct file **"
    with pytest.raises(BTFError, match="out of range"):
        btf.resolve(f"task_struct.comm[{comm.size}]")


# --------------------------------------------------------------------------- synthetic blobs


def _blob(types: list[bytes], strings: bytes) -> bytes:
    tsec = b"".join(types)
    return struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(tsec), len(tsec), len(strings)) + (
        tsec + strings
    )


def _t(name_off: int, kind: int, vlen: int, size_or_type: int, kflag: int = 0) -> bytes:
    return struct.pack("<III", name_off, (kflag << 31) | (kind << 24) | vlen, size_or_type)


def test_synthetic_bitfields_and_split_btf() -> None:
    strings = b"\0int\0s\0a\0b\0c\0E\0X\0Y\0"
    off = {
        n: strings.index(b"\0" + n.encode() + b"\0") + 1
        for n in ["int", "s", "a", "b", "c", "E", "X", "Y"]
    }
    types = [
        _t(off["int"], 1, 0, 4) + struct.pack("<I", (1 << 24) | 32),  # [1] signed int
        # [2] struct s { int a:3; int b:7; int c; } with kind_flag bitfield encoding
        _t(off["s"], 4, 3, 8, kflag=1)
        + struct.pack("<III", off["a"], 1, (3 << 24) | 0)
        + struct.pack("<III", off["b"], 1, (7 << 24) | 3)
        + struct.pack("<III", off["c"], 1, 32),
        # [3] enum E { X = -1, Y = 5 } (signed)
        _t(off["E"], 6, 2, 4, kflag=1)
        + struct.pack("<Ii", off["X"], -1)
        + struct.pack("<Ii", off["Y"], 5),
    ]
    base = BTF(_blob(types, strings), name="base")
    b = base.resolve("s.b")
    assert (b.is_bitfield, b.bit_offset, b.bit_size, b.offset, b.size) == (True, 3, 7, 0, 4)
    raw = (-5 & 0x7F) << 3 | 0b101  # b = -5, a = -3
    assert b.extract(raw) == -5
    assert base.resolve("s.a").extract(raw) == -3
    assert base.resolve("s.c").offset == 4
    assert base.enum_value("E", "X") == -1

    # Split BTF: ids continue at 4, strings continue after the base's.
    split_str = b"\0t\0"
    split_types = [_t(len(strings) + 1, 8, 0, 2)]  # [4] typedef struct s t
    split = BTF(_blob(split_types, split_str), base=base, name="split")
    assert split.type_by_name("t").id == 4
    assert split.resolve("t.c").offset == 4
    assert split.type_by_name("s").id == 2
    assert split.sizeof("t") == 8


def test_malformed_blobs() -> None:
    with pytest.raises(BTFError, match="bad BTF magic"):
        BTF(b"\0" * 32, name="junk")
    with pytest.raises(BTFError, match="too short"):
        BTF(b"\x9f\xeb", name="tiny")
    good = _blob([_t(0, 2, 0, 0)], b"\0")
    with pytest.raises(BTFError, match="out of bounds"):
        BTF(good[:-3], name="cut")
    with pytest.raises(BTFError, match="unknown BTF kind 31"):
        BTF(_blob([_t(0, 31, 0, 0)], b"\0"), name="future")
