"""The minimum public surface from issue 2, end to end on the real kernel: assemble LLVM text
against our maps, load, attach to a tracepoint, read the perf buffer, read a counter."""

from __future__ import annotations

import importlib
import os
import struct

import pytest
import rawprogs as rp

from bpf_asm import (
    Builder,
    Map,
    PerfBuffer,
    RingBuffer,
    assemble,
    attach_tracepoint,
    load_program,
)
from bpf_asm.isa import R0, R1, R2, R3, R4, R6, R7, R10

SURFACE = ["Map", "PerfBuffer", "assemble", "load_program", "attach_tracepoint"]

LLVM_TEXT = """
    r6 = r1
    call bpf_get_current_pid_tgid
    r7 = r0
    r0 >>= 32
    if r0 != {pid} goto out
    *(u32 *)(r10 - 4) = 1          ; key 1
    r2 = r10
    r2 += -4
    r1 = counts ll
    call bpf_map_lookup_elem
    if r0 == 0 goto out
    r1 = 1
    lock *(u64 *)(r0 + 0) += r1
    *(u64 *)(r10 - 16) = r7        ; the sample: pid_tgid
    r1 = r6
    r2 = events ll
    w3 = -1                        ; BPF_F_CURRENT_CPU
    r4 = r10
    r4 += -16
    r5 = 8
    call bpf_perf_event_output
out:
    r0 = 0
    exit
"""


def test_top_level_exports() -> None:
    """`from bpf_asm import Map, PerfBuffer, assemble, load_program, attach_tracepoint`."""
    package = importlib.import_module("bpf_asm")
    missing = [name for name in SURFACE if not hasattr(package, name)]
    assert not missing, f"bpf_asm/__init__.py does not export {missing}"


@pytest.mark.root
def test_issue_example_end_to_end(unique_name: str) -> None:
    before = rp.open_fds()
    me = os.getpid()  # before attaching: every later getpid() is counted
    counts = Map.create("hash", key_size=4, value_size=8, max_entries=64, name=unique_name)
    events = Map.create("perf_event_array", name=unique_name)
    counts[b"\x01\x00\x00\x00"] = bytes(8)
    insns = assemble(LLVM_TEXT.format(pid=me), maps={"counts": counts,
                                                               "events": events})
    assert len(bytes(insns)) % 8 == 0 and len(bytes(insns)) // 8 == 25
    prog = load_program(insns, prog_type="tracepoint", name=unique_name, license="GPL")
    link = attach_tracepoint(prog, "syscalls", "sys_enter_getpid")
    with PerfBuffer(events) as pb:
        for _ in range(25):
            os.getpid()
        records: list[bytes] = []
        while len(records) < 25:
            batch = pb.read(timeout=2.0)
            assert batch, f"only {len(records)} of 25 records"
            records += batch
    assert len(records) == 25
    assert {struct.unpack_from("<Q", r)[0] >> 32 for r in records} == {me}
    assert counts[b"\x01\x00\x00\x00"] == (25).to_bytes(8, "little")
    link.close()
    prog.close()
    counts.close()
    events.close()
    assert rp.open_fds() == before
    assert rp.gone(unique_name)


@pytest.mark.root
def test_builder_program_with_ring_buffer(unique_name: str) -> None:
    """The builder resolves our Map objects by name (`.fd`) and feeds the ring buffer."""
    b = Builder()
    b.mov64(R6, R1)
    b.call("get_current_pid_tgid")
    b.mov64(R7, R0)
    b.rsh64(R0, 32)
    b.jne(R0, os.getpid(), "out")
    b.stxdw(R10, R7, -8)
    b.ld_map_fd(R1, "ring")
    b.mov64(R2, R10)
    b.add64(R2, -8)
    b.mov64(R3, 8)
    b.mov64(R4, 0)
    b.call("ringbuf_output")
    b.label("out")
    b.mov64(R0, 0)
    b.exit()
    with Map.create("ringbuf", max_entries=4096, name=unique_name) as ring, \
            load_program(b.build(maps={"ring": ring}), name=unique_name) as prog, \
            attach_tracepoint(prog, "syscalls", "sys_enter_getppid"), \
            RingBuffer(ring) as rb:
        for _ in range(7):
            os.getppid()
        got = rb.read(timeout=1.0)
    assert [struct.unpack("<Q", r)[0] >> 32 for r in got] == [os.getpid()] * 7
