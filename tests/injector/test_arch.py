"""injector.arch: the per-architecture tables, checked against the kernel's own headers
where they are installed and against known values otherwise (no root needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from injector.arch import AARCH64, ARCHES, RESTART_CODES, X86_64, current

X86_HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
GENERIC_HEADER = Path("/usr/include/asm-generic/unistd.h")


def _header_numbers(path: Path) -> dict[str, int]:
    """`#define __NR_name N` (following one level of `__NR3264_x` indirection)."""
    text = path.read_text()
    values: dict[str, int] = {}
    for name, value in re.findall(r"#define\s+(__NR\w+)\s+(\w+)", text):
        values[name] = int(value) if value.isdigit() else values.get(value, -1)
    return {k[5:]: v for k, v in values.items() if k.startswith("__NR_") and v >= 0}


@pytest.mark.skipif(not X86_HEADER.exists(), reason="no x86_64 kernel headers")
def test_x86_64_numbers_match_kernel_header() -> None:
    header = _header_numbers(X86_HEADER)
    wrong = {n: (v, header.get(n)) for n, v in X86_64.syscalls.items() if header.get(n) != v}
    assert not wrong


@pytest.mark.skipif(not GENERIC_HEADER.exists(), reason="no asm-generic headers")
def test_aarch64_numbers_match_generic_header() -> None:
    header = _header_numbers(GENERIC_HEADER)
    wrong = {n: (v, header.get(n)) for n, v in AARCH64.syscalls.items() if header.get(n) != v}
    assert not wrong


@pytest.mark.parametrize(
    ("name", "nr"),
    [
        ("getpid", 172), ("gettid", 178), ("mmap", 222), ("munmap", 215), ("mprotect", 226),
        ("socket", 198), ("connect", 203), ("recvmsg", 212), ("sendmsg", 211), ("close", 57),
        ("dup3", 24), ("fcntl", 25), ("epoll_ctl", 21), ("rt_sigprocmask", 135),
        ("getsockopt", 209), ("setsockopt", 208), ("restart_syscall", 128), ("ppoll", 73),
    ],
)
def test_aarch64_known_numbers(name: str, nr: int) -> None:
    assert AARCH64.nr(name) == nr
    assert AARCH64.name_of(nr) == name


@pytest.mark.parametrize(
    ("name", "nr"),
    [
        ("read", 0), ("mmap", 9), ("getpid", 39), ("gettid", 186), ("recvmsg", 47),
        ("dup3", 292), ("restart_syscall", 219), ("epoll_ctl", 233), ("fcntl", 72),
    ],
)
def test_x86_64_known_numbers(name: str, nr: int) -> None:
    assert X86_64.nr(name) == nr


def test_aarch64_has_no_legacy_calls() -> None:
    for name in ("poll", "select", "epoll_wait", "dup2", "pause"):
        assert name not in AARCH64.syscalls
    with pytest.raises(KeyError, match="aarch64"):
        AARCH64.nr("poll")


def test_register_tables() -> None:
    assert X86_64.nr_reg == "rax" and X86_64.ret_reg == "rax" and X86_64.ip_reg == "rip"
    assert X86_64.arg_regs == ("rdi", "rsi", "rdx", "r10", "r8", "r9")
    assert X86_64.orig_nr_reg == "orig_rax"
    assert X86_64.syscall_insn == bytes.fromhex("0f05")
    # aarch64: x8 = number, x0..x5 = args, x0 = result (python-ptrace names them rN)
    assert AARCH64.nr_reg == "r8" and AARCH64.ret_reg == "r0" and AARCH64.ip_reg == "pc"
    assert AARCH64.arg_regs == ("r0", "r1", "r2", "r3", "r4", "r5")
    assert AARCH64.syscall_insn == bytes.fromhex("010000d4")  # svc #0
    assert int.from_bytes(AARCH64.syscall_insn, "little") == 0xD4000001
    assert AARCH64.insn_align == 4 and AARCH64.regs_request.endswith("NT_PRSTATUS")


def test_tables_are_consistent() -> None:
    for arch in ARCHES.values():
        assert len(set(arch.syscalls.values())) == len(arch.syscalls), arch.name
        for name, nr in arch.syscalls.items():
            assert arch.nr(name) == nr and arch.name_of(nr) == name
        assert arch.nr(12345) == 12345 and arch.name_of(12345) == "syscall_12345"
    assert {512, 513, 514, 516} == set(RESTART_CODES)


def test_current_arch_registers_exist_in_python_ptrace() -> None:
    from ptrace.binding import ptrace_registers_t

    arch = current()
    fields = {f[0] for f in ptrace_registers_t._fields_}
    regs = [arch.nr_reg, arch.ret_reg, arch.ip_reg, arch.sp_reg, *arch.arg_regs]
    if arch.orig_nr_reg:
        regs.append(arch.orig_nr_reg)
    assert set(regs) <= fields
