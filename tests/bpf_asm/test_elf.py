"""bpf_asm.elf: clang-compiled objects read correctly; written objects read by LLVM tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bpf_asm import isa
from bpf_asm.elf import ElfError, ElfMap, ElfProgram, read_elf, write_elf
from bpf_asm.isa import R1
from bpf_asm.text import assemble

CLANG = shutil.which("clang-19")
OBJDUMP = shutil.which("llvm-objdump-19")
READELF = shutil.which("llvm-readelf-19")
needs_llvm = pytest.mark.skipif(not (OBJDUMP and READELF),
                                reason="llvm-objdump-19/llvm-readelf-19 not installed (oracle)")
needs_clang = pytest.mark.skipif(not (CLANG and OBJDUMP and READELF),
                                 reason="clang-19 and llvm-19 tools not installed")

# No libbpf headers here: the few macros a BPF C program needs are spelled out.
C_SOURCE = r"""
#define SEC(n) __attribute__((section(n), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
typedef unsigned int u32; typedef unsigned long long u64;
struct bpf_map_def { u32 type, key_size, value_size, max_entries, map_flags; };
struct rec { u64 pid; u32 fd; u32 kind; char comm[16]; };
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *) 1;
static u64 (*bpf_get_current_pid_tgid)(void) = (void *) 14;
static long (*bpf_perf_event_output)(void *ctx, void *map, u64 flags, void *data, u64 size)
    = (void *) 25;

struct { __uint(type, 1); __uint(max_entries, 64); __type(key, u32); __type(value, u64); }
    counts SEC(".maps");
struct { __uint(type, 4); __uint(key_size, 4); __uint(value_size, 4); } events SEC(".maps");
struct { __uint(type, 5); __uint(max_entries, 32); __uint(map_flags, 1);
         __type(key, u64); __type(value, struct rec); } recs SEC(".maps");
struct bpf_map_def SEC("maps") legacy = {
    .type = 2, .key_size = 4, .value_size = 16, .max_entries = 8, .map_flags = 0 };

static __attribute__((noinline)) int triple(int x) { return x * 3; }

SEC("tracepoint/syscalls/sys_enter_getpid") int on_getpid(void *ctx) {
    u32 k = bpf_get_current_pid_tgid();
    u64 *v = bpf_map_lookup_elem(&counts, &k);
    if (v) __sync_fetch_and_add(v, 1);
    void *l = bpf_map_lookup_elem(&legacy, &k);
    struct rec r = { .pid = k };
    bpf_perf_event_output(ctx, &events, 0xffffffffULL, &r, sizeof(r));
    return l ? triple(k) : 0;
}
SEC("tracepoint/syscalls/sys_enter_close") int on_close(void *ctx) {
    u64 key = 0;
    return bpf_map_lookup_elem(&recs, &key) != 0;
}
char _license[] SEC("license") = "Dual MIT/GPL";
"""

DATA_SOURCE = r"""
#define SEC(n) __attribute__((section(n), used))
static const volatile int limit = 7;
int hits = 0;
SEC("socket") int prog(void *ctx) { hits += 1; return limit; }
char _license[] SEC("license") = "GPL";
"""


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def clang_obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (CLANG and OBJDUMP and READELF):
        pytest.skip("clang-19 and llvm-19 tools not installed")
    tmp = tmp_path_factory.mktemp("clang")
    (tmp / "prog.c").write_text(C_SOURCE)
    run(CLANG, "-target", "bpf", "-O2", "-g", "-c", str(tmp / "prog.c"), "-o",
        str(tmp / "prog.o"))
    return tmp / "prog.o"


def objdump_programs(path: Path) -> dict[str, tuple[str, list[str], dict[int, str]]]:
    """function name -> (section, instruction lines, {slot: relocated symbol})."""
    out = run(OBJDUMP, "-d", "-r", "--mcpu=v4", "--no-print-imm-hex", "--no-show-raw-insn",
              str(path))
    progs: dict[str, tuple[str, list[str], dict[int, str]]] = {}
    section = ""
    current: tuple[str, list[str], dict[int, str]] | None = None
    for line in out.splitlines():
        if m := re.match(r"Disassembly of section (.*):", line):
            section = m[1]
        elif m := re.match(r"[0-9a-f]+ <(.*)>:", line):
            current = progs[m[1]] = (section, [], {})
        elif current and (m := re.match(r"\s*([0-9a-f]+):\s+R_BPF_\w+\s+(\S+)", line)):
            current[2][int(m[1], 16) // 8] = m[2]
        elif current and (m := re.match(r"\s*(\d+):\s+(.*)", line)):
            current[1].append(" ".join(re.sub(r"\s*<[^<>]*>$", "", m[2]).split()))
    return progs


@needs_clang
def test_programs_sections_and_license_match_llvm(clang_obj: Path) -> None:
    obj = read_elf(clang_obj)
    symbols = run(READELF, "-s", "-W", str(clang_obj))
    funcs = set(re.findall(r"FUNC\s+GLOBAL\s+\S+\s+\d+\s+(\S+)", symbols))
    assert {p.name for p in obj.programs} == funcs == {"on_getpid", "on_close"}
    dumped = objdump_programs(clang_obj)
    for prog in obj.programs:
        assert prog.section == dumped[prog.name][0]
    lic = run(READELF, "-x", "license", str(clang_obj))
    hexdump = "".join(re.findall(r"0x[0-9a-f]+ ((?:[0-9a-f]{8} ?)+)", lic)).replace(" ", "")
    assert obj.license == bytes.fromhex(hexdump).rstrip(b"\0").decode() == "Dual MIT/GPL"


@needs_clang
def test_instructions_and_map_relocations_match_objdump(clang_obj: Path) -> None:
    obj = read_elf(clang_obj)
    dumped = objdump_programs(clang_obj)
    for prog in obj.programs:
        _, lines, relocs = dumped[prog.name]
        maps_relocs = {s: n for s, n in relocs.items() if not n.startswith(".text")}
        assert prog.insns.map_refs == maps_relocs
        ours = [" ".join(line.split()) for line in str(prog.insns).splitlines()]
        for slot, mine, theirs in zip(prog.insns.slot_indices(), ours, lines, strict=False):
            if slot in maps_relocs:
                reg = theirs.split()[0]
                assert (mine, theirs) == (f"{reg} = {maps_relocs[slot]} ll", f"{reg} = 0 ll")
            elif slot in relocs:  # call into .text: objdump shows `call -1` + relocation
                assert mine.startswith("call pc+") and theirs == "call -1"
            else:
                assert mine == theirs
    assert "on_getpid" in dumped and set(obj.program("on_getpid").insns.map_refs.values()) == {
        "counts", "legacy", "events"}


@needs_clang
def test_subprogram_from_text_is_appended_and_called(clang_obj: Path) -> None:
    prog = read_elf(clang_obj).program("on_getpid")
    text = objdump_programs(clang_obj)["triple"][1]
    assert [str(i) for i in prog.insns[-len(text):]] == text
    (call_index,) = [i for i, insn in enumerate(prog.insns) if insn.src == 1 and
                     insn.code == isa.BPF_JMP | isa.BPF_CALL]
    slots = prog.insns.slot_indices()
    target = slots[call_index] + 1 + prog.insns[call_index].imm
    assert target == slots[len(prog.insns) - len(text)]


@needs_clang
def test_maps_legacy_and_btf_defined(clang_obj: Path) -> None:
    maps = read_elf(clang_obj).maps
    # values as written in C_SOURCE; struct rec is 8 + 4 + 4 + 16 bytes
    assert maps["legacy"] == ElfMap("legacy", 2, 4, 16, 8, 0, "maps")
    assert maps["counts"] == ElfMap("counts", 1, 4, 8, 64, 0, ".maps")
    assert maps["events"] == ElfMap("events", 4, 4, 4, None, 0, ".maps")
    assert maps["recs"] == ElfMap("recs", 5, 8, 32, 32, 1, ".maps")
    assert maps["events"].type_name == "perf_event_array"
    symbols = run(READELF, "-s", "-W", str(clang_obj))
    assert set(maps) == set(re.findall(r"OBJECT\s+GLOBAL\s+\S+\s+\d+\s+(counts|events|recs|"
                                       r"legacy)\b", symbols))


@needs_clang
def test_global_data_becomes_map_value_reference(tmp_path: Path) -> None:
    (tmp_path / "d.c").write_text(DATA_SOURCE)
    run(CLANG, "-target", "bpf", "-O2", "-c", str(tmp_path / "d.c"), "-o",
        str(tmp_path / "d.o"))
    prog = read_elf(tmp_path / "d.o").program("prog")
    relocs = objdump_programs(tmp_path / "d.o")["prog"][2]
    assert set(prog.insns.map_refs.values()) <= {".rodata", ".data", ".bss"}
    assert set(prog.insns.map_refs) == set(relocs)
    for slot in prog.insns.map_refs:
        insn = prog.insns[prog.insns.slot_indices().index(slot)]
        assert insn.src == isa.BPF_PSEUDO_MAP_VALUE


@needs_clang
def test_clang_object_survives_write_and_read(clang_obj: Path, tmp_path: Path) -> None:
    obj = read_elf(clang_obj)
    again = read_elf(write_elf(obj.programs, obj.maps.values(), obj.license))
    assert again.license == obj.license
    assert [(p.name, p.section, p.insns, p.insns.map_refs) for p in again.programs] == [
        (p.name, p.section, p.insns, p.insns.map_refs) for p in obj.programs]
    for name, spec in obj.maps.items():
        got = again.maps[name]
        assert (got.type, got.key_size, got.value_size, got.max_entries or None, got.flags) == (
            spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)


PROGRAM = """
    r6 = r1
    r1 = counts ll
    r2 = r10
    r2 += -8
    *(u64 *)(r10 - 8) = 0
    call bpf_map_lookup_elem
    if r0 == 0 goto out
    lock *(u64 *)(r0 + 0) += r6
    r1 = events ll
    call sub
out:
    r0 = 0
    exit
sub:
    w0 = 1
    exit
"""


@needs_llvm
def test_written_object_reads_back_in_llvm_objdump(tmp_path: Path) -> None:
    insns = assemble(PROGRAM)
    maps = [{"name": "counts", "type": "hash", "key_size": 8, "value_size": 8,
             "max_entries": 16}, ElfMap("events", 4, 4, 4, 0)]
    path = tmp_path / "w.o"
    path.write_bytes(write_elf(insns, maps, "GPL", section="tracepoint/x/y", name="demo"))
    dumped = objdump_programs(path)
    section, lines, relocs = dumped["demo"]
    assert section == "tracepoint/x/y"
    assert relocs == insns.map_refs == {1: "counts", 9: "events"}
    for slot, insn, line in zip(insns.slot_indices(), insns, lines, strict=True):
        if slot in relocs:
            assert line == f"r{insn.dst} = 0 ll"
        elif insn.src == isa.BPF_PSEUDO_CALL and insn.code == isa.BPF_JMP | isa.BPF_CALL:
            assert line == f"call {insn.imm}"  # objdump does not mark local calls
        else:
            assert line == str(insn)
    # the objdump listing with its relocations assembles back to the same program
    full = run(OBJDUMP, "-d", "-r", "--mcpu=v4", str(path))
    back = assemble(full)
    assert back.map_refs == insns.map_refs
    symbols = run(READELF, "-s", "-W", str(path))
    assert re.search(r"FUNC\s+GLOBAL\s+\S+\s+\d+\s+demo$", symbols, re.M)
    assert re.search(r"OBJECT\s+GLOBAL\s+\S+\s+\d+\s+counts$", symbols, re.M)
    obj = read_elf(path)
    assert obj.license == "GPL" and obj.program("demo").insns == insns
    assert obj.maps["counts"] == ElfMap("counts", 1, 8, 8, 16, 0, "maps")


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match="<bytes>: not a readable ELF object"):
        read_elf(b"not an elf at all")
    host = Path("/bin/true").resolve()
    with pytest.raises(ElfError, match="not a little-endian 64-bit BPF object"):
        read_elf(host)
    insns = assemble("r1 = nomap ll\nexit")
    with pytest.raises(ElfError, match="uses map 'nomap'"):
        write_elf(insns, [])
    with pytest.raises(ElfError, match="needs a name"):
        write_elf(assemble("exit"), [{"type": 1}])
    obj = read_elf(write_elf(assemble("r0 = 0\nexit")))
    with pytest.raises(ElfError, match=r"no program 'x' in the object \(programs: prog\)"):
        obj.program("x")
    value = isa.ld_map_value(R1, 0, 8)
    from bpf_asm.isa import Instructions
    with pytest.raises(ElfError, match="only map fd loads"):
        write_elf([ElfProgram("p", "s", Instructions([value, isa.exit_()], {0: "m"}))],
                  [{"name": "m", "type": 2, "key_size": 4, "value_size": 8, "max_entries": 1}])


@pytest.mark.root
@needs_clang
def test_clang_object_loads_into_the_kernel(clang_obj: Path) -> None:
    """The read program, with maps created from the read specs, passes the verifier."""
    maps_mod = pytest.importorskip("bpf_asm.maps")
    programs_mod = pytest.importorskip("bpf_asm.programs")
    obj = read_elf(clang_obj)
    made = {name: maps_mod.Map.create(spec.type, spec.key_size, spec.value_size,
                                      spec.max_entries, name=name, flags=spec.flags)
            for name, spec in obj.maps.items()}
    try:
        for prog in obj.programs:
            insns = prog.insns.with_maps(made)
            with programs_mod.load_program(insns, "tracepoint", name=prog.name[:15],
                                           license=obj.license) as loaded:
                assert loaded.fd >= 0
    finally:
        for m in made.values():
            m.close()
