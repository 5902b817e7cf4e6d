"""Maps against the real kernel, cross-checked with bpftool."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import rawprogs as rp

from bpf_asm.maps import BPF_F_RDONLY, Map, MapSpec
from bpf_asm.syscall import BPFError, MapType, possible_cpus

pytestmark = pytest.mark.root

NCPUS = len(possible_cpus())


no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind


def key32(i: int) -> bytes:
    return struct.pack("<I", i)


def test_hash_bytes_in_bytes_out(unique_name: str) -> None:
    with Map.create("hash", key_size=4, value_size=8, max_entries=8, name=unique_name) as m:
        assert m.get(key32(1)) is None and len(m) == 0
        m[key32(1)] = b"\x01" * 8
        m[key32(2)] = b"\x02" * 8
        assert m[key32(1)] == b"\x01" * 8
        assert sorted(m.keys()) == [key32(1), key32(2)]
        assert dict(m.items()) == {key32(1): b"\x01" * 8, key32(2): b"\x02" * 8}
        assert len(m) == 2 and key32(2) in m and key32(3) not in m
        del m[key32(1)]
        assert list(m) == [key32(2)]
        with pytest.raises(KeyError):
            m[key32(1)]
        with pytest.raises(KeyError):
            del m[key32(1)]
        m.clear()
        assert len(m) == 0


def test_update_flags_and_errors_name_the_map(unique_name: str) -> None:
    with Map.create("hash", key_size=4, value_size=4, max_entries=2, name=unique_name) as m:
        m.update(key32(1), key32(10), "noexist")
        with pytest.raises(BPFError) as info:
            m.update(key32(1), key32(11), "noexist")
        assert info.value.errno == errno.EEXIST
        assert f"BPF_MAP_UPDATE_ELEM on map '{unique_name}'" in str(info.value)
        with pytest.raises(BPFError) as info:
            m.update(key32(2), key32(12), "exist")
        assert info.value.errno == errno.ENOENT
        m.update(key32(1), key32(13), "exist")
        m[key32(2)] = key32(2)
        with pytest.raises(BPFError) as info:  # full
            m[key32(3)] = key32(3)
        assert info.value.errno == errno.E2BIG
        with pytest.raises(ValueError, match=f"map '{unique_name}' key: expected 4 bytes"):
            m[b"abc"] = key32(0)


def test_codecs_struct_and_ctypes(unique_name: str) -> None:
    class Value(ctypes.Structure):
        _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint32),
                    ("flags", ctypes.c_uint32)]

    with Map.create("hash", key_size=8, value_size=16, max_entries=4, name=unique_name,
                    key="<II", value=Value) as m:
        m[(1, 2)] = Value(5, 1500, 7)
        got = m[(1, 2)]
        assert (got.packets, got.bytes, got.flags) == (5, 1500, 7)
        assert list(m.keys()) == [(1, 2)]
        m[struct.pack("<II", 3, 4)] = bytes(Value(1, 2, 3))  # raw bytes always accepted
        assert m[(3, 4)].flags == 3
        with pytest.raises(ValueError, match=f"map '{unique_name}' key: cannot pack \\(1,\\)"):
            m[(1,)] = Value()
    with Map.create("array", value_size=8, max_entries=3, key="<I", value="<q") as arr:
        arr[1] = -5
        assert list(arr.items()) == [(0, 0), (1, -5), (2, 0)]
        assert len(arr) == 3
        with pytest.raises(BPFError) as info:
            arr[3] = 1
        assert info.value.errno == errno.E2BIG
    with pytest.raises(ValueError, match="codec is 4 bytes but the map's size is 8"):
        Map.create("array", value_size=8, max_entries=1, value="<I")


def test_percpu_values_are_lists_per_possible_cpu(unique_name: str) -> None:
    with Map.create("percpu_hash", key_size=4, value_size=4, max_entries=4, name=unique_name,
                    value="<I") as m:
        m[key32(1)] = list(range(100, 100 + NCPUS))
        assert m[key32(1)] == list(range(100, 100 + NCPUS))
        m[key32(2)] = 7  # one value for every CPU
        assert m[key32(2)] == [7] * NCPUS
        with pytest.raises(ValueError, match=f"needs {NCPUS} items"):
            m[key32(3)] = [1] * (NCPUS + 1)
    with Map.create("percpu_array", value_size=12, max_entries=2) as arr:
        vals = [bytes([i]) * 12 for i in range(NCPUS)]
        arr[key32(1)] = vals
        assert arr[key32(1)] == vals
        assert arr[key32(0)] == [bytes(12)] * NCPUS


def test_lru_hash_evicts_instead_of_failing(unique_name: str) -> None:
    with Map.create("lru_hash", key_size=4, value_size=4, max_entries=16, name=unique_name,
                    key="<I", value="<I") as m:
        for i in range(200):
            m[i] = i
        assert 0 < len(m) <= 200
        assert m[199] == 199  # the newest survives
        assert all(m[k] == k for k in m)


def test_lpm_trie_longest_prefix_match(unique_name: str) -> None:
    # key: u32 prefix length, then the address bytes (network order)
    with Map.create("lpm_trie", key_size=8, value_size=4, max_entries=16, name=unique_name,
                    value="<I") as m:
        def k(plen: int, a: str) -> bytes:
            return struct.pack("<I", plen) + bytes(int(x) for x in a.split("."))

        m[k(8, "10.0.0.0")] = 8
        m[k(24, "10.1.2.0")] = 24
        assert m[k(32, "10.1.2.3")] == 24
        assert m[k(32, "10.9.9.9")] == 8
        assert m.get(k(32, "11.0.0.1")) is None
        assert m.info().map_flags & 1  # BPF_F_NO_PREALLOC added for us


def test_defaults_for_perf_event_array_and_ringbuf(unique_name: str) -> None:
    with Map.create("perf_event_array", name=unique_name) as pe:
        assert (pe.key_size, pe.value_size, pe.max_entries) == (4, 4, NCPUS)
        assert pe.info().max_entries == NCPUS
    with Map.create("ringbuf", name=unique_name) as rb:
        assert rb.info().max_entries == 256 * 1024
    with pytest.raises(ValueError, match="power of two and a multiple of the page size"):
        Map.create("ringbuf", max_entries=3 * 4096, name=unique_name)


def test_queue_push_pop(unique_name: str) -> None:
    with Map.create("queue", value_size=4, max_entries=4, name=unique_name, value="<I") as q:
        q.push(1)
        q.push(2)
        assert q.pop() == 1 and q.pop() == 2
        with pytest.raises(KeyError, match="is empty"):
            q.pop()


def test_bad_specs_are_one_clear_error(unique_name: str) -> None:
    with pytest.raises(ValueError, match="unknown map type 'hashmap'"):
        Map.create("hashmap", key_size=4, value_size=4, max_entries=1)
    with pytest.raises(ValueError, match=f"map '{unique_name}': key_size is required"):
        Map.create("hash", value_size=4, max_entries=1, name=unique_name)
    with pytest.raises(BPFError) as info:  # the kernel refuses a zero-sized value
        Map.create("hash", key_size=4, value_size=0, max_entries=1, name=unique_name)
    assert f"BPF_MAP_CREATE hash map '{unique_name}'" in str(info.value)
    assert info.value.errno == errno.EINVAL


def test_bpftool_sees_name_shape_and_contents(unique_name: str) -> None:
    spec = MapSpec("hash", 4, 8, 32, unique_name, key="<I", value="<Q")
    with spec.create() as m:
        for i in range(5):
            m[i] = i * 1000 + 7
        info = m.info()
        assert info.name.decode() == unique_name and info.type == MapType.HASH
        shown = rp.bpftool("map", "show", "id", str(m.id))
        assert shown["name"] == unique_name and shown["type"] == "hash"
        assert (shown["bytes_key"], shown["bytes_value"], shown["max_entries"]) == (4, 8, 32)
        dumped = rp.bpftool("map", "dump", "id", str(m.id))
        seen = {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little"):
                int.from_bytes(bytes(int(b, 16) for b in e["value"]), "little") for e in dumped}
        assert seen == {i: i * 1000 + 7 for i in range(5)}
        map_id = m.id
        with Map.from_id(map_id, key="<I", value="<Q") as again:
            assert again.name == unique_name and again[3] == 3007
    assert rp.gone(unique_name, rp.kernel_map_names)  # closed: the kernel freed it


def test_pinned_map_survives_its_creator(unique_name: str) -> None:
    path = f"/sys/fs/bpf/{unique_name}"
    creator = textwrap.dedent(f"""
        from bpf_asm.maps import Map
        m = Map.create("hash", key_size=4, value_size=4, max_entries=8, name="{unique_name}",
                       key="<I", value="<I")
        for i in range(3):
            m[i] = i * i + 1
        m.pin("{path}")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", creator], check=True, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})
    try:
        with Map.open_pinned(path, key="<I", value="<I") as m:
            assert m.name == unique_name and m.type == MapType.HASH
            assert dict(m.items()) == {0: 1, 1: 2, 2: 5}
            m[7] = 50  # writable by default
        with Map.open_pinned(path, readonly=True, key="<I", value="<I") as ro:
            assert ro[7] == 50  # reading is allowed
            with pytest.raises(BPFError) as info:
                ro[1] = 99
            assert info.value.errno == errno.EPERM
            assert str(info.value) == (f"[Errno 1] BPF_MAP_UPDATE_ELEM on map '{unique_name}': "
                                       "Operation not permitted (the map fd was opened "
                                       "read-only)")
            with pytest.raises(BPFError, match="BPF_MAP_DELETE_ELEM.*read-only"):
                del ro[1]
        with Map.open_pinned(path) as m, Map.from_id(m.id, flags=BPF_F_RDONLY) as ro2, \
                pytest.raises(BPFError, match="Operation not permitted"):
            ro2[key32(1)] = key32(1)
    finally:
        os.unlink(path)
    assert rp.gone(unique_name, rp.kernel_map_names)


def test_pin_outside_bpffs_is_a_clear_error(unique_name: str, tmp_path) -> None:
    with Map.create("array", value_size=4, max_entries=1, name=unique_name) as m, \
            pytest.raises(ValueError, match=f"cannot pin map '{unique_name}' at {tmp_path}"):
        m.pin(str(tmp_path / "x"))
    with pytest.raises(BPFError, match=f"BPF_OBJ_GET /sys/fs/bpf/{unique_name}"):
        Map.open_pinned(f"/sys/fs/bpf/{unique_name}")


def test_frozen_map_refuses_user_writes(unique_name: str) -> None:
    with Map.create("array", value_size=4, max_entries=1, name=unique_name) as m:
        m[key32(0)] = key32(9)
        m.freeze()
        assert m[key32(0)] == key32(9)
        with pytest.raises(BPFError, match=f"BPF_MAP_UPDATE_ELEM on map '{unique_name}'") as e:
            m[key32(0)] = key32(1)
        assert e.value.errno == errno.EPERM


def test_mounts_bpffs_when_missing(unique_name: str) -> None:
    """In a private mount namespace without bpffs, pinning mounts it at /sys/fs/bpf."""
    script = textwrap.dedent(f"""
        import subprocess
        from bpf_asm.maps import Map
        subprocess.run(["umount", "-l", "/sys/fs/bpf"], capture_output=True)
        assert "bpf" not in [l.split()[2] for l in open("/proc/self/mounts")]
        with Map.create("array", value_size=4, max_entries=1, name="{unique_name}") as m:
            m.pin("/sys/fs/bpf/{unique_name}")
        mounts = [l.split() for l in open("/proc/self/mounts")]
        assert ["/sys/fs/bpf", "bpf"] in [l[1:3] for l in mounts], mounts
        with Map.open_pinned("/sys/fs/bpf/{unique_name}") as again:
            assert again.name == "{unique_name}"
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    # The namespace's bpffs (and the pin in it) went away with the namespace.
    assert not os.path.exists(f"/sys/fs/bpf/{unique_name}")


def test_closed_map_says_so(unique_name: str) -> None:
    m = Map.create("array", value_size=4, max_entries=1, name=unique_name)
    m.close()
    m.close()  # idempotent
    with pytest.raises(ValueError, match=f"map '{unique_name}' is closed"):
        m[key32(0)]
    assert "closed" in repr(m)


@pytest.mark.parametrize("kind", ["hash", "lru_hash", "array"])
def test_lookup_batch_reads_every_entry(unique_name: str, kind: str) -> None:
    n = 1000
    with Map.create(kind, key_size=4, value_size=8, max_entries=n + 24, name=unique_name,
                    key="<I", value="<Q") as m:
        if kind != "array":
            assert m.lookup_batch() == []
        for i in range(n):
            m[i] = i * 3
        got = m.lookup_batch(chunk=64)  # many calls, each resuming from the kernel's token
        expect = dict(m.items())
        assert len(got) == len(expect) == (n + 24 if kind == "array" else n)
        assert dict(got) == expect
        assert dict(m.lookup_batch(chunk=5000)) == expect  # one call
        # a chunk smaller than a hash bucket is grown, not an error
        assert dict(m.lookup_batch(chunk=1)) == expect
    with pytest.raises(ValueError, match="chunk"):
        m.lookup_batch(chunk=0)


def test_lookup_batch_per_cpu_values(unique_name: str) -> None:
    with Map.create("percpu_hash", key_size=4, value_size=4, max_entries=8, name=unique_name,
                    key="<I", value="<I") as m:
        m[1] = list(range(NCPUS))
        m[2] = 9
        assert dict(m.lookup_batch()) == {1: list(range(NCPUS)), 2: [9] * NCPUS}


def test_take_removes_and_returns_once(unique_name: str) -> None:
    with Map.create("lru_hash", key_size=4, value_size=8, max_entries=8, name=unique_name,
                    key="<I", value="<Q") as m:
        m[5] = 55
        assert m.take(5) == 55
        assert m.take(5) is None
        assert 5 not in m
