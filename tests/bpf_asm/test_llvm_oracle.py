"""Encoding and disassembly checked against LLVM 19 (llvm-mc / llvm-objdump, oracles only).

Every instruction form is written three ways -- LLVM text for llvm-mc, the same text for
our assembler, and Builder calls -- and all three must give llvm-mc's bytes; our `str()` of
those bytes must equal what `llvm-objdump -d --mcpu=v4 --no-print-imm-hex` prints.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from bpf_insn_strategies import llvm_forms
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpf_asm.builder import Builder
from bpf_asm.isa import R0, R1, R2, R3, R10, Instruction, Instructions, decode
from bpf_asm.text import assemble

LLVM_MC = shutil.which("llvm-mc-19")
OBJDUMP = shutil.which("llvm-objdump-19")
pytestmark = pytest.mark.skipif(not (LLVM_MC and OBJDUMP),
                                reason="llvm-mc-19/llvm-objdump-19 not installed (oracle)")

B = Builder
CASES: list[tuple[str, Callable[[Builder], object]]] = [
    # ALU64 / ALU32, immediate and register forms
    ("r1 = 5", lambda b: b.mov64(R1, 5)),
    ("r1 = -7", lambda b: b.mov64(R1, -7)),
    ("r1 = r2", lambda b: b.mov64(R1, R2)),
    ("w1 = 5", lambda b: b.mov32(R1, 5)),
    ("w1 = w2", lambda b: b.mov32(R1, R2)),
    ("r1 += 5", lambda b: b.add64(R1, 5)),
    ("r1 += r2", lambda b: b.add64(R1, R2)),
    ("w1 += w2", lambda b: b.add32(R1, R2)),
    ("r1 -= 3", lambda b: b.sub64(R1, 3)),
    ("w1 -= w3", lambda b: b.sub32(R1, R3)),
    ("r1 *= r2", lambda b: b.mul64(R1, R2)),
    ("w1 *= 9", lambda b: b.mul32(R1, 9)),
    ("r1 /= r2", lambda b: b.div64(R1, R2)),
    ("w1 /= 4", lambda b: b.div32(R1, 4)),
    ("r1 s/= r2", lambda b: b.sdiv64(R1, R2)),
    ("w1 s/= 3", lambda b: b.sdiv32(R1, 3)),
    ("r1 |= r2", lambda b: b.or64(R1, R2)),
    ("w1 |= 1", lambda b: b.or32(R1, 1)),
    ("r1 &= 255", lambda b: b.and64(R1, 255)),
    ("w1 &= w2", lambda b: b.and32(R1, R2)),
    ("r1 <<= r2", lambda b: b.lsh64(R1, R2)),
    ("w1 <<= 4", lambda b: b.lsh32(R1, 4)),
    ("r1 >>= 3", lambda b: b.rsh64(R1, 3)),
    ("w1 >>= w2", lambda b: b.rsh32(R1, R2)),
    ("r1 s>>= 3", lambda b: b.arsh64(R1, 3)),
    ("w1 s>>= w3", lambda b: b.arsh32(R1, R3)),
    ("r1 = -r1", lambda b: b.neg64(R1)),
    ("w1 = -w1", lambda b: b.neg32(R1)),
    ("r1 %= r2", lambda b: b.mod64(R1, R2)),
    ("w1 %= 7", lambda b: b.mod32(R1, 7)),
    ("r1 s%= r2", lambda b: b.smod64(R1, R2)),
    ("w1 s%= 7", lambda b: b.smod32(R1, 7)),
    ("r1 ^= r2", lambda b: b.xor64(R1, R2)),
    ("w1 ^= -1", lambda b: b.xor32(R1, -1)),
    ("r1 = (s8)r2", lambda b: b.movsx64(R1, R2, 8)),
    ("r1 = (s16)r2", lambda b: b.movsx64(R1, R2, 16)),
    ("r1 = (s32)r2", lambda b: b.movsx64(R1, R2, 32)),
    ("w1 = (s8)w2", lambda b: b.movsx32(R1, R2, 8)),
    ("w1 = (s16)w2", lambda b: b.movsx32(R1, R2, 16)),
    ("r1 = be16 r1", lambda b: b.be(R1, 16)),
    ("r1 = be32 r1", lambda b: b.be(R1, 32)),
    ("r1 = be64 r1", lambda b: b.be(R1, 64)),
    ("r1 = le16 r1", lambda b: b.le(R1, 16)),
    ("r1 = le32 r1", lambda b: b.le(R1, 32)),
    ("r1 = le64 r1", lambda b: b.le(R1, 64)),
    ("r1 = bswap16 r1", lambda b: b.bswap(R1, 16)),
    ("r1 = bswap32 r1", lambda b: b.bswap(R1, 32)),
    ("r1 = bswap64 r1", lambda b: b.bswap(R1, 64)),
    # JMP / JMP32
    ("goto +1", lambda b: b.ja(1)),
    ("goto -2", lambda b: b.ja(-2)),
    ("gotol +7", lambda b: b.gotol(7)),
    ("gotol -3", lambda b: b.gotol(-3)),
    ("if r1 == 5 goto +1", lambda b: b.jeq(R1, 5, 1)),
    ("if r1 == r2 goto +1", lambda b: b.jeq(R1, R2, 1)),
    ("if r1 != 5 goto +1", lambda b: b.jne(R1, 5, 1)),
    ("if r1 > 5 goto +1", lambda b: b.jgt(R1, 5, 1)),
    ("if r1 >= r2 goto +1", lambda b: b.jge(R1, R2, 1)),
    ("if r1 < 5 goto +1", lambda b: b.jlt(R1, 5, 1)),
    ("if r1 <= r2 goto -1", lambda b: b.jle(R1, R2, -1)),
    ("if r1 & 8 goto +1", lambda b: b.jset(R1, 8, 1)),
    ("if r1 s> -5 goto +1", lambda b: b.jsgt(R1, -5, 1)),
    ("if r1 s>= r2 goto +1", lambda b: b.jsge(R1, R2, 1)),
    ("if r1 s< 5 goto +1", lambda b: b.jslt(R1, 5, 1)),
    ("if r1 s<= r2 goto +1", lambda b: b.jsle(R1, R2, 1)),
    ("if w1 == 5 goto +1", lambda b: b.jcond32("jeq", R1, 5, 1)),
    ("if w1 != w2 goto +1", lambda b: b.jcond32("jne", R1, R2, 1)),
    ("if w1 > 5 goto +1", lambda b: b.jcond32("jgt", R1, 5, 1)),
    ("if w1 >= w2 goto +1", lambda b: b.jcond32("jge", R1, R2, 1)),
    ("if w1 < 5 goto +1", lambda b: b.jcond32("jlt", R1, 5, 1)),
    ("if w1 <= w2 goto +1", lambda b: b.jcond32("jle", R1, R2, 1)),
    ("if w1 & 1 goto +1", lambda b: b.jcond32("jset", R1, 1, 1)),
    ("if w1 s> w2 goto +1", lambda b: b.jcond32("jsgt", R1, R2, 1)),
    ("if w1 s>= -1 goto +1", lambda b: b.jcond32("jsge", R1, -1, 1)),
    ("if w1 s< w2 goto +1", lambda b: b.jcond32("jslt", R1, R2, 1)),
    ("if w1 s<= 5 goto +1", lambda b: b.jcond32("jsle", R1, 5, 1)),
    ("call 14", lambda b: b.call(14)),
    ("exit", lambda b: b.exit()),
    # 64-bit immediate
    ("r1 = 78187493520 ll", lambda b: b.ld_imm64(R1, 0x1234567890)),
    ("r1 = -1 ll", lambda b: b.ld_imm64(R1, 2**64 - 1)),
    ("r2 = -9223372036854775808 ll", lambda b: b.ld_imm64(R2, -(2**63))),
    # loads and stores
    ("w1 = *(u8 *)(r2 + 8)", lambda b: b.ldxb(R1, R2, 8)),
    ("w1 = *(u16 *)(r2 - 8)", lambda b: b.ldxh(R1, R2, -8)),
    ("w1 = *(u32 *)(r2 + 32767)", lambda b: b.ldxw(R1, R2, 32767)),
    ("r1 = *(u64 *)(r2 - 32768)", lambda b: b.ldxdw(R1, R2, -32768)),
    ("r1 = *(s8 *)(r2 + 0)", lambda b: b.ldsx(8, R1, R2)),
    ("r1 = *(s16 *)(r2 + 2)", lambda b: b.ldsx(16, R1, R2, 2)),
    ("r1 = *(s32 *)(r2 + 4)", lambda b: b.ldsx(32, R1, R2, 4)),
    ("*(u8 *)(r10 - 1) = w1", lambda b: b.stxb(R10, R1, -1)),
    ("*(u16 *)(r10 - 2) = w1", lambda b: b.stxh(R10, R1, -2)),
    ("*(u32 *)(r10 - 4) = w1", lambda b: b.stxw(R10, R1, -4)),
    ("*(u64 *)(r10 - 8) = r1", lambda b: b.stxdw(R10, R1, -8)),
    ("*(u8 *)(r10 - 1) = 255", lambda b: b.st(8, R10, -1, 255)),
    ("*(u16 *)(r10 - 2) = 5", lambda b: b.st(16, R10, -2, 5)),
    ("*(u32 *)(r10 - 4) = -5", lambda b: b.st(32, R10, -4, -5)),
    ("*(u64 *)(r10 - 8) = 0", lambda b: b.st(64, R10, -8, 0)),
    # atomics, 64 and 32 bit
    ("lock *(u64 *)(r1 + 0) += r2", lambda b: b.atomic("add", 64, R1, R2)),
    ("lock *(u64 *)(r1 + 8) |= r2", lambda b: b.atomic("or", 64, R1, R2, 8)),
    ("lock *(u64 *)(r1 + 0) &= r2", lambda b: b.atomic("and", 64, R1, R2)),
    ("lock *(u64 *)(r1 - 8) ^= r2", lambda b: b.atomic("xor", 64, R1, R2, -8)),
    ("lock *(u32 *)(r1 + 0) += w2", lambda b: b.atomic("add", 32, R1, R2)),
    ("lock *(u32 *)(r1 + 0) |= w2", lambda b: b.atomic("or", 32, R1, R2)),
    ("lock *(u32 *)(r1 + 0) &= w2", lambda b: b.atomic("and", 32, R1, R2)),
    ("lock *(u32 *)(r1 + 0) ^= w2", lambda b: b.atomic("xor", 32, R1, R2)),
    ("r2 = atomic_fetch_add((u64 *)(r1 + 0), r2)",
     lambda b: b.atomic("add", 64, R1, R2, fetch=True)),
    ("r2 = atomic_fetch_or((u64 *)(r1 + 0), r2)",
     lambda b: b.atomic("or", 64, R1, R2, fetch=True)),
    ("r2 = atomic_fetch_and((u64 *)(r1 + 0), r2)",
     lambda b: b.atomic("and", 64, R1, R2, fetch=True)),
    ("r2 = atomic_fetch_xor((u64 *)(r1 + 0), r2)",
     lambda b: b.atomic("xor", 64, R1, R2, fetch=True)),
    ("w2 = atomic_fetch_add((u32 *)(r1 + 4), w2)",
     lambda b: b.atomic("add", 32, R1, R2, 4, fetch=True)),
    ("w2 = atomic_fetch_or((u32 *)(r1 + 0), w2)",
     lambda b: b.atomic("or", 32, R1, R2, fetch=True)),
    ("w2 = atomic_fetch_and((u32 *)(r1 + 0), w2)",
     lambda b: b.atomic("and", 32, R1, R2, fetch=True)),
    ("w2 = atomic_fetch_xor((u32 *)(r1 + 0), w2)",
     lambda b: b.atomic("xor", 32, R1, R2, fetch=True)),
    ("r2 = xchg_64(r1 + 0, r2)", lambda b: b.xchg(64, R1, R2)),
    ("w2 = xchg32_32(r1 + 8, w2)", lambda b: b.xchg(32, R1, R2, 8)),
    ("r0 = cmpxchg_64(r1 + 0, r0, r2)", lambda b: b.cmpxchg(64, R1, R2)),
    ("w0 = cmpxchg32_32(r1 - 4, w0, w2)", lambda b: b.cmpxchg(32, R1, R2, -4)),
]


def llvm_assemble(text: str, tmp: Path) -> bytes:
    """Assemble with llvm-mc and return the raw .text bytes."""
    src, obj = tmp / "in.s", tmp / "in.o"
    src.write_text(text)
    done = subprocess.run([LLVM_MC, "-triple", "bpf", "-mcpu=v4", "-filetype=obj", str(src),
                           "-o", str(obj)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"llvm-mc rejected:\n{done.stderr}")
    return text_section(obj)


def text_section(obj: Path) -> bytes:
    """The bytes of .text in an object file, extracted by llvm-objcopy."""
    out = obj.with_suffix(".bin")
    subprocess.run([shutil.which("llvm-objcopy-19") or "llvm-objcopy", "-O", "binary",
                    "--only-section=.text", str(obj), str(out)], check=True)
    return out.read_bytes()


def llvm_disassemble(raw: bytes, tmp: Path) -> list[str]:
    """Disassemble raw bytes with llvm-objdump: one normalised line per instruction."""
    lines = ", ".join(f"0x{b:02x}" for b in raw)
    src, obj = tmp / "raw.s", tmp / "raw.o"
    src.write_text(f".text\n.byte {lines}\n" if raw else ".text\n")
    subprocess.run([LLVM_MC, "-triple", "bpf", "-filetype=obj", str(src), "-o", str(obj)],
                   check=True, capture_output=True)
    out = subprocess.run([OBJDUMP, "-d", "--mcpu=v4", "--no-print-imm-hex",
                          "--no-show-raw-insn", "--no-leading-addr", str(obj)],
                         check=True, capture_output=True, text=True).stdout
    insns = []
    for line in out.splitlines():
        if not line.startswith("\t"):
            continue  # headers, symbol lines
        line = re.sub(r"\s*<[^<>]*>$", "", line)  # objdump's branch-target annotation
        insns.append(" ".join(line.split()))
    return insns


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """llvm-mc's encoding of every case, assembled in one run."""
    tmp = tmp_path_factory.mktemp("llvm")
    raw = llvm_assemble("\n".join(text for text, _ in CASES) + "\n", tmp)
    out, pos = {}, 0
    for text, _ in CASES:
        size = 16 if text.endswith(" ll") else 8
        out[text] = raw[pos:pos + size]
        pos += size
    assert pos == len(raw)
    return out


IDS = [text for text, _ in CASES]


@pytest.mark.parametrize("text, build", CASES, ids=IDS)
def test_text_assembler_encodes_like_llvm_mc(text: str, build, oracle) -> None:
    assert bytes(assemble(text)) == oracle[text]


@pytest.mark.parametrize("text, build", CASES, ids=IDS)
def test_builder_encodes_like_llvm_mc(text: str, build, oracle) -> None:
    b = Builder()
    build(b)
    assert bytes(b.build()) == oracle[text]


def test_every_form_disassembles_like_llvm_objdump(oracle, tmp_path: Path) -> None:
    raw = b"".join(oracle.values())
    expected = llvm_disassemble(raw, tmp_path)
    ours = [" ".join(str(insn).split()) for insn in decode(raw)]
    assert ours == expected


def test_helper_call_by_name_and_bpf_to_bpf_call(tmp_path: Path) -> None:
    src = "call 14\ncall func\nexit\nr0 = 1\nfunc:\nr0 = 2\nexit\n"
    raw = llvm_assemble(src, tmp_path)
    prog = assemble(src.replace("call 14", "call bpf_get_current_pid_tgid"))
    assert bytes(prog) == raw
    assert str(prog).splitlines()[1] == "call pc+2"  # bpftool's spelling; llvm has none
    b = Builder().call("get_current_pid_tgid").call_func("func").exit().mov64(R0, 1)
    b.label("func").mov64(R0, 2).exit()
    assert bytes(b.build()) == raw


def test_labels_resolve_like_llvm_mc(tmp_path: Path) -> None:
    src = ("start:\n r1 = 1 ll\n if r1 > 5 goto out\n gotol start\n"
           " goto start\nout:\n exit\n")
    assert bytes(assemble(src)) == llvm_assemble(src, tmp_path)


def test_map_load_relocation_matches_llvm(tmp_path: Path) -> None:
    """llvm-mc leaves `r1 = events ll` as imm 0 plus an R_BPF_64_64 relocation; we emit the
    loader's form (src=BPF_PSEUDO_MAP_FD, imm=fd) and record the slot in map_refs."""
    src = "r0 = 0\nr1 = events ll\nr2 = 3 ll\nr3 = other ll\nexit\n"
    (tmp_path / "m.s").write_text(src)
    subprocess.run([LLVM_MC, "-triple", "bpf", "-mcpu=v4", "-filetype=obj",
                    str(tmp_path / "m.s"), "-o", str(tmp_path / "m.o")], check=True)
    dump = subprocess.run([OBJDUMP, "-r", str(tmp_path / "m.o")], check=True,
                          capture_output=True, text=True).stdout
    relocs = {int(off, 16) // 8: name
              for off, name in re.findall(r"([0-9a-f]{16}) R_BPF_64_64\s+(\S+)", dump)}
    prog = assemble(src, maps={"events": 7, "other": 9})
    assert prog.map_refs == relocs == {1: "events", 5: "other"}
    llvm = decode(text_section(tmp_path / "m.o"))
    for ours, theirs, slot in zip(prog, llvm, prog.slot_indices(), strict=True):
        if slot in relocs:
            assert (ours.src, ours.imm) == (1, {"events": 7, "other": 9}[relocs[slot]])
            assert (ours.code, ours.dst) == (theirs.code, theirs.dst)
        else:
            assert ours == theirs


def test_objdump_output_assembles_back(tmp_path: Path) -> None:
    """Pasted `llvm-objdump -d -r` output (addresses, raw bytes, hex, relocations) assembles."""
    src = "\n".join(text for text, _ in CASES) + "\nr1 = events ll\ncall func\nfunc:\nexit\n"
    (tmp_path / "p.s").write_text(src)
    subprocess.run([LLVM_MC, "-triple", "bpf", "-mcpu=v4", "-filetype=obj",
                    str(tmp_path / "p.s"), "-o", str(tmp_path / "p.o")], check=True)
    dump = subprocess.run([OBJDUMP, "-d", "-r", "--mcpu=v4", str(tmp_path / "p.o")],
                          check=True, capture_output=True, text=True).stdout
    prog = assemble(dump)
    direct = assemble(src)
    # objdump prints a local BPF-to-BPF call as `call 1`, indistinguishable from a helper
    assert list(prog)[:-2] == list(direct)[:-2]
    assert prog.map_refs == direct.map_refs


settings_oracle = settings(max_examples=25, deadline=None,
                           suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow])


@settings_oracle
@given(st.lists(llvm_forms(), min_size=1, max_size=40))
def test_random_programs_disassemble_like_objdump(tmp_path: Path,
                                                  insns: list[Instruction]) -> None:
    prog = Instructions(insns)
    ours = [" ".join(str(insn).split()) for insn in prog]
    assert ours == llvm_disassemble(bytes(prog), tmp_path)


@settings_oracle
@given(st.lists(llvm_forms(), min_size=1, max_size=40))
def test_our_listing_is_valid_llvm_mc_input(tmp_path: Path, insns: list[Instruction]) -> None:
    prog = Instructions(insns)
    assert llvm_assemble(str(prog), tmp_path) == bytes(prog)
