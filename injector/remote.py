"""Run system calls inside a frozen process, and read/write its memory.

How one injection works (x86_64 shown; aarch64 uses the same steps with its table):

1. On the first injection into a thread, save its registers and its blocked-signal mask,
   then block every signal with PTRACE_SETSIGMASK (no injected rt_sigprocmask needed, and
   the kernel reports the app's real mask even inside ppoll/pselect/epoll_pwait). Signals
   that arrive now stay pending and are delivered after thaw.
2. Point the instruction pointer at an existing ``syscall`` instruction: the bytes
   ``0f 05`` found anywhere in an executable mapping ([vdso] first). Execution stops right
   after it, so what follows those bytes is never run and nothing is written to the code.
3. Set number and arguments, mark "not in a syscall" (orig_rax = -1), resume with
   PTRACE_SYSCALL to the entry stop, again to the exit stop, read the result, and put the
   saved registers back at once.
4. Restarts are left to the kernel, which is the only way to be exact: the saved
   registers of a thread stopped inside a syscall hold orig_rax = nr and rax = -ERESTART*
   with rip after the syscall instruction. At thaw (freeze.py) they are put back and the
   thread detached; PTRACE_DETACH of a stopped tracee sets TIF_SIGPENDING
   (__ptrace_unlink), so on its way out it runs arch_do_signal_or_restart(): with no
   handler to run, ERESTARTSYS/NOINTR/NOHAND rewind ip by 2 and reload rax (restart),
   ERESTART_RESTARTBLOCK becomes restart_syscall (nanosleep keeps its deadline); if a
   signal handler runs, ERESTARTNOHAND (and ERESTARTSYS without SA_RESTART) become EINTR,
   just as without us. Tests show it: a mutation that hides orig_rax leaks the codes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from injector import ptrace as pt
from injector.arch import RESTART_CODES, Arch, current
from injector.errors import InjectorError, RemoteSyscallError, TargetGoneError

_libc_vm = ctypes.CDLL(None, use_errno=True)
_process_vm_readv = _libc_vm.process_vm_readv
_process_vm_writev = _libc_vm.process_vm_writev
for _fn in (_process_vm_readv, _process_vm_writev):
    _fn.restype = ctypes.c_ssize_t
    _fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                    ctypes.c_ulong, ctypes.c_ulong]


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _vm_transfer(fn: Callable[..., int], pid: int, local: int, remote: int, n: int) -> int:
    """One process_vm_readv/writev of `n` bytes: bytes moved, or -errno."""
    lvec, rvec = _IoVec(local, n), _IoVec(remote, n)
    got = int(fn(pid, ctypes.byref(lvec), 1, ctypes.byref(rvec), 1, 0))
    return got if got >= 0 else -ctypes.get_errno()

_U64 = (1 << 64) - 1
MAX_ERRNO = 4095
AT_SYSINFO_EHDR = 33
_MAX_RESTARTS = 8


def to_signed(value: int) -> int:
    """Interpret a 64-bit register value as signed."""
    value &= _U64
    return value - (1 << 64) if value >> 63 else value


@dataclass
class ThreadState:
    """What the injector knows about one seized thread."""

    tid: int
    stopped: bool = False
    stop: pt.Stop | None = None
    gone: bool = False
    saved_regs: ctypes.Structure | None = None
    saved_mask: int | None = None
    pending_signals: list[int] = field(default_factory=list)  # to re-send at thaw


def copy_regs(regs: ctypes.Structure) -> ctypes.Structure:
    """An independent copy of a registers structure."""
    return type(regs).from_buffer_copy(regs)


class RemoteProcess:
    """Syscalls and memory access inside a process whose threads are all ptrace-stopped.

    Not used directly: ``injector.freeze.freeze`` returns a ``FrozenProcess`` built on it.
    """

    def __init__(self, pid: int, timeout: float) -> None:
        self.pid = pid
        self.timeout = timeout
        self.arch: Arch = current()
        self._threads: dict[int, ThreadState] = {}
        self._insn_addr: int | None = None
        self._tracer = threading.get_native_id()  # ptrace obeys only this thread
        self._thawed = False

    # -- threads -----------------------------------------------------------------------

    @property
    def tids(self) -> list[int]:
        """Thread ids currently frozen, the main thread first."""
        live = [t for t, s in self._threads.items() if s.stopped and not s.gone]
        return sorted(live, key=lambda t: (t != self.pid, t))

    def _thread(self, tid: int | None) -> ThreadState:
        if tid is None:
            tids = self.tids
            if not tids:
                if self._thawed:
                    raise InjectorError(f"pid {self.pid}: no longer frozen")
                raise TargetGoneError(self.pid, None, "no frozen thread left")
            tid = tids[0]
        state = self._threads.get(tid)
        if state is None:
            raise InjectorError(f"pid {self.pid}: tid {tid} is not a thread of this process")
        if state.gone:
            raise TargetGoneError(self.pid, tid, "thread exited")
        if not state.stopped:
            raise InjectorError(f"pid {self.pid} tid {tid}: thread is not frozen")
        return state

    def _gone(self, state: ThreadState, exc: BaseException | None = None) -> InjectorError:
        """The error to raise after ESRCH: TargetGoneError if the thread really is dead."""
        if pt.thread_state(self.pid, state.tid) in (None, "Z", "X"):
            state.gone = True
            detail = f"while injecting ({exc})" if exc else "while injecting"
            return TargetGoneError(self.pid, state.tid, detail)
        return InjectorError(f"pid {self.pid} tid {state.tid}: not in a ptrace-stop ({exc})")

    def _check_tracer(self) -> None:
        if threading.get_native_id() != self._tracer:
            raise InjectorError(
                f"pid {self.pid}: ptrace requests must come from the thread that froze it"
            )

    # -- syscalls ----------------------------------------------------------------------

    def syscall(self, name_or_nr: str | int, *args: int, tid: int | None = None) -> int:
        """Run one system call in thread ``tid`` (default: the main thread) and return its
        result; a negative errno raises ``RemoteSyscallError``."""
        arch = self.arch
        nr = arch.nr(name_or_nr)
        name = name_or_nr if isinstance(name_or_nr, str) else arch.name_of(nr)
        if len(args) > len(arch.arg_regs):
            raise ValueError(f"{name}: at most {len(arch.arg_regs)} arguments")
        self._check_tracer()
        state = self._thread(tid)
        try:
            ret = self._inject(state, nr, name, args)
        except OSError as exc:
            if isinstance(exc, RemoteSyscallError):
                raise
            if exc.errno == errno.ESRCH:
                raise self._gone(state, exc) from None
            raise InjectorError(f"pid {self.pid} tid {state.tid}: {name}(): {exc}") from exc
        if -MAX_ERRNO <= ret < 0:
            raise RemoteSyscallError(-ret, self.pid, state.tid, name)
        return ret

    def _prepare(self, state: ThreadState) -> None:
        if state.saved_regs is None:
            regs = copy_regs(pt.getregs(state.tid))
            if self.arch.name == "x86_64" and getattr(regs, "cs", 0x33) == 0x23:
                raise InjectorError(f"pid {self.pid} tid {state.tid}: 32-bit (ia32) code,"
                                    " not supported")
            state.saved_regs = regs
        if state.saved_mask is None:
            state.saved_mask = pt.getsigmask(state.tid)
            pt.setsigmask(state.tid, pt.ALL_SIGNALS_MASK)

    def _inject(self, state: ThreadState, nr: int, name: str, args: tuple[int, ...]) -> int:
        arch = self.arch
        self._prepare(state)
        assert state.saved_regs is not None
        regs = copy_regs(state.saved_regs)
        setattr(regs, arch.ip_reg, self.syscall_insn_addr())
        setattr(regs, arch.nr_reg, nr)
        if arch.orig_nr_reg is not None:
            setattr(regs, arch.orig_nr_reg, _U64)
        for reg, value in zip(arch.arg_regs, args, strict=False):
            setattr(regs, reg, value & _U64)
        try:
            for _attempt in range(_MAX_RESTARTS):
                pt.setregs(state.tid, regs)
                self._run_to(state, pt.PTRACE_SYSCALL_INFO_ENTRY, name)
                self._run_to(state, pt.PTRACE_SYSCALL_INFO_EXIT, name)
                ret = to_signed(getattr(pt.getregs(state.tid), arch.ret_reg))
                if -ret not in RESTART_CODES:
                    break
                # Cut short by an unblockable signal (SIGSTOP): run it again; the signal
                # is taken (and held back until thaw) on the way, so this makes progress.
            else:
                raise InjectorError(
                    f"pid {self.pid} tid {state.tid}: {name}() interrupted"
                    f" {_MAX_RESTARTS} times in a row"
                )
        finally:
            if not state.gone:
                try:
                    pt.setregs(state.tid, state.saved_regs)
                except OSError as exc:
                    if pt.thread_state(self.pid, state.tid) in (None, "Z", "X"):
                        state.gone = True
                        raise TargetGoneError(self.pid, state.tid, f"during {name}()") from exc
                    raise InjectorError(
                        f"pid {self.pid} tid {state.tid}: cannot restore registers"
                        f" after {name}(): {exc}"
                    ) from exc
        return ret

    def _run_to(self, state: ThreadState, op: int, name: str) -> None:
        """Resume with PTRACE_SYSCALL until the wanted syscall stop (1 entry, 2 exit)."""
        tid = state.tid
        pt.syscall(tid)
        while True:
            try:
                stop = pt.wait_stop(tid, self.timeout, self.pid, f"{name}() to return")
            except BaseException:  # timeout, KeyboardInterrupt...: get it stopped, re-raise
                self._abort_blocked(state, name)
                raise
            state.stop = stop
            if stop.kind is pt.StopKind.EXITED:
                state.gone = True
                raise TargetGoneError(self.pid, tid, f"exited during {name}()")
            if stop.kind is pt.StopKind.SYSCALL:
                got = pt.syscall_stop_op(tid)
                if got == op:
                    return
                raise InjectorError(
                    f"pid {self.pid} tid {tid}: {name}(): unexpected syscall stop op {got}"
                )
            if stop.kind is pt.StopKind.SIGNAL:
                # Only SIGSTOP (unblockable) or a synchronous fault gets here: hold it
                # back now and send it again at thaw.
                state.pending_signals.append(stop.sig)
            pt.syscall(tid)

    def _abort_blocked(self, state: ThreadState, name: str) -> None:
        """An injected syscall is blocking: interrupt it and get the thread stopped again.

        Any ptrace-stop will do (usually the syscall-exit-stop with -ERESTART*, which also
        consumes the interrupt); the caller then restores the saved registers.
        """
        try:
            pt.interrupt(state.tid)
            for _ in range(4):
                stop = pt.wait_stop(state.tid, 1.0, self.pid, f"{name}() to be interrupted")
                state.stop = stop
                if stop.kind is pt.StopKind.EXITED:
                    state.gone = True
                    return
                if stop.kind is not pt.StopKind.SIGNAL:
                    return
                state.pending_signals.append(stop.sig)
                pt.syscall(state.tid)
                pt.interrupt(state.tid)
        except (OSError, InjectorError):
            if pt.thread_state(self.pid, state.tid) is None:
                state.gone = True
                return
        state.stopped = False  # thaw will try again to stop and detach it

    # -- code and memory ---------------------------------------------------------------

    def syscall_insn_addr(self) -> int:
        """Address of a syscall instruction in an executable mapping ([vdso] preferred).

        Any occurrence of the bytes will do, even inside another instruction: execution
        starts there and stops right after the syscall, so nothing else is ever run.
        """
        if self._insn_addr is not None:
            return self._insn_addr
        insn, align = self.arch.syscall_insn, self.arch.insn_align
        for start, end in self._exec_mappings():
            try:
                data = self.read_memory(start, min(end - start, 1 << 20))
            except InjectorError:
                continue
            pos = data.find(insn)
            while pos >= 0 and (start + pos) % align:
                pos = data.find(insn, pos + 1)
            if pos >= 0:
                self._insn_addr = start + pos
                return self._insn_addr
        raise InjectorError(f"pid {self.pid}: no syscall instruction in any executable mapping")

    def _vdso_text(self) -> tuple[int, int] | None:
        """The vDSO's executable PT_LOAD segment, from AT_SYSINFO_EHDR and its ELF header
        (cheaper than reading /proc/PID/maps)."""
        try:
            with open(f"{self._proc_dir()}/auxv", "rb") as f:
                auxv = f.read()
        except OSError:
            return None
        base = 0
        for key, value in struct.iter_unpack("<QQ", auxv[: len(auxv) // 16 * 16]):
            if key == AT_SYSINFO_EHDR:
                base = value
        if not base:
            return None
        try:
            ehdr = self.read_memory(base, 64)
            if ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:
                return None
            phoff, = struct.unpack_from("<Q", ehdr, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", ehdr, 0x36)
            for i in range(min(phnum, 16)):
                ph = self.read_memory(base + phoff + i * phentsize, 56)
                p_type, p_flags, _off, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", ph)
                if p_type == 1 and p_flags & 1:  # PT_LOAD, PF_X
                    return base + vaddr, base + vaddr + filesz
        except InjectorError:
            return None
        return None

    def _exec_mappings(self) -> Iterator[tuple[int, int]]:
        """Readable+executable mappings, [vdso] first ([vsyscall] never: not executable)."""
        vdso = self._vdso_text()
        if vdso is not None:
            yield vdso
        try:
            with open(f"{self._proc_dir()}/maps") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGoneError(self.pid, None, "no /proc entry") from None
        lines = text.splitlines()
        lines.sort(key=lambda ln: not ln.endswith("[vdso]"))
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 5 or not parts[1].startswith("r") or parts[1][2] != "x":
                continue
            if line.endswith("[vsyscall]"):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            yield lo, hi

    def _proc_dir(self) -> str:
        """/proc directory of a live thread (a main thread that called pthread_exit has no
        mm left, so its /proc/PID/mem and maps are empty)."""
        for tid in self.tids:
            return f"/proc/{self.pid}/task/{tid}"
        return f"/proc/{self.pid}"

    def read_memory(self, addr: int, n: int) -> bytes:
        """Read ``n`` bytes at ``addr`` in the target (`process_vm_readv`).

        `process_vm_readv`/`writev` need only the ptrace-attach right over the target
        (CAP_SYS_PTRACE, or the same uid), not write access to its ``/proc/PID/mem`` (mode 0600,
        owned by the target's user: opening it read-write needs CAP_DAC_OVERRIDE when the app
        runs as another uid). They honour page protections: readable pages only.
        """
        buf = ctypes.create_string_buffer(n)
        done = 0
        while done < n:
            got = _vm_transfer(_process_vm_readv, self._mm_task(), ctypes.addressof(buf) + done,
                               addr + done, n - done)
            if got < 0:
                err = -got
                if err == errno.ESRCH:
                    raise TargetGoneError(self.pid, None, "process_vm_readv") from None
                raise InjectorError(f"pid {self.pid}: cannot read {n} bytes at 0x{addr:x}: "
                                    f"{os.strerror(err)}")
            if got == 0:
                raise InjectorError(f"pid {self.pid}: short read at 0x{addr + done:x}")
            done += got
        return buf.raw

    def write_memory(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` in the target (`process_vm_writev`; writable pages only,
        such as `scratch` memory: the injector never writes code)."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        done = 0
        while done < len(data):
            put = _vm_transfer(_process_vm_writev, self._mm_task(), ctypes.addressof(buf) + done,
                               addr + done, len(data) - done)
            if put < 0:
                err = -put
                if err == errno.ESRCH:
                    raise TargetGoneError(self.pid, None, "process_vm_writev") from None
                raise InjectorError(f"pid {self.pid}: cannot write {len(data)} bytes at "
                                    f"0x{addr:x}: {os.strerror(err)}")
            if put == 0:
                raise InjectorError(f"pid {self.pid}: short write at 0x{addr + done:x}")
            done += put

    def _mm_task(self) -> int:
        """A live thread to name the address space by (a main thread that called
        pthread_exit has no mm left)."""
        for tid in self.tids:
            return tid
        return self.pid

    def _close_mem(self) -> None:
        """Nothing to close (kept for the freezer's thaw path)."""

    @contextmanager
    def scratch(self, size: int, tid: int | None = None) -> Iterator[int]:
        """Anonymous read/write memory in the target for the duration of the block."""
        length = max(mmap.PAGESIZE, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        addr = self.syscall("mmap", 0, length, prot, flags, -1, 0, tid=tid)
        try:
            yield addr
        except TargetGoneError:
            raise
        except BaseException:
            with suppress(InjectorError):  # keep the original error
                self.syscall("munmap", addr, length, tid=tid)
            raise
        else:
            self.syscall("munmap", addr, length, tid=tid)
