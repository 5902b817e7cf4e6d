"""Socket tracer tests.

Unit tests check record decoding and the generated programs (offsets from BTF, bitfield
handling) without root. Root tests load the real programs, run TCP (and UDP, unix) sockets
in a fresh network namespace from a child process, and compare what the tracer reports
with /proc (pid, fd, netns inode, socket inode).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from bpf_asm.btf import BTF, FieldLocation, Kind
from bpf_asm.helpers import helper_id
from bpf_asm.isa import Instruction
from ebpfrouter.tracer import EventKind, SocketEvent, Tracer, netns_inode, socket_inode
from ebpfrouter.tracer_layout import (
    CONFIG_VALUE,
    COUNT_VALUE,
    EAGER_KEY,
    EAGER_PEER_KEY,
    RECORD,
    RECORD_SIZE,
    STASH_VALUE,
    TRACKED_KEY,
    TRACKED_VALUE,
    KernelLayout,
    TracepointArgs,
)
from ebpfrouter.tracer_programs import (
    MAX_COUNTED_LISTENERS,
    MAX_EAGER_LISTENERS,
    MAX_EAGER_PEERS,
    MAX_REMOTE_PODS,
    MAX_STOPS,
    TRACEPOINTS,
    generate_programs,
    map_specs,
)
from ebpfrouter.tracer_seed import parse_proc_net_tcp

sys.path.insert(0, os.path.dirname(__file__))
from tracer_helpers import NetnsChild, collect  # noqa: E402

VMLINUX = "/sys/kernel/btf/vmlinux"
needs_btf = pytest.mark.skipif(not os.path.exists(VMLINUX), reason="no kernel BTF")

# Tracepoint argument offsets as the syscall tracepoints have had them since 4.x; used only
# by the non-root unit tests (root tests read the real format files).
FAKE_ARGS = TracepointArgs(
    enter_fd={sc: (16, 8) for sc in ("listen", "accept", "accept4", "connect", "close")},
    exit_ret={sc: (16, 8) for sc in ("listen", "accept", "accept4", "connect", "close")},
    group_dead=None,
    fork_child_pid=(20, 4),
)


# --------------------------------------------------------------------------- unit tests


def test_record_decode_ipv4_and_ipv6() -> None:
    raw = RECORD.pack(
        EventKind.ACCEPT,
        100,
        101,
        7,
        4026532000,
        3,
        555,
        7,
        123456,
        socket.AF_INET,
        8080,
        socket.htons(40000),
        0,
        socket.inet_aton("10.0.0.1").ljust(16, b"\0"),
        socket.inet_aton("10.0.0.2").ljust(16, b"\0"),
    )
    ev = SocketEvent.decode(raw + b"\0" * 4)  # perf buffers pad samples
    assert (ev.kind, ev.pid, ev.tid, ev.fd, ev.netns, ev.sock_ino) == (
        EventKind.ACCEPT,
        100,
        101,
        7,
        4026532000,
        555,
    )
    assert (ev.laddr, ev.lport, ev.raddr, ev.rport, ev.listen_fd) == (
        "10.0.0.1",
        8080,
        "10.0.0.2",
        40000,
        3,
    )
    raw6 = RECORD.pack(
        EventKind.CONNECT,
        1,
        1,
        4,
        9,
        -1,
        77,
        -115,
        1,
        socket.AF_INET6,
        5000,
        socket.htons(443),
        0,
        socket.inet_pton(socket.AF_INET6, "fd00::1"),
        socket.inet_pton(socket.AF_INET6, "::1"),
    )
    ev6 = SocketEvent.decode(raw6)
    assert (ev6.laddr, ev6.raddr, ev6.rport, ev6.ret, ev6.listen_fd) == (
        "fd00::1",
        "::1",
        443,
        -115,
        None,
    )
    with pytest.raises(ValueError, match="88"):
        SocketEvent.decode(raw[:40])
    with pytest.raises(ValueError, match="unknown kind 99"):
        SocketEvent.decode(b"\x63" + raw[1:])
    assert RECORD_SIZE == 88


def _imms(insns: list[Instruction]) -> set[int]:
    return {i.imm for i in insns}


@needs_btf
def test_programs_use_btf_offsets() -> None:
    btf = BTF.vmlinux()
    layout = KernelLayout.from_btf(btf)
    progs = {p.name: p.build() for p in generate_programs(layout, FAKE_ARGS)}
    assert set(progs) == {name for name, _, _ in TRACEPOINTS}
    imms = _imms(progs["er_ex_connect"])
    for path in [
        "task_struct.files",
        "files_struct.fdt",
        "fdtable.fd",
        "file.f_inode",
        "file.private_data",
        "socket.sk",
        "inode.i_ino",
        "sock.sk_protocol",
        "sock.__sk_common.skc_family",
        "sock.sk_type",
    ]:
        off = btf.resolve(path).offset
        if off:  # an offset of 0 needs no add
            assert off in imms, f"{path} offset {off} not used by er_ex_connect"
    # The enter programs walk task -> nsproxy -> net_ns -> ns.inum.
    en = _imms(progs["er_en_listen"])
    for path in ["task_struct.nsproxy", "nsproxy.net_ns", "net.ns.inum"]:
        off = btf.resolve(path).offset
        assert off == 0 or off in en, f"{path} offset {off} not used by er_en_listen"


@needs_btf
def test_bitfield_protocol_is_shifted_out() -> None:
    """A kernel where sk_protocol is an 8-bit bitfield (before 5.6) gets shift code."""
    layout = KernelLayout.from_btf()
    bitfield = FieldLocation(
        path="sock.sk_protocol",
        offset=528,
        size=4,
        bit_offset=528 * 8 + 8,
        bit_size=8,
        type_id=1,
        type_name="unsigned int",
        kind=Kind.INT,
        is_bitfield=True,
        resolved_kind=Kind.INT,
    )
    patched = dataclasses.replace(layout, sk_protocol=bitfield)
    prog = next(p for p in generate_programs(patched, FAKE_ARGS) if p.name == "er_ex_listen")
    text = str(prog.build())
    assert f"r1 <<= {bitfield.lshift}" in text and f"r1 >>= {bitfield.rshift}" in text
    assert bitfield.lshift == 48 and bitfield.rshift == 56
    assert bitfield.extract(0x0000_0600) == 6
    plain = next(p for p in generate_programs(layout, FAKE_ARGS) if p.name == "er_ex_listen")
    if not layout.sk_protocol.is_bitfield:
        assert "r1 >>= 56" not in str(plain.build())


@needs_btf
def test_ringbuf_variant_calls_ringbuf_output() -> None:
    layout = KernelLayout.from_btf()
    perf_out, ring_out = helper_id("perf_event_output"), helper_id("ringbuf_output")

    def calls(insns: list[Instruction]) -> set[int]:
        return {i.imm for i in insns if i.code == 0x85 and i.src == 0}

    for p in generate_programs(layout, FAKE_ARGS):
        if p.name.startswith("er_ex_"):
            assert perf_out in calls(p.build()) and ring_out not in calls(p.build())
    for p in generate_programs(layout, FAKE_ARGS, ringbuf=True):
        assert perf_out not in calls(p.build())
        if p.name.startswith("er_ex_") or p.name == "er_proc_exit":
            assert ring_out in calls(p.build())


@needs_btf
def test_every_map_a_program_uses_has_a_spec() -> None:
    """The programs name exactly the maps of `map_specs`, and the specs fit the records."""
    layout = KernelLayout.from_btf()
    for ringbuf in (False, True):
        used = {name for p in generate_programs(layout, FAKE_ARGS, ringbuf=ringbuf)
                for name in p.build().map_refs.values()}
        specs = map_specs(128, 1 << 16, ringbuf=ringbuf)
        assert used == set(specs)
        assert specs["events"].type == ("ringbuf" if ringbuf else "perf_event_array")
    specs = map_specs(128)
    assert {n: (s.key_size, s.value_size, s.max_entries) for n, s in specs.items()} == {
        "config": (4, CONFIG_VALUE.size, 1),
        "stash": (8, STASH_VALUE.size, 128),
        "tracked": (TRACKED_KEY.size, TRACKED_VALUE.size, 128),
        "pids": (4, 4, 128),
        "eager_listeners": (EAGER_KEY.size, 4, MAX_EAGER_LISTENERS),
        "eager_peers": (EAGER_PEER_KEY.size, 4, MAX_EAGER_PEERS),
        "stops": (4, 8, MAX_STOPS),
        "remote_pods": (EAGER_PEER_KEY.size, 4, MAX_REMOTE_PODS),
        "young": (TRACKED_KEY.size, RECORD_SIZE, 128),
        "young_closes": (EAGER_KEY.size, COUNT_VALUE.size, MAX_COUNTED_LISTENERS),
        "forks": (4, 8, 128),
        "events": (None, None, 1 << 20),
    }
    assert all(s.name.startswith("er_") and len(s.name) < 16 for s in specs.values())
    assert map_specs()["stash"] is not map_specs()["stash"]  # fresh specs, nothing shared


# --------------------------------------------------------------------------- root tests


CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    def ino(fd):
        return int(os.readlink(f"/proc/self/fd/{fd}")[8:-1])
    out = {"pid": os.getpid(), "netns": os.stat("/proc/self/ns/net").st_ino}
    # TCP over IPv4: listen, connect, accept.
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    port = srv.getsockname()[1]
    cli = socket.socket(); cli.connect(("127.0.0.1", port))
    acc, _ = srv.accept()
    # TCP over IPv6 (loopback only).
    srv6 = socket.socket(socket.AF_INET6); srv6.bind(("::1", 0)); srv6.listen()
    cli6 = socket.socket(socket.AF_INET6); cli6.connect(srv6.getsockname())
    acc6, _ = srv6.accept()
    # Not TCP: UDP connect, unix stream listen/connect/accept.
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.connect(("127.0.0.1", port))
    ux = socket.socket(socket.AF_UNIX); ux.bind("\\0" + sys.argv[1]); ux.listen()
    uxc = socket.socket(socket.AF_UNIX); uxc.connect("\\0" + sys.argv[1])
    uxa, _ = ux.accept()
    # A failed connect (nothing listens on port 1).
    bad = socket.socket()
    try:
        bad.connect(("127.0.0.1", 1))
    except OSError:
        pass
    # A non-blocking connect: reported with -EINPROGRESS.
    nb = socket.socket(); nb.setblocking(False)
    nb_ret = nb.connect_ex(("127.0.0.1", port))
    nb_acc, _ = srv.accept()
    r, w = os.pipe()
    out["nb_ret"] = nb_ret
    out["cli_port"] = cli.getsockname()[1]
    for name, s in [("nb", nb), ("nb_acc", nb_acc), ("srv", srv), ("cli", cli), ("acc", acc),
                    ("srv6", srv6), ("cli6", cli6), ("acc6", acc6), ("udp", udp), ("ux", ux),
                    ("uxc", uxc), ("uxa", uxa), ("bad", bad)]:
        out[name] = [s.fileno(), ino(s.fileno())]
    out["pipe"] = [r, 0]
    out["port"] = port
    print(json.dumps(out), flush=True)
    sys.stdin.readline()
    for s in (cli, acc, srv, udp, ux, uxc, uxa, bad, nb, nb_acc):
        s.close()
    os.close(r)
    if sys.argv[2] == "close-all":
        for s in (cli6, acc6, srv6):
            s.close()
    print("closed", flush=True)
    sys.stdin.readline()
    os._exit(0)  # no interpreter shutdown: sockets still open are not close()d
    """
)


class Child(NetnsChild):
    """The socket-making child process, in the test's network namespace."""

    def __init__(self, netns_name: str, mode: str) -> None:
        super().__init__(CHILD, netns_name, mode)

    def fd(self, name: str) -> int:
        return self.info[name][0]

    def ino(self, name: str) -> int:
        return self.info[name][1]

    def step(self) -> str:
        self.send("")
        return self.readline()

    def finish(self) -> None:
        """Let the child run to its end (one more step, then EOF); kill it after 5 s."""
        if self.proc.poll() is None:
            with_stdin = self.proc.stdin
            if with_stdin:
                try:
                    with_stdin.write("\n")
                    with_stdin.close()
                except BrokenPipeError:
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def host_tcp_traffic() -> None:
    """TCP listen/connect/accept/close in the host namespace (must not be traced)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    for s in (cli, acc, srv):
        s.close()


def bpftool_prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
    ).stdout
    return {p["id"] for p in json.loads(out)}


@pytest.mark.root
@pytest.mark.parametrize("buffer", ["ringbuf", "perf"])
def test_tracer_reports_tcp_in_netns(netns_name: str, buffer: str) -> None:
    ids: list[int] = []
    with Tracer(buffer=buffer) as tracer:
        ids = tracer.prog_ids
        assert len(ids) == len(TRACEPOINTS)
        assert set(ids) <= bpftool_prog_ids()
        assert tracer.kind == buffer
        child = Child(netns_name, "close-all")
        try:
            host_tcp_traffic()
            pid = child.pid
            assert child.info["netns"] == netns_inode(pid) != netns_inode()

            def mine(evs: list[SocketEvent]) -> list[SocketEvent]:
                return [e for e in evs if e.pid == pid]

            evs = collect(tracer, lambda e: len(mine(e)) >= 8)
            got = {(e.kind, e.fd) for e in mine(evs)}
            want = {
                (EventKind.LISTEN, child.fd("srv")),
                (EventKind.CONNECT, child.fd("cli")),
                (EventKind.ACCEPT, child.fd("acc")),
                (EventKind.LISTEN, child.fd("srv6")),
                (EventKind.CONNECT, child.fd("cli6")),
                (EventKind.ACCEPT, child.fd("acc6")),
                (EventKind.CONNECT, child.fd("nb")),
                (EventKind.ACCEPT, child.fd("nb_acc")),
            }
            assert got == want, f"events: {mine(evs)}"
            assert not [e for e in evs if e.pid == os.getpid()], "host netns traffic traced"
            tcp = ("srv", "cli", "acc", "srv6", "cli6", "acc6", "nb", "nb_acc")
            names = {child.fd(n): n for n in tcp}
            for e in mine(evs):
                name = names[e.fd]
                assert e.netns == child.info["netns"], e
                assert e.sock_ino == child.ino(name), (name, e)
                assert e.tid == pid
                if e.kind == EventKind.LISTEN or name == "cli":
                    assert e.ret == 0, e
                v6 = name.endswith("6")
                assert e.family == (socket.AF_INET6 if v6 else socket.AF_INET)
                assert e.laddr == ("::1" if v6 else "127.0.0.1")
                if e.kind == EventKind.ACCEPT:
                    assert e.ret == e.fd
                    assert e.listen_fd == child.fd("srv6" if v6 else "srv")
                if name == "srv":
                    assert e.lport == child.info["port"]
                if name in ("cli", "nb"):
                    assert (e.raddr, e.rport) == ("127.0.0.1", child.info["port"])
                if name == "cli":
                    assert e.lport == child.info["cli_port"]
                if name == "acc":
                    assert (e.raddr, e.rport) == ("127.0.0.1", child.info["cli_port"])
                if name == "nb":
                    assert e.ret == -child.info["nb_ret"] == -errno.EINPROGRESS
            assert len(tracer.tracked()) >= 6
            assert tracer.tracked()[(pid, child.fd("acc"))] == (
                child.ino("acc"),
                child.info["netns"],
            )

            # Closes: only tracked TCP fds are reported (not UDP, unix, the failed
            # connect's socket or the pipe).
            assert child.step().strip() == "closed"
            evs = collect(tracer, lambda e: len(mine(e)) >= 8)
            closes = {(e.fd, e.sock_ino) for e in mine(evs) if e.kind == EventKind.CLOSE}
            assert closes == {(child.fd(n), child.ino(n)) for n in names.values()}, mine(evs)
            assert all(e.kind == EventKind.CLOSE and e.ret == 0 for e in mine(evs))
            assert not [k for k in tracer.tracked() if k[0] == pid]

            child.finish()
            evs = collect(tracer, lambda e: any(x.kind == EventKind.EXIT for x in mine(e)))
            exits = [e for e in mine(evs) if e.kind == EventKind.EXIT]
            assert len(exits) == 1 and exits[0].netns == child.info["netns"], mine(evs)
            assert tracer.lost == 0
        finally:
            child.finish()
    assert tracer.closed
    assert not set(ids) & bpftool_prog_ids(), "programs left loaded after close"


@pytest.mark.root
def test_exit_forgets_tracked_and_track_seeds(netns_name: str) -> None:
    """Sockets made before the tracer are seeded with track(); exit drops tracked fds."""
    child = Child(netns_name, "keep-v6")
    try:
        with Tracer() as tracer:
            pid = child.pid
            tracer.track(pid, child.fd("srv6"))
            tracer.track(pid, child.fd("cli6"))
            tracer.track(pid, child.fd("udp"))  # tracked by hand: its close is reported
            assert tracer.untrack(pid, child.fd("udp")) is True
            assert tracer.untrack(pid, child.fd("udp")) is False
            tracer.track(pid, child.fd("cli"))
            assert child.step().strip() == "closed"  # closes cli, not cli6/srv6
            evs = collect(tracer, lambda e: any(x.pid == pid for x in e))
            mine = [e for e in evs if e.pid == pid]
            assert [(e.kind, e.fd, e.sock_ino) for e in mine] == [
                (EventKind.CLOSE, child.fd("cli"), child.ino("cli"))
            ], mine
            assert set(tracer.tracked()) >= {(pid, child.fd("srv6")), (pid, child.fd("cli6"))}
            child.finish()  # exits with srv6/cli6 still open: no close, one exit
            evs = collect(tracer, lambda e: any(x.kind == EventKind.EXIT for x in e))
            mine = [e for e in evs if e.pid == pid]
            assert [e.kind for e in mine] == [EventKind.EXIT], mine
            assert not [k for k in tracer.tracked() if k[0] == pid]
    finally:
        child.finish()


@pytest.mark.root
def test_host_netns_zero_traces_everything(unique_name: str) -> None:
    """host_netns_inode=0 disables the namespace filter: host TCP appears, UDP does not."""
    with Tracer(host_netns_inode=0) as tracer:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.connect(srv.getsockname())
        udp.close()
        srv_fd = srv.fileno()
        srv.close()
        me = os.getpid()
        evs = collect(tracer, lambda e: sum(x.pid == me for x in e) >= 2)
        mine = [(e.kind, e.fd) for e in evs if e.pid == me]
        assert mine == [(EventKind.LISTEN, srv_fd), (EventKind.CLOSE, srv_fd)]


@pytest.mark.root
def test_open_failure_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """If attaching fails half way, nothing stays loaded."""
    import ebpfrouter.tracer as tr

    calls = []
    real = tr.attach_tracepoint

    def flaky(prog, category, name):  # noqa: ANN001, ANN202
        if len(calls) == 3:
            raise OSError(2, f"no tracepoint {category}:{name}")
        calls.append(prog.id)
        return real(prog, category, name)

    monkeypatch.setattr(tr, "attach_tracepoint", flaky)
    tracer = Tracer()
    with pytest.raises(tr.TracerError, match="cannot attach er_"):
        tracer.open()
    assert tracer.closed and not tracer.links and not tracer.maps
    assert not set(calls) & bpftool_prog_ids()


def test_proc_net_tcp_parsing_matches_real_sockets() -> None:
    """Parse this process's own /proc/net/tcp{,6} and find sockets we just made."""
    socks = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            srv = socket.socket(family)
            srv.bind((host, 0))
            srv.listen()
            cli = socket.socket(family)
            cli.connect(srv.getsockname()[:2])
            socks += [srv, cli]
            table = "/proc/self/net/tcp" + ("6" if family == socket.AF_INET6 else "")
            with open(table) as f:
                rows = {r.inode: r for r in parse_proc_net_tcp(f.read(), family)}
            s_row = rows[socket_inode("self", srv.fileno())]
            c_row = rows[socket_inode("self", cli.fileno())]
            assert (s_row.laddr, s_row.lport, s_row.state) == (host, srv.getsockname()[1], 0x0A)
            assert (c_row.raddr, c_row.rport) == (host, srv.getsockname()[1])
            assert (c_row.laddr, c_row.lport) == (host, cli.getsockname()[1])
            assert c_row.state == 0x01
    finally:
        for s in socks:
            s.close()


@pytest.mark.root
def test_seed_finds_sockets_made_before_the_tracer(netns_name: str) -> None:
    child = Child(netns_name, "close-all")
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    try:
        with Tracer() as tracer:
            evs = tracer.seed()
            assert not [e for e in evs if e.pid == os.getpid()], "host netns socket seeded"
            pid = child.pid
            got = {(e.kind, e.fd, e.sock_ino) for e in evs if e.pid == pid}
            want = {
                (EventKind.LISTEN, child.fd("srv"), child.ino("srv")),
                (EventKind.LISTEN, child.fd("srv6"), child.ino("srv6")),
                (EventKind.CONNECT, child.fd("cli"), child.ino("cli")),
                (EventKind.CONNECT, child.fd("cli6"), child.ino("cli6")),
                (EventKind.CONNECT, child.fd("nb"), child.ino("nb")),
                (EventKind.ACCEPT, child.fd("acc"), child.ino("acc")),
                (EventKind.ACCEPT, child.fd("acc6"), child.ino("acc6")),
                (EventKind.ACCEPT, child.fd("nb_acc"), child.ino("nb_acc")),
            }
            assert got == want
            assert all(e.netns == child.info["netns"] for e in evs if e.pid == pid)
            # Seeded fds are tracked: their closes are reported.
            assert child.step().strip() == "closed"
            evs = collect(tracer, lambda e: sum(x.pid == pid for x in e) >= 8)
            closes = {(e.fd, e.sock_ino) for e in evs if e.pid == pid}
            assert closes == {(fd, ino) for _, fd, ino in want}
    finally:
        host.close()
        child.finish()


FORKER = textwrap.dedent(
    """
    import json, os, socket, sys, threading
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    print(json.dumps({"pid": os.getpid(), "acc": acc.fileno()}), flush=True)
    sys.stdin.readline()
    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        os.read(r, 1)
        os.execv("/bin/true", ["true"])
    os.close(r)
    print(json.dumps({"child": child, "thread": t.native_id}), flush=True)
    sys.stdin.readline()
    os.write(w, b"x")
    os.waitpid(child, 0)
    print("done", flush=True)
    sys.stdin.readline()
    os._exit(0)
    """
)


@pytest.mark.root
def test_fork_and_exec_of_a_tracked_process_are_reported(netns_name: str) -> None:
    """A process with tracked sockets: its new thread and its forked child are reported
    (FORK, the child's pid in `child_pid`), the child's exec and exit too (the fork program
    put the child in `pids`); a process without tracked sockets forks unseen."""
    child = NetnsChild(FORKER, netns_name)
    try:
        with Tracer() as tracer:
            pid = child.pid
            tracer.track(pid, child.info["acc"])
            child.send("")
            info = json.loads(child.readline())
            kid, thread = info["child"], info["thread"]
            evs = collect(tracer, lambda e: sum(x.kind == EventKind.FORK for x in e) >= 2,
                          pid=pid)
            forks = sorted(e.child_pid for e in evs if e.kind == EventKind.FORK)
            assert forks == sorted([kid, thread]), evs
            assert all(e.netns == netns_inode(pid) for e in evs if e.kind == EventKind.FORK)
            child.send("")
            assert child.readline().strip() == "done"
            evs = collect(tracer, lambda e: any(x.kind == EventKind.EXIT for x in e), pid=kid)
            assert [e.kind for e in evs] == [EventKind.EXEC, EventKind.EXIT], evs
            # untracked processes fork unseen (the host's own, here)
            subprocess.run(["true"], check=True)
            assert not [e for e in tracer.read(0.2) if e.kind == EventKind.FORK
                        and e.pid == os.getpid()]
    finally:
        child.kill()
