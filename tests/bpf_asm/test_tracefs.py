"""tracefs: format parsing (canned and live), and reading a tracepoint argument by name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import rawprogs as rp

from bpf_asm.attach import attach_tracepoint
from bpf_asm.maps import Map
from bpf_asm.programs import load_program
from bpf_asm.tracefs import (
    TracepointNotFoundError,
    event_format,
    event_id,
    list_events,
    parse_format,
    tracefs_root,
)

SAMPLE = """\
name: sched_switch
ID: 316
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;
\tfield:__data_loc char[] filename;\toffset:40;\tsize:4;\tsigned:0;
\tfield:const char * name;\toffset:48;\tsize:8;\tsigned:0;

print fmt: "prev_comm=%s prev_pid=%d", REC->prev_comm, REC->prev_pid
"""


def test_parse_canned_format() -> None:
    fmt = parse_format(SAMPLE, "sched", "sched_switch")
    assert fmt.id == 316 and fmt.name == "sched_switch"
    assert [f.name for f in fmt.args] == ["prev_comm", "prev_pid", "prev_state", "filename",
                                          "name"]
    comm = fmt.field("prev_comm")
    assert (comm.type, comm.offset, comm.size, comm.array_len) == ("char[16]", 8, 16, 16)
    pid = fmt.field("prev_pid")
    assert (pid.type, pid.offset, pid.size, pid.signed) == ("pid_t", 24, 4, True)
    assert fmt.field("common_pid").common and not pid.common
    loc = fmt.field("filename")
    assert loc.data_loc and loc.type == "char[]" and loc.size == 4
    assert fmt.field("name").type == "const char *"
    assert fmt.size == 56
    with pytest.raises(KeyError, match=r"sched:sched_switch has no field 'next_pid' \(fields: "):
        fmt.field("next_pid")
    with pytest.raises(ValueError, match="no ID line"):
        parse_format("name: x\nformat:\n", "c", "x")


@pytest.mark.root
def test_live_formats_agree_with_the_files() -> None:
    root = tracefs_root()
    assert os.path.isdir(os.path.join(root, "events", "syscalls"))
    fmt = event_format("syscalls", "sys_enter_openat")
    with open(os.path.join(root, "events/syscalls/sys_enter_openat/format")) as f:
        text = f.read()
    want = re.findall(r"field:.*?(\w+);\toffset:(\d+);\tsize:(\d+);\tsigned:(\d+);", text)
    assert [(f.name, str(f.offset), str(f.size), str(int(f.signed))) for f in fmt.fields] == want
    assert fmt.field("filename").offset == 24 and fmt.field("filename").size == 8
    assert fmt.id == event_id("syscalls", "sys_enter_openat")
    assert "sys_enter_getppid" in list_events("syscalls")


@pytest.mark.root
def test_mounts_tracefs_when_missing() -> None:
    """In a private mount namespace without tracefs, the lookup mounts it."""
    script = textwrap.dedent("""
        import subprocess
        from bpf_asm.tracefs import event_id, tracefs_root
        for target in ("/sys/kernel/tracing", "/sys/kernel/debug"):
            subprocess.run(["umount", "-l", target], capture_output=True)
        assert "tracefs" not in [l.split()[2] for l in open("/proc/self/mounts")]
        assert event_id("syscalls", "sys_enter_getppid") > 0
        assert tracefs_root() == "/sys/kernel/tracing"
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.root
def test_missing_event_is_one_clear_error() -> None:
    with pytest.raises(TracepointNotFoundError, match="tracepoint syscalls:sys_enter_nope"):
        event_format("syscalls", "sys_enter_nope")
    with pytest.raises(ValueError, match="bad tracepoint name"):
        event_format("..", "x")


@pytest.mark.root
def test_program_reads_argument_by_name(unique_name: str) -> None:
    """A program on sys_enter_getpgid stores its `pid` argument, found via the format."""
    fmt = event_format("syscalls", "sys_enter_getpgid")
    off = fmt.field("pid").offset
    with Map.create("array", value_size=8, max_entries=1, name=unique_name,
                    key="<I", value="<Q") as out:
        code = b"".join([
            rp.mov64_reg(6, 1),
            rp.call(rp.GET_CURRENT_PID_TGID),
            rp.rsh64_imm(0, 32),
            rp.jne_imm(0, os.getpid(), 9),
            rp.st_w(10, -4, 0),
            rp.mov64_reg(2, 10),
            rp.add64_imm(2, -4),
            rp.ld_map_fd(1, out.fd),
            rp.call(rp.MAP_LOOKUP_ELEM),
            rp.jeq_imm(0, 0, 2),
            rp.ldx_dw(1, 6, off),          # r1 = ctx->pid
            rp.stx_dw(0, 1, 0),
            rp.return_zero(),
        ])
        with load_program(code, name=unique_name) as prog, \
                attach_tracepoint(prog, "syscalls", "sys_enter_getpgid"):
            os.getpgid(os.getppid())
            assert out[0] == os.getppid()
            os.getpgid(0)
            assert out[0] == 0
