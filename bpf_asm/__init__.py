"""bpf_asm: a pure-Python eBPF toolkit.

Assemble programs (a builder with labels, or LLVM's BPF assembly text), load them with
`bpf(2)`, create maps, attach to tracepoints and cgroup v2 hooks, read events from perf and
ring buffers, read struct layouts from the kernel's BTF, and read or write BPF ELF objects —
no BCC, no libbpf, no clang or kernel headers at run time.

    from bpf_asm import Map, PerfBuffer, assemble, load_program, attach_tracepoint
"""

from bpf_asm.attach import (
    Link,
    attach_cgroup,
    attach_kprobe,
    attach_raw_tracepoint,
    attach_tracepoint,
    kprobes_supported,
)
from bpf_asm.btf import BTF, BTFError, FieldLocation
from bpf_asm.builder import Builder, BuildError, LabelError, UnknownMapError
from bpf_asm.cgroup import NotCgroup2Error, cgroup2_root
from bpf_asm.elf import ElfError, ElfObject, ElfProgram, read_elf, write_elf
from bpf_asm.helpers import UnknownHelperError, helper_id, helper_name
from bpf_asm.isa import DecodeError, Instruction, Instructions, Reg, decode
from bpf_asm.maps import Map, MapSpec
from bpf_asm.perf import PerfBuffer
from bpf_asm.programs import Program, ProgramSpec, load_program
from bpf_asm.ringbuf import RingBuffer
from bpf_asm.syscall import BPFError, NotSupportedError, VerifierError
from bpf_asm.text import AssemblerError, assemble
from bpf_asm.tracefs import EventFormat, TracepointNotFoundError, event_format

__all__ = [
    "BPFError", "BTF", "BTFError", "AssemblerError", "BuildError", "Builder", "DecodeError",
    "ElfError", "ElfObject", "ElfProgram", "EventFormat", "FieldLocation", "Instruction",
    "Instructions", "LabelError", "Link", "Map", "MapSpec", "NotCgroup2Error",
    "NotSupportedError", "PerfBuffer", "Program", "ProgramSpec", "Reg", "RingBuffer",
    "TracepointNotFoundError", "UnknownHelperError", "UnknownMapError", "VerifierError",
    "assemble", "attach_cgroup", "attach_kprobe", "attach_raw_tracepoint", "attach_tracepoint",
    "cgroup2_root", "decode", "event_format", "helper_id", "helper_name", "kprobes_supported",
    "load_program", "read_elf", "write_elf",
]
