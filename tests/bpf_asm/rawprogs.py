"""Test-only raw eBPF encodings and the event programs the kernel tests share.

The kernel-side tests must not depend on the assembler under test elsewhere, so programs
here are written as raw encodings (8 bytes a slot) with a handful of tiny helpers.
"""

from __future__ import annotations

import struct

# Classes, sizes, modes, ops (see the kernel's Documentation/bpf/standardization).
LD, LDX, ST, STX, ALU, JMP, ALU64 = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x07
W, DW = 0x00, 0x18
MEM, ATOMIC, IMM = 0x60, 0xC0, 0x00
K, X = 0x00, 0x08
ADD, AND, RSH, MOV = 0x00, 0x50, 0x70, 0xB0
JA, JEQ, JNE, CALL, EXIT = 0x00, 0x10, 0x50, 0x80, 0x90
FETCH = 0x01
PSEUDO_MAP_FD = 1

# Helper ids.
MAP_LOOKUP_ELEM, GET_CURRENT_PID_TGID, PERF_EVENT_OUTPUT, RINGBUF_OUTPUT = 1, 14, 25, 130
RINGBUF_RESERVE, RINGBUF_SUBMIT, RINGBUF_DISCARD = 131, 132, 133
BPF_F_CURRENT_CPU = 0xFFFFFFFF


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def mov64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | MOV | K, dst, imm=imm)


def mov64_reg(dst: int, src: int) -> bytes:
    return insn(ALU64 | MOV | X, dst, src)


def mov32_imm(dst: int, imm: int) -> bytes:
    return insn(ALU | MOV | K, dst, imm=imm)


def add64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | ADD | K, dst, imm=imm)


def and64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | AND | K, dst, imm=imm)


def ja(off: int) -> bytes:
    return insn(JMP | JA, off=off)


def rsh64_imm(dst: int, imm: int) -> bytes:
    return insn(ALU64 | RSH | K, dst, imm=imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    return insn(LD | DW | IMM, dst, PSEUDO_MAP_FD, imm=fd) + insn(0)


def stx_dw(dst: int, src: int, off: int) -> bytes:
    return insn(STX | DW | MEM, dst, src, off)


def st_w(dst: int, off: int, imm: int) -> bytes:
    return insn(ST | W | MEM, dst, off=off, imm=imm)


def ldx_dw(dst: int, src: int, off: int) -> bytes:
    return insn(LDX | DW | MEM, dst, src, off)


def atomic_fetch_add_dw(dst: int, src: int, off: int) -> bytes:
    return insn(STX | DW | ATOMIC, dst, src, off, ADD | FETCH)


def jne_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(JMP | JNE | K, dst, off=off, imm=imm)


def jeq_imm(dst: int, imm: int, off: int) -> bytes:
    return insn(JMP | JEQ | K, dst, off=off, imm=imm)


def call(helper: int) -> bytes:
    return insn(JMP | CALL, imm=helper)


def exit_() -> bytes:
    return insn(JMP | EXIT)


def return_zero() -> bytes:
    return mov64_imm(0, 0) + exit_()


def _slots(code: bytes) -> int:
    return len(code) // 8


def event_program(counter_fd: int, out_fd: int, tgid: int, ringbuf: bool,
                  payload: int = 16) -> bytes:
    """A tracepoint program: for calls from process `tgid`, take seq = counter[0]++ and emit
    a `payload`-byte record (u64 seq, u64 pid_tgid, zero padding) to a perf event array or
    a ring buffer."""
    assert payload >= 16 and payload % 8 == 0
    body = b"".join([
        mov64_reg(6, 1),                    # r6 = ctx
        call(GET_CURRENT_PID_TGID),
        mov64_reg(7, 0),                    # r7 = pid_tgid
        rsh64_imm(0, 32),
    ])
    rest = b"".join([
        st_w(10, -4, 0),                    # key = 0
        mov64_reg(2, 10),
        add64_imm(2, -4),
        ld_map_fd(1, counter_fd),
        call(MAP_LOOKUP_ELEM),
    ])
    emit = [
        mov64_imm(1, 1),
        atomic_fetch_add_dw(0, 1, 0),       # r1 = counter[0]++ (old value)
    ]
    # record at r10 - 8 - payload: seq, pid_tgid, zeros
    base = -8 - payload
    emit.append(stx_dw(10, 1, base))
    emit.append(stx_dw(10, 7, base + 8))
    emit.append(mov64_imm(1, 0))
    emit.extend(stx_dw(10, 1, base + off) for off in range(16, payload, 8))
    if ringbuf:
        emit += [ld_map_fd(1, out_fd), mov64_reg(2, 10), add64_imm(2, base),
                 mov64_imm(3, payload), mov64_imm(4, 0), call(RINGBUF_OUTPUT)]
    else:
        emit += [mov64_reg(1, 6), ld_map_fd(2, out_fd), mov32_imm(3, -1),
                 mov64_reg(4, 10), add64_imm(4, base), mov64_imm(5, payload),
                 call(PERF_EVENT_OUTPUT)]
    emit_code = b"".join(emit)
    out = return_zero()
    # Jumps skip to `out`: after the filter, after the null check.
    null_check = jeq_imm(0, 0, _slots(emit_code))
    filt = jne_imm(0, tgid, _slots(rest) + 1 + _slots(emit_code))
    return body + filt + rest + null_check + emit_code + out


def reserve_discard_program(counter_fd: int, ring_fd: int, tgid: int) -> bytes:
    """For calls from `tgid`: seq = counter[0]++; reserve 8 bytes in the ring buffer, write
    seq, then submit it if seq is even and discard it if odd."""
    return b"".join([
        mov64_reg(6, 1),                    # 0
        call(GET_CURRENT_PID_TGID),         # 1
        rsh64_imm(0, 32),                   # 2
        jne_imm(0, tgid, 24),               # 3 -> 28
        st_w(10, -4, 0),                    # 4
        mov64_reg(2, 10),                   # 5
        add64_imm(2, -4),                   # 6
        ld_map_fd(1, counter_fd),           # 7-8
        call(MAP_LOOKUP_ELEM),              # 9
        jeq_imm(0, 0, 17),                  # 10 -> 28
        mov64_imm(1, 1),                    # 11
        atomic_fetch_add_dw(0, 1, 0),       # 12
        mov64_reg(7, 1),                    # 13: r7 = seq
        ld_map_fd(1, ring_fd),              # 14-15
        mov64_imm(2, 8),                    # 16
        mov64_imm(3, 0),                    # 17
        call(RINGBUF_RESERVE),              # 18
        jeq_imm(0, 0, 8),                   # 19 -> 28
        stx_dw(0, 7, 0),                    # 20
        mov64_reg(1, 0),                    # 21
        mov64_imm(2, 0),                    # 22
        and64_imm(7, 1),                    # 23
        jne_imm(7, 0, 2),                   # 24 -> 27
        call(RINGBUF_SUBMIT),               # 25
        ja(1),                              # 26 -> 28
        call(RINGBUF_DISCARD),              # 27
        return_zero(),                      # 28-29
    ])


def rejected_program() -> bytes:
    """Reads an uninitialised register: the verifier says 'R2 !read_ok'."""
    return mov64_reg(0, 2) + exit_()


# --- kernel-test utilities -------------------------------------------------------------------


def open_fds() -> int:
    """How many fds this process has open."""
    import os

    return len(os.listdir("/proc/self/fd"))


def bpftool(*args: str) -> object:
    """Run `bpftool -j ARGS` (the oracle) and return its parsed JSON."""
    import json
    import subprocess

    out = subprocess.run(["bpftool", "-j", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


def kernel_prog_names() -> list[str]:
    """Names of all programs loaded in the kernel, per bpftool."""
    return [p.get("name", "") for p in bpftool("prog", "show") or []]


def kernel_map_names() -> list[str]:
    """Names of all maps in the kernel, per bpftool."""
    return [m.get("name", "") for m in bpftool("map", "show") or []]


def gone(name: str, names=kernel_prog_names, timeout: float = 2.0) -> bool:
    """Whether no kernel object called `name` remains (waiting briefly: freeing can be
    deferred to an RCU callback)."""
    import time

    deadline = time.monotonic() + timeout
    while name in names():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _no_leaks_fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def no_leaks(unique_name: str):
        """Each test closes every fd it opens and leaves no program or map of its name."""
        before = open_fds()
        yield
        assert open_fds() == before, "file descriptors leaked"
        assert gone(unique_name), f"program {unique_name} still loaded"
        assert gone(unique_name, kernel_map_names), f"map {unique_name} still exists"

    return no_leaks


no_leaks = _no_leaks_fixture()
