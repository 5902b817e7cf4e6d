"""BPF programs: `ProgramSpec` (plain data) and `Program` (a loaded, verified kernel object)."""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import SupportsBytes, TypeAlias

from ._closing import Closing
from .syscall import (
    AttachType,
    BPFError,
    Cmd,
    ProgInfo,
    ProgLoadAttr,
    ProgType,
    TestRunAttr,
    VerifierError,
    bpf,
    check_obj_name,
    close_fd,
    obj_get,
    obj_get_info,
    obj_pin,
)

#: A program's instructions: anything `bytes()` turns into them (`Instructions`, bytes).
Code: TypeAlias = "SupportsBytes | bytes | bytearray | memoryview"

LOG_SIZE_START = 256 * 1024
LOG_SIZE_MAX = 1 << 30  # the kernel's limit is UINT_MAX >> 2


@dataclass
class ProgramSpec:
    """A program description (plain data). `load()` runs the verifier and returns a Program.

    `insns` is anything `bytes()` accepts (an Instructions sequence, bytes); 8 bytes a slot.
    `log_level` > 0 always fetches the verifier log (kept as `Program.log`).
    """

    insns: Code
    prog_type: ProgType | str | int = "tracepoint"
    name: str = ""
    license: str = "GPL"
    attach_type: AttachType | str | int | None = None
    log_level: int = 0
    kern_version: int = 0
    prog_flags: int = 0
    attach_btf_id: int = 0
    attach_btf_obj_fd: int = 0

    def load(self) -> Program:
        """BPF_PROG_LOAD. On rejection raises VerifierError with the log (buffer grown on
        ENOSPC); other failures raise BPFError naming the program."""
        code = bytes(self.insns)
        ptype = ProgType.parse(self.prog_type)
        label = f"{ptype.name.lower()} program {self.name!r}"
        if not code or len(code) % 8:
            raise ValueError(f"{label}: instructions must be a non-empty multiple of 8 bytes, "
                             f"got {len(code)}")
        name = check_obj_name(self.name, "program")
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(self.license.encode())
        attr = ProgLoadAttr(
            prog_type=ptype, insn_cnt=len(code) // 8, insns=ctypes.addressof(insns),
            license=ctypes.addressof(lic), kern_version=self.kern_version,
            prog_flags=self.prog_flags, prog_name=name,
            expected_attach_type=(0 if self.attach_type is None
                                  else AttachType.parse(self.attach_type)),
            attach_btf_id=self.attach_btf_id, attach_prog_fd=self.attach_btf_obj_fd,
        )
        op = f"BPF_PROG_LOAD {label}"
        level = self.log_level
        log = ""
        size = LOG_SIZE_START
        while True:
            buf = ctypes.create_string_buffer(size) if level else None
            attr.log_level = level
            attr.log_size = size if level else 0
            attr.log_buf = ctypes.addressof(buf) if buf is not None else 0
            attr.log_true_size = 0
            try:
                fd = bpf(Cmd.PROG_LOAD, attr)
                log = buf.value.decode(errors="replace") if buf is not None else ""
                break
            except BPFError as e:
                if e.errno == errno.ENOSPC and level and size < LOG_SIZE_MAX:
                    size = max(size * 4, attr.log_true_size + 1)
                    continue
                if level == 0 and e.errno in (errno.EINVAL, errno.EACCES, errno.E2BIG,
                                              errno.ERANGE, errno.EFAULT):
                    level = 1  # retry once to fetch the verifier's explanation
                    continue
                text = buf.value.decode(errors="replace") if buf is not None else ""
                if text.strip():
                    raise VerifierError(e.errno, op, text) from None
                raise BPFError(e.errno, op) from None
        return Program(fd, self, ptype, log)


class Program(Closing):
    """A loaded program. `.fd`, `.id`, `.info()`, `.log`; a context manager closing its fd."""

    def __init__(self, fd: int, spec: ProgramSpec | None, prog_type: ProgType,
                 log: str = "", name: str | None = None) -> None:
        self._fd = fd
        self.spec = spec
        self.prog_type = prog_type
        self.log = log
        self.name = name if name is not None else (spec.name if spec else "")

    @classmethod
    def open_pinned(cls, path: str) -> Program:
        """Open a program pinned on bpffs."""
        fd = obj_get(path)
        info = obj_get_info(fd, ProgInfo, path)
        return cls(fd, None, ProgType(info.type), name=info.name.decode())

    @property
    def fd(self) -> int:
        """The program's file descriptor (raises if closed)."""
        if self._fd < 0:
            raise ValueError(f"program {self.name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def info(self) -> ProgInfo:
        """BPF_OBJ_GET_INFO_BY_FD: id, tag, name, run counts, ..."""
        return obj_get_info(self.fd, ProgInfo, f"on program {self.name!r}")

    @property
    def id(self) -> int:
        """The kernel's program id (as `bpftool prog show` prints)."""
        return int(self.info().id)

    def pin(self, path: str) -> None:
        """Pin the program at `path` on bpffs."""
        from .bpffs import prepare_pin_path

        label = f"program {self.name!r}"
        obj_pin(self.fd, prepare_pin_path(path, label), label)

    def test_run(self, data: bytes = b"", ctx: bytes = b"", repeat: int = 0,
                 data_out_size: int = 0) -> tuple[int, bytes]:
        """BPF_PROG_TEST_RUN (for types that support it); returns (retval, data_out)."""
        din = ctypes.create_string_buffer(data, len(data)) if data else None
        dout = ctypes.create_string_buffer(data_out_size) if data_out_size else None
        cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
        attr = TestRunAttr(
            prog_fd=self.fd, data_size_in=len(data),
            data_in=ctypes.addressof(din) if din else 0,
            data_size_out=data_out_size, data_out=ctypes.addressof(dout) if dout else 0,
            ctx_size_in=len(ctx), ctx_in=ctypes.addressof(cin) if cin else 0, repeat=repeat,
        )
        bpf(Cmd.PROG_TEST_RUN, attr, f"program {self.name!r}")
        out = dout.raw[: attr.data_size_out] if dout else b""
        return int(attr.retval), out

    def close(self) -> None:
        """Close the fd (the kernel unloads the program once nothing holds it)."""
        fd, self._fd = self._fd, -1
        close_fd(fd)


    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<Program {self.name!r} {self.prog_type.name.lower()} {state}>"


def load_program(insns: Code, prog_type: ProgType | str | int = "tracepoint", name: str = "",
                 license: str = "GPL", log_level: int = 0,
                 attach_type: AttachType | str | int | None = None, **kw: int) -> Program:
    """Load `insns` (anything `bytes()` accepts) as a program; see ProgramSpec for `kw`."""
    return ProgramSpec(insns, prog_type, name, license, attach_type, log_level, **kw).load()
