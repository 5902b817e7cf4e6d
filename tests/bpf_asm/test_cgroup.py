"""cgroup v2 hooks on the real kernel: attach_cgroup, link pinning, update and detach, finding
and mounting cgroup2, cross-checked with `bpftool cgroup show` and `bpftool link show`.

Programs go on a fresh child cgroup per test (not the root), so only the processes a test
moves there are affected; the cgroup is removed afterwards, even on failure.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import rawprogs as rp

from bpf_asm import NotCgroup2Error, attach_cgroup, cgroup2_root
from bpf_asm.attach import CGROUP_PROG_TYPES, Link
from bpf_asm.cgroup import cgroup_id, open_cgroup
from bpf_asm.maps import Map
from bpf_asm.programs import Program, load_program
from bpf_asm.syscall import AttachType, BPFError, LinkType

pytestmark = pytest.mark.root

no_leaks = rp.no_leaks  # autouse: no fds, programs or maps left behind

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GETPEERNAME4 = AttachType.CGROUP_INET4_GETPEERNAME
FAKE_PEER = "10.11.12.13"


def st_w_ctx(off: int, imm: int) -> bytes:
    """*(u32 *)(r1 + off) = imm (ctx store of an immediate)."""
    return rp.insn(rp.ST | rp.W | rp.MEM, 1, off=off, imm=imm)


def rewrite_peer_program(ip: str) -> bytes:
    """getpeername4: user_ip4 = ip (network order); return 1."""
    value = int.from_bytes(socket.inet_aton(ip), sys.byteorder, signed=True)
    return rp.mov64_imm(2, value) + rp.insn(rp.STX | rp.W | rp.MEM, 1, 2, off=4) + \
        rp.mov64_imm(0, 1) + rp.exit_()


def return_one() -> bytes:
    return rp.mov64_imm(0, 1) + rp.exit_()


@pytest.fixture
def cgroup(unique_name: str) -> Iterator[str]:
    """A fresh, empty child cgroup of the cgroup2 root."""
    path = os.path.join(cgroup2_root(), unique_name)
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)


@pytest.fixture
def peer_prog(unique_name: str) -> Iterator[Program]:
    with load_program(rewrite_peer_program(FAKE_PEER), "cgroup_sock_addr", name=unique_name,
                      attach_type=GETPEERNAME4) as prog:
        yield prog


def cgroup_progs(path: str) -> list[dict]:
    """What bpftool says is attached to cgroup `path` (the oracle)."""
    return rp.bpftool("cgroup", "show", path) or []


def peer_seen_inside(cgroup: str) -> tuple[str, int]:
    """getpeername of a TCP connection made by a process that moved into `cgroup` first."""
    listener = socket.create_server(("127.0.0.1", 0))
    script = textwrap.dedent(f"""
        import os, socket
        with open({os.path.join(cgroup, "cgroup.procs")!r}, "w") as f:
            f.write(str(os.getpid()))
        s = socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}))
        print(*s.getpeername())
    """)
    with listener:
        out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                             text=True).stdout.split()
    return out[0], int(out[1])


def test_attach_names_match_bpftool(cgroup: str, unique_name: str) -> None:
    """Our numbers for the sock_addr hooks are the kernel's: bpftool names each one as we do."""
    hooks = [t for t, pt in CGROUP_PROG_TYPES.items()
             if pt.name == "CGROUP_SOCK_ADDR" and "UNIX" not in t.name]  # bpftool 7.1: no unix
    links = []
    try:
        for hook in hooks:
            with load_program(return_one(), "cgroup_sock_addr", name=unique_name,
                              attach_type=hook) as prog:
                links.append((hook, prog.id, attach_cgroup(prog, cgroup, hook)))
        shown = {p["id"]: p["attach_type"] for p in cgroup_progs(cgroup)}
        assert shown == {pid: hook.name.lower() for hook, pid, _ in links}
        for hook, pid, link in links:
            oracle = rp.bpftool("link", "show", "id", str(link.id))
            assert oracle["type"] == "cgroup" and oracle["prog_id"] == pid
            assert oracle["cgroup_id"] == cgroup_id(cgroup) == os.stat(cgroup).st_ino
            assert oracle["attach_type"] == hook.name.lower()
    finally:
        for _, _, link in links:
            link.close()
    assert cgroup_progs(cgroup) == []


def test_unix_connect_hook_is_the_unix_one(cgroup: str, unique_name: str,
                                           tmp_path) -> None:
    """bpftool 7.1 cannot name the unix hooks; their effect can: a connect_unix program
    returning 0 refuses a unix connect() made inside the cgroup (and nothing else)."""
    path = str(tmp_path / "sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    script = textwrap.dedent(f"""
        import os, socket
        with open({os.path.join(cgroup, "cgroup.procs")!r}, "w") as f:
            f.write(str(os.getpid()))
        try:
            socket.socket(socket.AF_UNIX).connect({path!r})
            print("connected")
        except PermissionError:
            print("refused")
    """)
    deny = rp.mov64_imm(0, 0) + rp.exit_()
    with server, load_program(deny, "cgroup_sock_addr", name=unique_name,
                              attach_type="connect_unix") as prog, \
            attach_cgroup(prog, cgroup, AttachType.CGROUP_UNIX_CONNECT):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out == "refused"
        socket.socket(socket.AF_UNIX).connect(path)  # outside the cgroup: untouched


def test_getpeername_rewritten_inside_the_cgroup_only(cgroup: str, peer_prog: Program) -> None:
    with attach_cgroup(peer_prog, cgroup, "getpeername4") as link:
        assert link.target == f"cgroup {cgroup} (cgroup_inet4_getpeername)"
        assert [p["id"] for p in cgroup_progs(cgroup)] == [peer_prog.id]
        ip, port = peer_seen_inside(cgroup)
        assert ip == FAKE_PEER and port > 0  # the port was not written: the real one
        with socket.create_server(("127.0.0.1", 0)) as ls, \
                socket.create_connection(ls.getsockname()) as c:
            assert c.getpeername() == ls.getsockname()  # our socket: not in the cgroup
    assert link.closed
    assert cgroup_progs(cgroup) == []
    assert peer_seen_inside(cgroup)[0] == "127.0.0.1"


def test_pinned_link_outlives_its_fds(cgroup: str, peer_prog: Program,
                                      unique_name: str) -> None:
    path = f"/sys/fs/bpf/{unique_name}"
    with attach_cgroup(peer_prog, cgroup, GETPEERNAME4) as link:
        link.pin(path)
        link_id = link.id
    try:
        peer_prog.close()
        # Neither the link fd nor the program fd is open: the pin keeps both attached.
        assert [p["name"] for p in cgroup_progs(cgroup)] == [unique_name]
        assert peer_seen_inside(cgroup)[0] == FAKE_PEER
        with Link.open_pinned(path) as again:
            info = again.info()
            assert again.id == link_id and info.type == LinkType.CGROUP
            assert info.cgroup.cgroup_id == cgroup_id(cgroup)
            assert info.cgroup.attach_type == GETPEERNAME4
            assert again.target == (f"cgroup id {cgroup_id(cgroup)} "
                                    "(cgroup_inet4_getpeername)")
    finally:
        os.unlink(path)
    assert rp.gone(unique_name)
    assert cgroup_progs(cgroup) == []


def test_update_swaps_the_program_in_place(cgroup: str, peer_prog: Program,
                                           unique_name: str) -> None:
    with load_program(rewrite_peer_program("10.99.0.1"), "cgroup_sock_addr",
                      name=unique_name, attach_type=GETPEERNAME4) as second, \
            attach_cgroup(peer_prog, cgroup, GETPEERNAME4) as link:
        link_id = link.id
        link.update(second, old=peer_prog)
        assert link.prog is second and link.id == link_id
        assert rp.bpftool("link", "show", "id", str(link_id))["prog_id"] == second.id
        assert [p["id"] for p in cgroup_progs(cgroup)] == [second.id]
        assert peer_seen_inside(cgroup)[0] == "10.99.0.1"
        with pytest.raises(BPFError, match="BPF_LINK_UPDATE") as info:
            link.update(peer_prog, old=peer_prog)  # it no longer runs peer_prog
        assert info.value.errno == errno.EPERM
        link.update(peer_prog)  # without `old`: unconditional
        assert peer_seen_inside(cgroup)[0] == FAKE_PEER


def test_detach_even_when_pinned(cgroup: str, peer_prog: Program, unique_name: str) -> None:
    path = f"/sys/fs/bpf/{unique_name}"
    with attach_cgroup(peer_prog, cgroup, GETPEERNAME4) as link:
        link.pin(path)
        try:
            link.detach()
            assert cgroup_progs(cgroup) == []
            assert peer_seen_inside(cgroup)[0] == "127.0.0.1"
            with Link.open_pinned(path) as defunct:
                assert defunct.info().cgroup.cgroup_id == 0  # no cgroup any more
        finally:
            os.unlink(path)


def test_attach_errors_name_the_problem(cgroup: str, peer_prog: Program, unique_name: str,
                                        tmp_path) -> None:
    with pytest.raises(NotCgroup2Error, match=f"{tmp_path} is not a cgroup v2 directory: its "
                       "file system type is 0x[0-9a-f]+, not cgroup2 .*cgroup2 is mounted at"):
        attach_cgroup(peer_prog, str(tmp_path), GETPEERNAME4)
    with open("/proc/self/mounts") as f:
        v1 = [line.split()[1] for line in f if line.split()[2] == "cgroup"]
    if v1:
        with pytest.raises(NotCgroup2Error, match="cgroup v1 hierarchy; BPF programs attach "
                           "to cgroup v2 only"):
            attach_cgroup(peer_prog, v1[0], GETPEERNAME4)
    with pytest.raises(NotCgroup2Error, match="not a directory"):
        attach_cgroup(peer_prog, os.path.join(cgroup, "cgroup.procs"), GETPEERNAME4)
    with pytest.raises(FileNotFoundError):
        attach_cgroup(peer_prog, os.path.join(cgroup, "nope"), GETPEERNAME4)
    with pytest.raises(ValueError, match="attach type perf_event is not a cgroup hook"):
        attach_cgroup(peer_prog, cgroup, "perf_event")
    with pytest.raises(ValueError, match=f"cannot attach program '{unique_name}' to cgroup "
                       f"{cgroup} \\(cgroup_inet6_getpeername\\): it was loaded with "
                       "expected_attach_type cgroup_inet4_getpeername"):
        attach_cgroup(peer_prog, cgroup, "getpeername6")
    with load_program(rp.return_zero(), "socket_filter", name=unique_name) as wrong, \
            pytest.raises(ValueError, match="cannot attach socket_filter program .* needs a "
                          "cgroup_sock_addr program"):
        attach_cgroup(wrong, cgroup, GETPEERNAME4)
    assert cgroup_progs(cgroup) == []


def test_open_pinned_refuses_what_is_not_a_link(unique_name: str) -> None:
    path = f"/sys/fs/bpf/{unique_name}"
    with Map.create("array", value_size=4, max_entries=1, name=unique_name) as m:
        m.pin(path)
    try:
        with pytest.raises(ValueError, match=f"{path} is pinned but is not a BPF link "
                           "\\(it is anon_inode:bpf-map\\)"):
            Link.open_pinned(path)
    finally:
        os.unlink(path)


def test_open_cgroup_and_id(cgroup: str) -> None:
    fd = open_cgroup(cgroup)
    try:
        assert os.fstat(fd).st_ino == cgroup_id(cgroup)
    finally:
        os.close(fd)
    assert cgroup_id(cgroup2_root()) == 1  # the root cgroup's id (no cgroup namespace here)


def test_attach_type_names() -> None:
    assert AttachType.parse("cgroup_inet4_getpeername") == 29
    assert AttachType.parse("getpeername6") == 30 == AttachType.CGROUP_INET6_GETPEERNAME
    assert AttachType.parse("getsockname4") == 31
    assert AttachType.parse("CGROUP_INET6_GETSOCKNAME") == 32
    assert AttachType.parse("sendmsg4") == AttachType.CGROUP_UDP4_SENDMSG
    assert AttachType.parse("sock_ops") == AttachType.CGROUP_SOCK_OPS
    assert AttachType.parse("connect_unix") == AttachType.CGROUP_UNIX_CONNECT
    with pytest.raises(ValueError, match="unknown attach type 'getpeername5'"):
        AttachType.parse("getpeername5")


def test_mounts_cgroup2_when_missing() -> None:
    """In a private mount namespace without any cgroup2 mount, cgroup2_root() mounts one."""
    script = textwrap.dedent("""
        import os, subprocess
        from bpf_asm.cgroup import DEFAULT_ROOT, HYBRID_ROOT, cgroup2_root, cgroup_id
        def cgroup2_mounts():
            return [l.split()[1] for l in open("/proc/self/mounts") if l.split()[2] == "cgroup2"]
        for m in cgroup2_mounts():
            subprocess.run(["umount", "-l", m], check=True)
        assert cgroup2_mounts() == []
        want = HYBRID_ROOT if os.path.ismount(DEFAULT_ROOT) else DEFAULT_ROOT
        got = cgroup2_root()
        assert got == want and cgroup2_mounts() == [want], (got, cgroup2_mounts())
        assert cgroup_id(got) == 1
        assert cgroup2_root(mount_if_missing=False) == want
        print("ok")
    """)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
