"""Address virtualization on the real kernel: what *another process* holding the socket sees from
getsockname()/getpeername() once the daemon has added the socket's overlay addresses.

The apps are separate processes (in two network namespaces joined by a veth pair, or on
loopback); the test plays the daemon: it takes its copy of an app's socket with pidfd_getfd,
as the daemon does, and registers it. bpftool is the independent oracle for what is loaded,
attached and left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bpf_asm import cgroup2_root
from bpf_asm.maps import Map
from ebpfrouter.addrvirt import (
    HOOKS,
    AddressTableFull,
    AddressVirtualizer,
    VirtualAddresses,
    VirtualizationUnavailable,
    socket_cookie,
    tcp_socket_cookies,
)
from injector.inspect import pidfd_getfd

pytestmark = pytest.mark.root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IFA_F_NODAD = 0x02

# The "underlay" between the two namespaces, and the overlay addresses the apps should see.
A4, B4 = "10.201.0.1", "10.201.0.2"
A6, B6 = "fd00:201::1", "fd00:201::2"
CLIENT4, SERVER4 = ("10.244.1.5", 41000), ("10.244.2.7", 8080)
CLIENT6, SERVER6 = ("fd00:244:1::5", 41000), ("fd00:244:2::7", 8080)


def mapped(endpoint: tuple[str, int]) -> tuple[str, int]:
    return "::ffff:" + endpoint[0], endpoint[1]


# --- the apps -----------------------------------------------------------------------------------

APP = textwrap.dedent("""
    import json, os, socket, sys
    spec = json.loads(sys.argv[1])
    if spec.get("cgroup"):
        with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    def say(**kw):
        print(json.dumps(kw), flush=True)
    family = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    if spec["role"] == "server":
        ls = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((spec["host"], 0))
        ls.listen()
        say(port=ls.getsockname()[1])
        s, _ = ls.accept()
    elif spec["role"] == "client":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.connect((spec["host"], spec["port"]))
    else:  # "given": a socket handed over at start (fd in spec), as after a swap
        s = socket.socket(fileno=spec["fd"])
    say(fd=s.fileno())
    for line in sys.stdin:
        if line.strip() == "ask":
            say(sock=list(s.getsockname()[:2]), peer=list(s.getpeername()[:2]))
""")


class App:
    """A process holding one TCP socket; `ask()` returns what getsockname and getpeername
    say *in that process*."""

    def __init__(self, role: str, family: int, host: str = "", port: int = 0,
                 netns: str | None = None, cgroup: str | None = None, fd: int = -1) -> None:
        spec = {"role": role, "family": family, "host": host, "port": port, "cgroup": cgroup,
                "fd": fd}
        argv = [sys.executable, "-c", APP, json.dumps(spec)]
        if netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{netns}", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     pass_fds=[fd] if fd >= 0 else [])
        self.port = self._read()["port"] if role == "server" else port
        self.fd = -1

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        timer = threading.Timer(10, self.proc.kill)  # never hang the suite
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"app {self.proc.args} died: {self.proc.stderr.read()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def connected(self) -> App:
        """Wait for the app's connection (after connect() or accept()) and learn its fd."""
        self.fd = self._read()["fd"]
        return self

    def ask(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """(getsockname, getpeername) as the app sees them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("ask\n")
        self.proc.stdin.flush()
        got = self._read()
        return (got["sock"][0], got["sock"][1]), (got["peer"][0], got["peer"][1])

    def copy(self) -> socket.socket:
        """The daemon's view: a pidfd_getfd copy of the app's socket."""
        return pidfd_getfd(self.proc.pid, self.fd)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def apps() -> Iterator[Callable[..., App]]:
    """Start apps; all are killed afterwards, even on failure."""
    started: list[App] = []

    def start(*args: Any, **kwargs: Any) -> App:
        started.append(App(*args, **kwargs))
        return started[-1]

    yield start
    for app in started:
        app.stop()


def connect_pair(start: Callable[..., App], server_family: int, server_host: str,
                 client_family: int, client_host: str, server_ns: str | None = None,
                 client_ns: str | None = None, **kw: Any) -> tuple[App, App]:
    server = start("server", server_family, server_host, netns=server_ns, **kw)
    client = start("client", client_family, client_host, server.port, netns=client_ns,
                   **kw).connected()
    return server.connected(), client


# --- kernel objects ---------------------------------------------------------------------------


def bpftool_ids(kind: str) -> set[int]:
    """Ids of every `kind` (prog, map, link) in the kernel, per bpftool."""
    out = subprocess.run(["bpftool", "-j", kind, "list"], check=True, capture_output=True,
                         text=True).stdout
    return {obj["id"] for obj in json.loads(out or "[]")}


def wait_gone(kind: str, ids: set[int], timeout: float = 3.0) -> set[int]:
    """The ones of `ids` still present after up to `timeout` s (frees can wait for RCU)."""
    deadline = time.monotonic() + timeout
    while (left := ids & bpftool_ids(kind)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def objects(v: AddressVirtualizer) -> dict[str, set[int]]:
    return {"prog": set(v.prog_ids), "link": set(v.link_ids), "map": {v.map_id}}


def assert_all_gone(ids: dict[str, set[int]]) -> None:
    for kind, wanted in ids.items():
        assert wait_gone(kind, wanted) == set(), f"{kind} ids {wanted} left behind"


@pytest.fixture
def virt() -> Iterator[AddressVirtualizer]:
    """An unpinned virtualizer on the cgroup2 root; closing it must leave nothing."""
    v = AddressVirtualizer.open(None)
    ids = objects(v)
    try:
        yield v
    finally:
        v.close()
        assert_all_gone(ids)


@pytest.fixture
def pin_dir(unique_name: str) -> Iterator[str]:
    path = f"/sys/fs/bpf/{unique_name}"
    try:
        yield path
    finally:
        AddressVirtualizer.destroy_pinned(path)
        assert not os.path.exists(path)


@pytest.fixture
def two_nodes(unique_name: str) -> Iterator[tuple[str, str]]:
    """Namespaces `<name>a` and `<name>b` joined by a veth pair (10.201.0.1/24, fd00:201::1/64
    on a; .2 and ::2 on b), removed afterwards even on failure."""
    from pyroute2 import IPRoute, NetNS, netns

    names = (unique_name + "a", unique_name + "b")
    made: list[str] = []
    try:
        for name in names:
            netns.create(name)
            made.append(name)
        with IPRoute() as root:
            root.link("add", ifname=names[0], kind="veth", peer=names[1])
            for name in names:
                root.link("set", index=root.link_lookup(ifname=name)[0], net_ns_fd=name)
        for name, ip4, ip6 in ((names[0], A4, A6), (names[1], B4, B6)):
            with NetNS(name) as ns:
                for ifname in ("lo", name):
                    ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
                index = ns.link_lookup(ifname=name)[0]
                ns.addr("add", index=index, address=ip4, prefixlen=24)
                ns.addr("add", index=index, address=ip6, prefixlen=64, flags=IFA_F_NODAD)
        yield names
    finally:
        for name in made:
            netns.remove(name)  # the veth pair goes with its namespaces


# --- what apps see ------------------------------------------------------------------------------


def test_loopback_ipv4_seen_by_another_process(virt: AddressVirtualizer, apps) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = apps("client", 4, "127.0.0.1", server.getsockname()[1]).connected()
        accepted, _ = server.accept()
        real = client.ask()
        assert real[1] == server.getsockname()
        with client.copy() as copy, accepted:
            cookie = virt.add(copy, CLIENT4, SERVER4)
            assert cookie == socket_cookie(copy) == socket_cookie(copy.fileno())
            assert client.ask() == (CLIENT4, SERVER4)
            # Every fd of the socket answers so, the daemon's copy too.
            assert copy.getpeername() == SERVER4
            # The other end has no entry: unchanged.
            assert accepted.getpeername() == real[0] and accepted.getsockname() == real[1]
            assert virt.get(cookie) == VirtualAddresses(CLIENT4, SERVER4)
            assert cookie in virt and len(virt) == 1
            assert virt.remove(cookie) is True
            assert virt.remove(cookie) is False
            assert client.ask() == real
            assert len(virt) == 0 and cookie not in virt


def test_ipv4_between_namespaces(virt: AddressVirtualizer, apps, two_nodes) -> None:
    a, b = two_nodes
    server, client = connect_pair(apps, 4, B4, 4, B4, server_ns=b, client_ns=a)
    other_server, other_client = connect_pair(apps, 4, B4, 4, B4, server_ns=b, client_ns=a)
    before = client.ask()
    assert before[0][0] == A4 and before[1] == (B4, server.port)
    others = other_client.ask(), other_server.ask()
    with client.copy() as c, server.copy() as s:
        virt.add(c, CLIENT4, SERVER4)
        virt.add(s, SERVER4, CLIENT4)
    assert client.ask() == (CLIENT4, SERVER4)
    assert server.ask() == (SERVER4, CLIENT4)
    assert (other_client.ask(), other_server.ask()) == others  # no entries: unchanged
    assert virt.prune(keep=set()) == 2
    assert client.ask() == before


def test_ipv6_between_namespaces(virt: AddressVirtualizer, apps, two_nodes) -> None:
    a, b = two_nodes
    server, client = connect_pair(apps, 6, B6, 6, B6, server_ns=b, client_ns=a)
    before = client.ask(), server.ask()
    assert before[0][1] == (B6, server.port)
    with client.copy() as c, server.copy() as s:
        cc = virt.add(c, CLIENT6, SERVER6)
        sc = virt.add(s, SERVER6, CLIENT6)
    assert client.ask() == (CLIENT6, SERVER6)
    assert server.ask() == (SERVER6, CLIENT6)
    assert sorted(virt.items()) == sorted([(cc, VirtualAddresses(CLIENT6, SERVER6)),
                                           (sc, VirtualAddresses(SERVER6, CLIENT6))])
    virt.remove(cc)
    virt.remove(sc)
    assert (client.ask(), server.ask()) == before


@pytest.mark.parametrize("client_family", [4, 6], ids=["inet-client", "dual-stack-client"])
def test_dual_stack_sockets_see_v4_mapped(virt: AddressVirtualizer, apps, two_nodes,
                                          client_family: int) -> None:
    """A dual-stack AF_INET6 server (and client) talking IPv4 shows the IPv4 overlay
    addresses v4-mapped, as it showed the real ones; an AF_INET client shows them plain."""
    a, b = two_nodes
    target = B4 if client_family == 4 else "::ffff:" + B4
    server, client = connect_pair(apps, 6, "::", client_family, target, server_ns=b,
                                  client_ns=a)
    assert server.ask()[1][0] == "::ffff:" + A4  # really dual-stack
    with client.copy() as c, server.copy() as s:
        assert s.family == socket.AF_INET6
        virt.add(c, CLIENT4, SERVER4)
        virt.add(s, mapped(SERVER4), CLIENT4)  # either spelling of an IPv4 address
    assert server.ask() == (mapped(SERVER4), mapped(CLIENT4))
    want_client = (CLIENT4, SERVER4) if client_family == 4 else (mapped(CLIENT4),
                                                                 mapped(SERVER4))
    assert client.ask() == want_client


def test_socket_created_by_the_daemon_and_handed_over(virt: AddressVirtualizer, apps,
                                                      two_nodes) -> None:
    """After a swap the app holds a socket the daemon made (host connection): it shows the
    overlay addresses in the app."""
    from ebpfrouter.testbed import netns_context

    a, b = two_nodes
    server = apps("server", 4, B4, netns=b)
    made: list[socket.socket] = []

    def make() -> None:  # a thread in netns a makes the socket, as the daemon does
        with netns_context(a):
            made.append(socket.create_connection((B4, server.port)))

    worker = threading.Thread(target=make)
    worker.start()
    worker.join()
    with made[0] as host_conn:
        real = host_conn.getsockname()
        app = apps("given", 4, fd=host_conn.fileno()).connected()
        virt.add(host_conn, CLIENT4, SERVER4)
    assert app.ask() == (CLIENT4, SERVER4)
    assert server.connected().ask() == ((B4, server.port), real)  # the other end: no entry


# --- restart, close, destroy ------------------------------------------------------------------

REOPEN = textwrap.dedent("""
    import json, sys
    from ebpfrouter.addrvirt import AddressVirtualizer
    from injector.inspect import pidfd_getfd
    pin_dir, cookie, pid, fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    v = AddressVirtualizer.open(pin_dir)
    out = {"had": cookie in v, "len": len(v), "links": v.link_ids, "progs": v.prog_ids}
    with pidfd_getfd(pid, fd) as s:
        out["added"] = v.add(s, ("10.244.3.3", 3333), ("10.244.4.4", 4444))
    v.close()
    print(json.dumps(out))
""")


def test_pinned_state_outlives_the_daemon_and_serves_a_new_one(pin_dir: str, apps,
                                                               two_nodes) -> None:
    a, b = two_nodes
    server, client = connect_pair(apps, 4, B4, 4, B4, server_ns=b, client_ns=a)
    server2, client2 = connect_pair(apps, 4, B4, 4, B4, server_ns=b, client_ns=a)
    v = AddressVirtualizer.open(pin_dir)
    first = objects(v)
    with client.copy() as c:
        cookie = v.add(c, CLIENT4, SERVER4)
    v.close()  # the daemon exits: pins keep it all
    assert sorted(os.listdir(pin_dir)) == sorted(["addrs", *(h.name for h in HOOKS)])
    assert first["link"] <= bpftool_ids("link") and first["map"] <= bpftool_ids("map")
    assert client.ask() == (CLIENT4, SERVER4)

    # A new daemon process re-opens it: same links and map, its own programs, entries kept.
    out = subprocess.run([sys.executable, "-c", REOPEN, pin_dir, str(cookie),
                          str(client2.proc.pid), str(client2.fd)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    got = json.loads(out.stdout)
    assert got["had"] is True and got["len"] == 1
    assert set(got["links"]) == first["link"]
    assert set(got["progs"]).isdisjoint(first["prog"])
    assert wait_gone("prog", first["prog"]) == set()  # replaced programs are unloaded
    assert client.ask() == (CLIENT4, SERVER4)
    assert client2.ask() == (("10.244.3.3", 3333), ("10.244.4.4", 4444))

    # A restarted daemon drops what it no longer knows.
    with AddressVirtualizer.open(pin_dir) as again:
        assert again.prune(keep={got["added"]}) == 1
        assert again.cookies() == [got["added"]]
        assert again.map_id in first["map"]
    assert client.ask()[1] == (B4, server.port)
    assert client2.ask()[1] == ("10.244.4.4", 4444)


def test_prune_with_the_live_sockets_drops_the_closed_ones(virt: AddressVirtualizer) -> None:
    """tcp_socket_cookies() (sock_diag) lists the sockets that still exist, TIME_WAIT
    included; pruning with it drops only entries of sockets gone for good."""
    with socket.create_server(("127.0.0.1", 0)) as ls:
        client = socket.create_connection(ls.getsockname())
        served, _ = ls.accept()
        other = socket.create_connection(ls.getsockname())
        other_served, _ = ls.accept()
        cookies = {name: virt.add(s, CLIENT4, SERVER4) for name, s in
                   (("client", client), ("served", served), ("other", other))}
        assert set(cookies.values()) | {socket_cookie(ls)} <= tcp_socket_cookies()
        client.close()  # first to close: TIME_WAIT, which keeps the cookie
        served.close()  # then gone once its FIN is acknowledged
        deadline = time.monotonic() + 3
        while cookies["served"] in tcp_socket_cookies() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert virt.prune(tcp_socket_cookies()) == 1
        assert sorted(virt.cookies()) == sorted([cookies["client"], cookies["other"]])
        assert other.getpeername() == SERVER4
        other.close()
        other_served.close()


def test_destroy_leaves_nothing(pin_dir: str, apps) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = apps("client", 4, "127.0.0.1", server.getsockname()[1]).connected()
        v = AddressVirtualizer.open(pin_dir)
        ids = objects(v)
        assert ids["link"] <= bpftool_ids("link") and ids["prog"] <= bpftool_ids("prog")
        with client.copy() as c:
            v.add(c, CLIENT4, SERVER4)
        assert client.ask()[1] == SERVER4
        v.destroy()
        assert v.closed
        assert not os.path.exists(pin_dir)
        assert_all_gone(ids)
        assert client.ask()[1] == server.getsockname()


def test_destroy_detaches_even_while_another_process_holds_it(pin_dir: str, apps) -> None:
    """destroy() detaches the links outright (BPF_LINK_DETACH): an old daemon still running
    with the same pins open cannot keep rewriting."""
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = apps("client", 4, "127.0.0.1", server.getsockname()[1]).connected()
        with AddressVirtualizer.open(pin_dir) as old, client.copy() as c:
            old.add(c, CLIENT4, SERVER4)
            with AddressVirtualizer.open(pin_dir) as new:
                ids = objects(old) | {"prog": set(old.prog_ids) | set(new.prog_ids)}
                new.destroy()
            assert client.ask()[1] == server.getsockname()  # old's fds are still open
        assert_all_gone(ids)


def test_close_unpinned_detaches(apps) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with server:
        client = apps("client", 4, "127.0.0.1", server.getsockname()[1]).connected()
        with AddressVirtualizer.open(None) as v, client.copy() as c:
            ids = objects(v)
            v.add(c, CLIENT4, SERVER4)
            assert client.ask()[1] == SERVER4
        assert_all_gone(ids)
        assert client.ask()[1] == server.getsockname()


# --- limits -------------------------------------------------------------------------------------


@pytest.fixture
def child_cgroup(unique_name: str) -> Iterator[str]:
    """A fresh child cgroup of the cgroup2 root; whatever is still in it at the end is
    killed, then it is removed (even on failure)."""
    path = os.path.join(cgroup2_root(), unique_name)
    os.mkdir(path)
    try:
        yield path
    finally:
        deadline = time.monotonic() + 5
        while True:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
            if not pids or time.monotonic() > deadline:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        os.rmdir(path)


def test_the_sockets_cgroup_decides_not_the_callers(apps, child_cgroup: str) -> None:
    """Attached to a child cgroup, only sockets *created* by a process in it are rewritten;
    a socket made outside stays real even in a process inside. (Host sockets are made by
    the daemon: attach where the daemon is, the root by default.)"""
    with AddressVirtualizer.open(None, cgroup=child_cgroup) as v, \
            socket.create_server(("127.0.0.1", 0)) as listener, \
            socket.create_connection(listener.getsockname()) as outside_made:
        inside = apps("client", 4, "127.0.0.1", listener.getsockname()[1],
                      cgroup=child_cgroup).connected()
        given = apps("given", 4, fd=outside_made.fileno(), cgroup=child_cgroup).connected()
        with inside.copy() as c:
            v.add(c, CLIENT4, SERVER4)
        v.add(outside_made, CLIENT4, SERVER4)
        assert inside.ask() == (CLIENT4, SERVER4)
        assert given.ask()[1] == listener.getsockname()
        assert v.cgroup == child_cgroup


def test_full_map_is_a_clear_error() -> None:
    socks = [socket.socket() for _ in range(4)]
    try:
        with AddressVirtualizer.open(None, max_entries=3) as v:
            assert v.max_entries == 3
            cookies = [v.add(s, CLIENT4, SERVER4) for s in socks[:3]]
            with pytest.raises(AddressTableFull, match=r"map is full \(3 sockets\); remove\(\)"):
                v.add(socks[3], CLIENT4, SERVER4)
            assert v.add(socks[0], SERVER4, CLIENT4) == cookies[0]  # replacing still works
            assert v.get(cookies[0]) == VirtualAddresses(SERVER4, CLIENT4)
            v.remove(cookies[1])
            v.add(socks[3], CLIENT4, SERVER4)
            assert len(v) == 3
    finally:
        for s in socks:
            s.close()


def test_bad_input_is_refused(virt: AddressVirtualizer, tmp_path) -> None:
    r, w = os.pipe()
    inet, inet6, unix = socket.socket(), socket.socket(socket.AF_INET6), socket.socket(
        socket.AF_UNIX)
    closed = socket.socket()
    closed.close()
    try:
        with pytest.raises(ValueError, match=f"fd {r} is not an open socket: Socket operation "
                           "on non-socket"):
            virt.add(r, CLIENT4, SERVER4)
        with pytest.raises(ValueError, match="is not an open socket: Bad file descriptor"):
            virt.add(w + 1000, CLIENT4, SERVER4)
        with pytest.raises(ValueError, match="is closed"):
            virt.add(closed, CLIENT4, SERVER4)
        with pytest.raises(ValueError, match="is an AF_UNIX socket; only AF_INET and AF_INET6"):
            virt.add(unix, CLIENT4, SERVER4)
        with pytest.raises(TypeError, match="expected a socket or an fd number"):
            virt.add("3", CLIENT4, SERVER4)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="an AF_INET socket cannot show IPv6 addresses"):
            virt.add(inet, CLIENT6, SERVER6)
        with pytest.raises(ValueError, match="are of different families"):
            virt.add(inet6, CLIENT4, SERVER6)
        with pytest.raises(ValueError, match="peer address 'nope' is not an IP address"):
            virt.add(inet, CLIENT4, ("nope", 1))
        for port in (0, 65536, "80", True):
            with pytest.raises(ValueError, match="local port .* is not in 1..65535"):
                virt.add(inet, ("10.0.0.1", port), SERVER4)
        with pytest.raises(ValueError, match=r"local address must be \(ip, port\)"):
            virt.add(inet, "10.0.0.1:80", SERVER4)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="a scope id cannot be virtualized"):
            virt.add(inet6, ("fe80::1%lo", 80), ("fe80::2", 81))
        assert len(virt) == 0
        with pytest.raises(ValueError, match="max_entries 0"):
            AddressVirtualizer.open(None, max_entries=0)
    finally:
        for s in (inet, inet6, unix):
            s.close()
        os.close(r)
        os.close(w)


def test_unavailable_says_why(pin_dir: str, tmp_path, unique_name: str) -> None:
    with pytest.raises(VirtualizationUnavailable, match=f"{tmp_path} is not a cgroup v2 "
                       "directory") as info:
        AddressVirtualizer.open(None, cgroup=str(tmp_path))
    assert "not a cgroup v2 directory" in info.value.reason
    with pytest.raises(VirtualizationUnavailable, match="No such file or directory"):
        AddressVirtualizer.open(None, cgroup=str(tmp_path / "none"))
    with pytest.raises(VirtualizationUnavailable, match="is not on a bpf file system"):
        AddressVirtualizer.open(str(tmp_path / "pins"))
    # A map of another layout pinned where ours should be: refused, and left alone.
    os.makedirs(pin_dir)
    with Map.create("hash", key_size=8, value_size=8, max_entries=4, name=unique_name) as m:
        m.pin(os.path.join(pin_dir, "addrs"))
    before = bpftool_ids("link")
    with pytest.raises(VirtualizationUnavailable, match="is a hash map with 8-byte keys and "
                       "8-byte values, not this version's hash map of 8 and 40; remove .*"
                       "destroy_pinned"):
        AddressVirtualizer.open(pin_dir)
    assert os.listdir(pin_dir) == ["addrs"]
    assert bpftool_ids("link") - before == set()


def test_failed_open_undoes_what_it_pinned(pin_dir: str, unique_name: str) -> None:
    """Something that is not a link pinned where a link should be: the open fails and the
    pins it made (map, earlier links) are gone again, detached."""
    os.makedirs(pin_dir)
    with Map.create("array", value_size=4, max_entries=1, name=unique_name) as m:
        m.pin(os.path.join(pin_dir, "getsockname4"))
    before = bpftool_ids("link")
    with pytest.raises(VirtualizationUnavailable, match="is pinned but is not a BPF link"):
        AddressVirtualizer.open(pin_dir)
    assert os.listdir(pin_dir) == ["getsockname4"]
    assert wait_gone("link", bpftool_ids("link") - before) == set()


# --- privileges ---------------------------------------------------------------------------------


def in_child(keep: set[str], act: Callable[[AddressVirtualizer | None], Any],
             open_first: bool = False) -> Any:
    """Fork; in the child (optionally open a virtualizer with full privileges), drop to
    `keep`, run `act`; return its result or ("error", type, message, errno of the cause)."""
    from ebpfrouter.privileges import drop_privileges

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            v = AddressVirtualizer.open(None) if open_first else None
            drop_privileges(keep)
            out = act(v)
        except BaseException as exc:  # noqa: BLE001
            out = ("error", type(exc).__name__, str(exc), getattr(exc.__cause__, "errno", None))
        os.write(w, pickle.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _open_and_count(_: AddressVirtualizer | None) -> Any:
    with AddressVirtualizer.open(None) as v:
        return len(v)


def _add_and_remove(v: AddressVirtualizer | None) -> Any:
    assert v is not None
    with socket.socket() as s:
        cookie = v.add(s, CLIENT4, SERVER4)
        return v.get(cookie) == VirtualAddresses(CLIENT4, SERVER4) and v.remove(cookie)


@pytest.mark.parametrize("keep, works", [
    (set(), False),
    ({"CAP_BPF"}, False),
    ({"CAP_BPF", "CAP_PERFMON"}, False),
    ({"CAP_NET_ADMIN"}, False),
    ({"CAP_BPF", "CAP_NET_ADMIN"}, True),
    ({"CAP_SYS_ADMIN"}, True),
])
def test_open_needs_bpf_and_net_admin_or_sys_admin(keep: set[str], works: bool) -> None:
    out = in_child(keep, _open_and_count)
    if works:
        assert out == 0
    else:
        assert out[:2] == ("error", "VirtualizationUnavailable"), out
        assert out[3] == errno.EPERM and "Operation not permitted" in out[2]
        assert "needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN" in out[2]


def test_add_and_remove_need_no_capability() -> None:
    assert in_child(set(), _add_and_remove, open_first=True) is True
