"""injector.epoll: fdinfo parsing, and finding the epoll sets that watch an fd in real processes."""

from __future__ import annotations

import os
import select
import socket

import pytest
from _swap_support import free_port, memcached_argv, redis_argv, running, server_fd
from _targets import FdTarget

from injector.epoll import (
    EpollEntry,
    EpollWatch,
    epoll_event_struct,
    epoll_fds,
    find_watchers,
    pack_epoll_event,
    parse_epoll_fdinfo,
    read_epoll_entries,
)

ALWAYS = select.EPOLLERR | select.EPOLLHUP  # epoll_ctl ADD/MOD always adds these

SAMPLE = """pos:\t0
flags:\t02000002
mnt_id:\t17
ino:\t1038
tfd:        4 events: 80000019 data:                4  pos:0 ino:2d83 sdev:9
tfd:       12 events:       19 data: deadbeef0000000c  pos:0 ino:1a sdev:800011
"""


def test_parse_fdinfo_sample():
    assert parse_epoll_fdinfo(SAMPLE) == [
        EpollEntry(tfd=4, events=0x80000019, data=4, pos=0, ino=0x2D83, sdev=9),
        EpollEntry(tfd=12, events=0x19, data=0xDEADBEEF0000000C, pos=0, ino=0x1A, sdev=0x800011),
    ]
    assert parse_epoll_fdinfo("pos:\t0\nflags:\t02\n") == []


def test_epoll_event_layout():
    assert epoll_event_struct("x86_64").size == 12  # packed on x86_64
    assert epoll_event_struct("aarch64").size == 16
    raw = pack_epoll_event(0x80000001, 0x1122334455667788, "x86_64")
    assert raw == bytes.fromhex("01000080") + bytes.fromhex("8877665544332211")
    assert pack_epoll_event(1, 2, "aarch64")[4:8] == b"\0" * 4


def test_own_epoll_set_is_read_back_exactly():
    ep = select.epoll()
    a, b = socket.socketpair()
    with ep, a, b:
        ep.register(a.fileno(), select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP)
        (e,) = read_epoll_entries(os.getpid(), ep.fileno())
        assert e.tfd == a.fileno() and e.ino == os.fstat(a.fileno()).st_ino
        assert e.events == select.EPOLLIN | select.EPOLLET | select.EPOLLRDHUP | ALWAYS
        assert (e.data & 0xFFFFFFFF) == a.fileno()
        assert ep.fileno() in epoll_fds(os.getpid())


@pytest.mark.root
def test_watchers_in_two_sets_with_distinct_data_and_reused_number():
    t = FdTarget()
    try:
        c, fd = t.connect()
        with c:
            assert find_watchers(t.pid, fd) == []
            assert t.cmd("epoll", 0, fd, hex(select.EPOLLIN | select.EPOLLET), "0xab00cd") == "ok"
            assert t.cmd("epoll", 1, fd, hex(select.EPOLLOUT), "0xfeedface12345678") == "ok"
            got = sorted(find_watchers(t.pid, fd), key=lambda w: w.epfd)
            assert got == [
                EpollWatch(t.epfds[0], select.EPOLLIN | select.EPOLLET | ALWAYS, 0xAB00CD),
                EpollWatch(t.epfds[1], select.EPOLLOUT | ALWAYS, 0xFEEDFACE12345678),
            ]
            # the app keeps the file alive at fd 50, closes fd, and the number gets reused:
            # the epoll entries still say tfd == fd, but they watch another file now.
            assert t.cmd("dupto", fd, 50) == "ok"
            assert t.cmd("close", fd) == "ok"
            c2, fd2 = t.connect()
            with c2:
                assert fd2 == fd
                assert find_watchers(t.pid, fd) == []
                entries = read_epoll_entries(t.pid, t.epfds[0])
                assert [e.tfd for e in entries] == [fd]  # stale entry, other inode
    finally:
        t.close()


@pytest.mark.root
@pytest.mark.parametrize("server", ["redis", "memcached"])
def test_real_servers_watch_client_fd(server):
    port = free_port()
    argv = redis_argv(port) if server == "redis" else memcached_argv(port)
    with running(argv, port) as p, socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(b"PING\r\n" if server == "redis" else b"version\r\n")
        assert c.recv(100)
        fd, inode = server_fd(p.pid, c)
        ws = find_watchers(p.pid, fd, inode)
        assert len(ws) == 1, ws
        assert ws[0].events & select.EPOLLIN
        assert ws[0].data & 0xFFFFFFFF == fd  # both store the fd as epoll data
        # other fd numbers are not reported
        assert find_watchers(p.pid, fd + 100, inode) == []
