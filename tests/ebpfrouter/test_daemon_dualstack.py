"""Dual-stack apps on the testbed (root): a swap keeps the app's socket family.

Go, Java, nginx `listen [::]` and Python's `create_server(..., dualstack_ipv6=True)` talk IPv4
over AF_INET6 sockets with v4-mapped addresses. After a swap each app must still hold a socket
of its own family (the host socket is AF_INET6 too, connected over `::ffff:<host ip>`), with
IPPROTO_IPV6 options working, and every byte intact both ways.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import test_daemon as td  # the daemon tests' testbed, routers and helpers
from test_daemon import counters, wait_for, wait_listener_announced
from truepeer import kernel_row

from ebpfrouter.demo import wait_line
from ebpfrouter.runners.hostconn import host_sockaddr, host_socket
from ebpfrouter.scoping import normalize_addr

bed = td.bed  # fixtures, shared by name
_shared_holder = td._shared_holder
shared = td.shared

PORT = 7400

# One program for both ends: a paced, checked byte stream each way (each direction its own
# 64 KiB pseudo-random block, repeated) until the stop file appears; then note what the app's own
# fd looks like now (after the swap), SHUT_WR, read to EOF and report.
APP = r"""
import json, os, random, socket, sys, threading, time
role, fam, host, port, stop = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
B = 65536
MINE = random.Random(role).randbytes(B)
THEIRS = random.Random("client" if role == "server" else "server").randbytes(B)
family = socket.AF_INET6 if fam == "inet6" else socket.AF_INET
if role == "server":
    if family == socket.AF_INET6:
        ls = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
        ls = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    sock, _ = ls.accept()
else:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(("::ffff:" + host if family == socket.AF_INET6 else host, port))
first_peer = sock.getpeername()
sent = 0
now = {}
def send():
    global sent
    while not os.path.exists(stop):
        i = sent % B
        chunk = MINE[i:i + 8192]
        sock.sendall(chunk)
        sent += len(chunk)
        time.sleep(0.002)
    try:  # the fd as it is now, while still connected
        v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
    except OSError as e:
        v6only = f"{type(e).__name__}: {e}"
    now.update(family=sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN), v6only=v6only,
               sockname=sock.getsockname(), peername=sock.getpeername())
    sock.shutdown(socket.SHUT_WR)
writer = threading.Thread(target=send)
writer.start()
got = bad = 0
first_bad = None
while True:
    data = sock.recv(65536)
    if not data:
        break
    off, view, want = got, memoryview(data), bytearray()
    while len(want) < len(data):
        i = off % B
        take = min(len(data) - len(want), B - i)
        want += THEIRS[i:i + take]
        off += take
    if view != want:
        bad += 1
        first_bad = got if first_bad is None else first_bad
    got += len(data)
writer.join()
print(json.dumps({**now, "first_peer": first_peer, "sent": sent, "received": got,
                  "bad_chunks": bad, "first_bad": first_bad}), flush=True)
"""

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}


def app_socket(pid: int) -> tuple[int, str] | None:
    """(family, peer address) of the connected TCP socket of `pid`, as its fd holds it now."""
    for name in os.listdir(f"/proc/{pid}/fd"):  # the kernel's view (getpeername: virtualized)
        row = kernel_row(pid, int(name))
        if row is not None:
            return row.family, row.raddr
    return None


def _swapped(pid: int) -> tuple[int, str] | None:
    found = app_socket(pid)
    return found if found and str(normalize_addr(found[1])).startswith("192.168.77.") else None


def _report(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return json.loads(out)


def _host(family: int, ip: str) -> str:
    return host_sockaddr(family, ip, 0)[0]


def test_host_socket_and_sockaddr() -> None:
    """No root: an AF_INET6 host socket is dual-stack and reaches IPv4 through v4-mapped."""
    assert host_sockaddr(socket.AF_INET, "192.168.77.1", 80) == ("192.168.77.1", 80)
    assert host_sockaddr(socket.AF_INET6, "192.168.77.1", 80) == ("::ffff:192.168.77.1", 80)
    assert host_sockaddr(socket.AF_INET6, "fd00::1", 80) == ("fd00::1", 80)
    with socket.create_server(("127.0.0.1", 0)) as lst, host_socket(socket.AF_INET6) as s:
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        s.connect(host_sockaddr(socket.AF_INET6, *lst.getsockname()))
        assert s.getsockname()[0] == "::ffff:127.0.0.1"
        lst.accept()[0].close()
    with pytest.raises(ValueError, match="AF_INET and AF_INET6"):
        host_socket(socket.AF_UNIX)


@pytest.mark.root
@pytest.mark.parametrize(("client_fam", "server_fam"),
                         [("inet6", "inet6"), ("inet", "inet6"), ("inet6", "inet")])
def test_swap_keeps_each_apps_socket_family(bed, shared, client_fam, server_fam):
    """A dual-stack server (`create_server(("::", port), dualstack_ipv6=True)`) and a client on
    the other node, AF_INET6 to `::ffff:<pod ip>` or plain AF_INET (and the mirror case):
    each app's fd keeps its own family across the swap, now over the host addresses."""
    routers = shared
    server, client = bed.pod("n1p0"), bed.pod("n2p0")
    host1, host2 = bed.node("node1").underlay_ip, bed.node("node2").underlay_ip
    cf, sf = FAMILIES[client_fam], FAMILIES[server_fam]
    port = PORT + list(FAMILIES).index(client_fam) * 2 + list(FAMILIES).index(server_fam)
    before = counters(routers, "node2")["bypassed_client"]
    tmp = Path(tempfile.mkdtemp(prefix="ds-"))
    stop = tmp / "stop"
    srv = bed.popen(server.name, [sys.executable, "-c", APP, "server", server_fam, "", str(port),
                                  str(stop)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True)
    cli = None
    try:
        wait_line(srv, "listening")
        wait_listener_announced(routers, "node1", port)
        listener = next(lst for lst in routers.status("node1")["listeners"]
                        if lst["overlay"] == f"{server.ip}:{port}")
        assert listener["family"] == server_fam, listener  # the host listener matches the app's
        cli = bed.popen(client.name, [sys.executable, "-c", APP, "client", client_fam, server.ip,
                                      str(port), str(stop)], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        # seen from outside: both fds now hold host-network sockets of the apps' own families
        assert wait_for(lambda: _swapped(cli.pid), 15, "client swapped") == (cf, _host(cf, host1))
        assert wait_for(lambda: _swapped(srv.pid), 10, "server swapped") == (sf, _host(sf, host2))
        time.sleep(0.5)  # keep streaming over the host connection
        stop.touch()
        creport, sreport = _report(cli), _report(srv)
    finally:
        stop.touch()
        for proc in (cli, srv):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        stop.unlink(missing_ok=True)
        tmp.rmdir()
    print("client:", creport, "\nserver:", sreport)
    # seen from inside each app, after the swap: its own family, and the overlay addresses
    # still (address virtualization; v4-mapped for a dual-stack AF_INET6 socket)
    for report, fam, me, peer in ((creport, cf, client.ip, server.ip),
                                  (sreport, sf, server.ip, client.ip)):
        assert report["family"] == fam, report
        assert report["first_peer"][0] == _host(fam, peer), report  # began on the overlay
        assert report["sockname"][0] == _host(fam, me), report
        assert report["peername"][0] == _host(fam, peer), report
        if fam == socket.AF_INET6:
            assert report["v6only"] == 0, report  # IPPROTO_IPV6 options still work
            assert len(report["sockname"]) == 4, report  # a sockaddr_in6
        else:
            assert len(report["sockname"]) == 2, report
        assert report["bad_chunks"] == 0, report
    assert creport["sent"] == sreport["received"] > 200_000, (creport, sreport)
    assert sreport["sent"] == creport["received"] > 200_000, (creport, sreport)
    assert counters(routers, "node2")["bypassed_client"] == before + 1
    assert routers.status("node1")["daemon"].get("family_mismatch", 0) == 0
    wait_for(lambda: all(not routers.status(n)["frozen_now"] for n in ("node1", "node2")), 10,
             "nothing frozen")
