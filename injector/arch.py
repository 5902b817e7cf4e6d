"""Per-architecture tables: syscall registers, syscall instruction, syscall numbers.

Register names are the field names of python-ptrace's ``user_regs_struct`` for that
architecture, so ``getattr(regs, arch.nr_reg)`` works on what ``ptrace_getregs`` returns.
x86_64 reads registers with PTRACE_GETREGS; aarch64 with PTRACE_GETREGSET / NT_PRSTATUS
(python-ptrace names x0..x30 ``r0``..``r30``).
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Kernel-internal restart codes (include/linux/errno.h); never meant to reach user space.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_CODES = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})

# Waits that return a plain -EINTR whenever *any* signal or ptrace interrupt is pending
# (fs/eventpoll.c), even where no handler runs. Name -> index of the timeout argument and
# whether that argument is a pointer (NULL = wait forever) rather than milliseconds (-1).
EINTR_ON_INTERRUPT = {
    "epoll_wait": (3, False),
    "epoll_pwait": (3, False),
    "epoll_pwait2": (3, True),
}

NT_PRSTATUS = 1

_X86_64_SYSCALLS = {
    "read": 0, "write": 1, "close": 3, "poll": 7, "mmap": 9, "mprotect": 10, "munmap": 11,
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17,
    "select": 23, "sched_yield": 24, "mremap": 25, "madvise": 28, "dup": 32, "dup2": 33,
    "pause": 34, "nanosleep": 35, "getpid": 39, "socket": 41, "connect": 42, "accept": 43,
    "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48, "bind": 49,
    "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53, "setsockopt": 54,
    "getsockopt": 55, "clone": 56, "exit": 60, "kill": 62, "fcntl": 72, "getuid": 102,
    "getppid": 110, "prctl": 157, "gettid": 186, "tkill": 200, "futex": 202,
    "restart_syscall": 219, "clock_nanosleep": 230, "exit_group": 231, "epoll_wait": 232,
    "epoll_ctl": 233, "tgkill": 234, "openat": 257, "pselect6": 270, "ppoll": 271,
    "unshare": 272, "epoll_pwait": 281, "accept4": 288, "eventfd2": 290, "epoll_create1": 291,
    "dup3": 292, "pipe2": 293, "recvmmsg": 299, "sendmmsg": 307, "setns": 308,
    "memfd_create": 319, "pidfd_open": 434, "close_range": 436, "pidfd_getfd": 438,
    "epoll_pwait2": 441,
}

# asm-generic numbering (aarch64 has no poll, select, epoll_wait, dup2, pause).
_AARCH64_SYSCALLS = {
    "eventfd2": 19, "epoll_create1": 20, "epoll_ctl": 21, "epoll_pwait": 22, "dup": 23,
    "dup3": 24, "fcntl": 25, "ioctl": 29, "openat": 56, "close": 57, "pipe2": 59, "read": 63,
    "write": 64, "pread64": 67, "pselect6": 72, "ppoll": 73, "exit": 93, "exit_group": 94,
    "unshare": 97, "futex": 98, "nanosleep": 101, "clock_nanosleep": 115, "sched_yield": 124,
    "restart_syscall": 128, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigaction": 134,
    "rt_sigprocmask": 135, "rt_sigreturn": 139, "prctl": 167, "getpid": 172, "getppid": 173,
    "getuid": 174, "gettid": 178, "socket": 198, "socketpair": 199, "bind": 200, "listen": 201,
    "accept": 202, "connect": 203, "getsockname": 204, "getpeername": 205, "sendto": 206,
    "recvfrom": 207, "setsockopt": 208, "getsockopt": 209, "shutdown": 210, "sendmsg": 211,
    "recvmsg": 212, "munmap": 215, "mremap": 216, "clone": 220, "mmap": 222, "mprotect": 226,
    "madvise": 233, "accept4": 242, "recvmmsg": 243, "setns": 268, "sendmmsg": 269,
    "memfd_create": 279, "pidfd_open": 434, "close_range": 436, "pidfd_getfd": 438,
    "epoll_pwait2": 441,
}


@dataclass(frozen=True)
class Arch:
    """How one architecture makes a system call from user space."""

    name: str
    nr_reg: str  # syscall number on entry
    arg_regs: tuple[str, str, str, str, str, str]
    ret_reg: str  # return value (negative errno on failure)
    ip_reg: str
    sp_reg: str
    orig_nr_reg: str | None  # kernel's saved syscall number (-1 outside a syscall), if exposed
    syscall_insn: bytes
    insn_align: int  # the instruction must start at an address aligned to this
    regs_request: str  # how registers are read: "GETREGS" or "GETREGSET/NT_PRSTATUS"
    restart_rewound_at_stop: bool  # kernel already rewound ip/ret for restart at a ptrace stop
    syscalls: Mapping[str, int] = field(repr=False)

    def nr(self, name_or_nr: str | int) -> int:
        """The syscall number for a name (an int is returned unchanged)."""
        if isinstance(name_or_nr, int):
            return name_or_nr
        try:
            return self.syscalls[name_or_nr]
        except KeyError:
            raise KeyError(f"no syscall {name_or_nr!r} on {self.name}") from None

    def name_of(self, nr: int) -> str:
        """The syscall name for a number, or ``syscall_<nr>`` if unknown."""
        for name, value in self.syscalls.items():
            if value == nr:
                return name
        return f"syscall_{nr}"


X86_64 = Arch(
    name="x86_64",
    nr_reg="rax",
    arg_regs=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
    ret_reg="rax",
    ip_reg="rip",
    sp_reg="rsp",
    orig_nr_reg="orig_rax",
    syscall_insn=b"\x0f\x05",  # syscall
    insn_align=1,
    regs_request="GETREGS",
    restart_rewound_at_stop=False,
    syscalls=MappingProxyType(_X86_64_SYSCALLS),
)

AARCH64 = Arch(
    name="aarch64",
    nr_reg="r8",
    arg_regs=("r0", "r1", "r2", "r3", "r4", "r5"),
    ret_reg="r0",
    ip_reg="pc",
    sp_reg="sp",
    orig_nr_reg=None,  # syscallno lives in the NT_ARM_SYSTEM_CALL regset, orig_x0 is hidden
    syscall_insn=b"\x01\x00\x00\xd4",  # svc #0, little endian
    insn_align=4,
    regs_request="GETREGSET/NT_PRSTATUS",
    restart_rewound_at_stop=True,  # arm64 do_signal rewinds pc and x0 before get_signal()
    syscalls=MappingProxyType(_AARCH64_SYSCALLS),
)

ARCHES: Mapping[str, Arch] = MappingProxyType({"x86_64": X86_64, "aarch64": AARCH64})


def current() -> Arch:
    """The table for the machine we run on (targets share our architecture)."""
    machine = platform.machine()
    aliases = {"amd64": "x86_64", "arm64": "aarch64"}
    try:
        return ARCHES[aliases.get(machine, machine)]
    except KeyError:
        raise NotImplementedError(f"injector: unsupported architecture {machine}") from None
