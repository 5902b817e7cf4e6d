"""Address virtualization, the kernel side: after a swap, `getsockname()`/`getpeername()` on the
app's fd answer with the overlay addresses the app would have seen, not the host ones.

Four cgroup sock_addr programs, attached with BPF links to a cgroup v2 directory (the root
by default), run at the end of the kernel's `getpeername`/`getsockname` for IPv4 and IPv6
sockets. Each takes the socket's cookie
(`bpf_get_socket_cookie`, the same number as `SO_COOKIE` on any fd of that socket), looks it
up in a hash map the daemon fills, and if found rewrites the address and port the caller
gets. Sockets without an entry are untouched. The hooks decide by the *socket's* cgroup (that
of the process that created it: the daemon, for host connections), not the caller's.

Why cgroup hooks and not `bpf_probe_write_user` at the syscall's exit: kernel lockdown
(integrity) refuses that helper; these hooks are an ordinary, supported rewrite of the
sockaddr before it is copied out. See docs/address-virtualization.md.

Map value (40 bytes, one per swapped socket), two sides, local then peer:

    u16 family      AF_INET or AF_INET6 of the *overlay* address (native order)
    u8  port[2]     network order
    u8  addr[16]    IPv6, or IPv4 v4-mapped (::ffff:a.b.c.d)

An AF_INET6 socket shows IPv4 overlay addresses v4-mapped; an AF_INET socket can only show
IPv4 ones (`add` refuses IPv6 for it).

With a `pin_dir` the map and the four links are pinned there, so the rewrite outlives the
daemon: a restarted daemon calls `open(pin_dir)` again (fresh programs replace the pinned
links' ones, the entries are kept) and `prune()`s the sockets it no longer knows.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from bpf_asm import bpffs
from bpf_asm.attach import Link, attach_cgroup
from bpf_asm.builder import Builder
from bpf_asm.cgroup import NotCgroup2Error, cgroup2_root, cgroup_id
from bpf_asm.isa import R0, R1, R2, R6, R10, Instructions
from bpf_asm.maps import BPF_F_NO_PREALLOC, Map
from bpf_asm.programs import Program, load_program
from bpf_asm.syscall import AttachType, BPFError, LinkType, MapType

__all__ = [
    "MAX_ENTRIES", "AddressTableFull", "AddressVirtualizer", "VirtualAddresses",
    "VirtualizationUnavailable", "socket_cookie", "tcp_socket_cookies",
]

MAX_ENTRIES = 65_536
SO_COOKIE = 57

KEY = struct.Struct("=Q")
_SIDE = struct.Struct("=H2s16s")
VALUE = struct.Struct("=H2s16sH2s16s")
LOCAL, PEER = 0, _SIDE.size  # offsets of the two sides in a value
_OFF_FAMILY, _OFF_PORT, _OFF_ADDR = 0, 2, 4

# struct bpf_sock_addr (UAPI): where the programs write.
CTX_USER_IP4 = 4
CTX_USER_IP6 = 8  # four u32, network order
CTX_USER_PORT = 24  # u32 holding the __be16 port

MAP_PIN = "addrs"
MAP_NAME = "er_addrvirt"

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Hook:
    """One of the four programs: which syscall result it rewrites, from which side."""

    name: str  # also its pin name
    prog_name: str
    attach_type: AttachType
    side: int  # LOCAL or PEER
    ipv6: bool


HOOKS = (
    Hook("getpeername4", "er_av_peer4", AttachType.CGROUP_INET4_GETPEERNAME, PEER, False),
    Hook("getpeername6", "er_av_peer6", AttachType.CGROUP_INET6_GETPEERNAME, PEER, True),
    Hook("getsockname4", "er_av_sock4", AttachType.CGROUP_INET4_GETSOCKNAME, LOCAL, False),
    Hook("getsockname6", "er_av_sock6", AttachType.CGROUP_INET6_GETSOCKNAME, LOCAL, True),
)


class VirtualizationUnavailable(RuntimeError):
    """The kernel, the cgroup setup, bpffs or our capabilities refuse address
    virtualization; `reason` says which. The router still works, apps then see host
    addresses after a swap."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"address virtualization unavailable: {reason}")
        self.reason = reason


class AddressTableFull(RuntimeError):
    """The map has no room for another socket (its size is fixed at creation)."""


@dataclass(frozen=True)
class VirtualAddresses:
    """What a virtualized socket shows: `local` for getsockname, `peer` for getpeername."""

    local: Endpoint
    peer: Endpoint


def hook_program(hook: Hook) -> Instructions:
    """The program for `hook`, with the map referenced by the name "addrs"."""
    b = Builder()
    b.mov64(R6, R1)                          # r6 = ctx (struct bpf_sock_addr *)
    b.call("get_socket_cookie")              # r1 = ctx
    b.stxdw(R10, R0, -8)
    b.mov64(R2, R10)
    b.add64(R2, -8)
    b.ld_map_fd(R1, MAP_PIN)
    b.call("map_lookup_elem")
    b.jeq(R0, 0, "out")
    side = hook.side
    if hook.ipv6:
        for word in range(4):
            b.ldxw(R1, R0, side + _OFF_ADDR + 4 * word)
            b.stxw(R6, R1, CTX_USER_IP6 + 4 * word)
    else:
        b.ldxh(R1, R0, side + _OFF_FAMILY)
        b.jne(R1, socket.AF_INET, "out")     # an IPv6 overlay address cannot be shown
        b.ldxw(R1, R0, side + _OFF_ADDR + 12)  # the IPv4 part of ::ffff:a.b.c.d
        b.stxw(R6, R1, CTX_USER_IP4)
    b.ldxh(R1, R0, side + _OFF_PORT)         # network-order bytes: a u16 load is htons()
    b.stxw(R6, R1, CTX_USER_PORT)
    b.label("out")
    b.mov64(R0, 1)                           # getpeername/getsockname hooks must return 1
    b.exit()
    return b.build()


def socket_cookie(sock: socket.socket | int) -> int:
    """The socket's cookie (SO_COOKIE): the same for every fd of one socket, in any process,
    and never reused within a boot. ValueError for anything but an open socket."""
    return _inspect(sock)[1]


def _inspect(sock: socket.socket | int) -> tuple[int, int]:
    """(family, cookie) of the socket at `sock` (a socket or an fd number, not taken over)."""
    if isinstance(sock, socket.socket):
        fd = sock.fileno()
        if fd < 0:
            raise ValueError(f"{sock!r} is closed")
    elif isinstance(sock, int) and not isinstance(sock, bool):
        fd = sock
    else:
        raise TypeError(f"expected a socket or an fd number, not {sock!r}")
    try:
        view = socket.socket(fileno=fd)
    except OSError as e:
        raise ValueError(f"fd {fd} is not an open socket: {os.strerror(e.errno or 0)}") from None
    try:
        family = view.family
        cookie = KEY.unpack(view.getsockopt(socket.SOL_SOCKET, SO_COOKIE, KEY.size))[0]
    finally:
        view.detach()
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"fd {fd} is an {socket.AddressFamily(family).name} socket; only "
                         "AF_INET and AF_INET6 sockets can be virtualized")
    return int(family), int(cookie)


TCP_ALL_STATES = (1 << 12) - 1  # TCP_ESTABLISHED .. TCP_NEW_SYN_RECV, as inet_diag counts


def tcp_socket_cookies() -> set[int]:
    """The cookies of the TCP sockets of the caller's network namespace (a sock_diag dump,
    IPv4 and IPv6, every state, TIME_WAIT included). Only sockets the kernel has hashed show
    up: listening, connecting, connected or closing ones, not a bare socket() never bound.

    A restarted daemon, in the host netns where the host connections live, can
    `prune(tcp_socket_cookies())` to drop the entries of sockets closed while it was away."""
    from pyroute2 import DiagSocket

    cookies: set[int] = set()
    with DiagSocket() as diag:
        diag.bind()
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in diag.get_sock_stats(family=family, states=TCP_ALL_STATES):
                cookies.add(int(msg["idiag_cookie"]))
    return cookies


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoint(value: object, what: str) -> tuple[_IP, int]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{what} address must be (ip, port), not {value!r}")
    host, port = value
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} address {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            raise ValueError(f"{what} address {host!r}: a scope id cannot be virtualized")
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{what} port {port!r} is not in 1..65535")
    return ip, port


def _pack_side(ip: _IP, port: int) -> bytes:
    if isinstance(ip, ipaddress.IPv4Address):
        return _SIDE.pack(socket.AF_INET, port.to_bytes(2, "big"), b"\0" * 10 + b"\xff\xff"
                          + ip.packed)
    return _SIDE.pack(socket.AF_INET6, port.to_bytes(2, "big"), ip.packed)


def _unpack_side(family: int, port: bytes, addr: bytes) -> Endpoint:
    ip: _IP = (ipaddress.IPv4Address(addr[12:]) if family == socket.AF_INET
               else ipaddress.IPv6Address(addr))
    return str(ip), int.from_bytes(port, "big")


def _decode(value: bytes) -> VirtualAddresses:
    f1, p1, a1, f2, p2, a2 = VALUE.unpack(value)
    return VirtualAddresses(_unpack_side(f1, p1, a1), _unpack_side(f2, p2, a2))


class AddressVirtualizer:
    """The map of virtualized sockets and the four attached programs. A context manager:
    leaving it (or `close()`) keeps whatever is pinned; `destroy()` removes everything."""

    def __init__(self, addrs: Map, progs: list[Program], links: list[Link],
                 pin_dir: str | None, cgroup: str) -> None:
        self._map = addrs
        self._progs = progs
        self._links = links
        self.pin_dir = pin_dir
        self.cgroup = cgroup

    # --- life --------------------------------------------------------------------------------

    @classmethod
    def open(cls, pin_dir: str | None, cgroup: str | None = None, *,
             max_entries: int = MAX_ENTRIES) -> AddressVirtualizer:
        """Load the programs and attach them to cgroup v2 directory `cgroup` (default: the
        root of the cgroup2 mount, mounted if missing). With `pin_dir` (on bpffs) the map and
        links are pinned there, and re-opened with their entries if already there; without,
        everything lives until `close()`. `max_entries` sizes a new map only.

        Raises VirtualizationUnavailable naming the reason the kernel, the cgroup, bpffs or
        the capabilities refuse."""
        if not 0 < max_entries < 1 << 32:
            raise ValueError(f"max_entries {max_entries} is not in 1..2**32-1")
        try:
            return cls._open(pin_dir, cgroup, max_entries)
        except VirtualizationUnavailable:
            raise
        except NotCgroup2Error as e:
            raise VirtualizationUnavailable(str(e)) from e
        except BPFError as e:
            raise VirtualizationUnavailable(_explain(e)) from e
        except (OSError, ValueError) as e:  # a missing cgroup, a pin that is not a link
            raise VirtualizationUnavailable(str(e)) from e

    @classmethod
    def _open(cls, pin_dir: str | None, cgroup: str | None,
              max_entries: int) -> AddressVirtualizer:
        if cgroup is None:
            cgroup = cgroup2_root()
        cgroup = os.path.abspath(cgroup)
        cg_id = cgroup_id(cgroup)
        if pin_dir is not None:
            pin_dir = _prepare_pin_dir(pin_dir)
        created: list[str] = []  # pins made by this call, undone if it fails
        opened: list[Map | Program | Link] = []
        try:
            addrs = _open_map(pin_dir, max_entries, created)
            opened.append(addrs)
            progs: list[Program] = []
            for hook in HOOKS:
                progs.append(load_program(
                    hook_program(hook).with_maps({MAP_PIN: addrs}), "cgroup_sock_addr",
                    name=hook.prog_name, attach_type=hook.attach_type))
                opened.append(progs[-1])
            links = []
            for hook, prog in zip(HOOKS, progs, strict=True):
                links.append(_link(hook, prog, cgroup, cg_id, pin_dir, created))
                opened.append(links[-1])
        except BaseException:
            for path in reversed(created):
                if os.path.basename(path) != MAP_PIN:
                    with contextlib.suppress(OSError, ValueError), \
                            Link.open_pinned(path) as link:
                        link.detach()
                with contextlib.suppress(OSError):
                    os.unlink(path)
            for obj in opened:
                obj.close()
            if pin_dir is not None:
                with contextlib.suppress(OSError):
                    os.rmdir(pin_dir)  # only if this call left it empty
            raise
        return cls(addrs, progs, links, pin_dir, cgroup)

    def close(self) -> None:
        """Close our fds. Pinned objects stay attached and keep their entries; without a pin
        dir this detaches the programs and frees the map."""
        for obj in (*self._links, *self._progs, self._map):
            obj.close()

    def destroy(self) -> None:
        """Detach the programs, drop the map, unpin everything and remove the pin dir."""
        for link in self._links:
            if not link.closed:
                link.detach()
        if self.pin_dir is not None:
            self.destroy_pinned(self.pin_dir)
        self.close()

    @staticmethod
    def destroy_pinned(pin_dir: str) -> bool:
        """Detach the links pinned in `pin_dir`, unpin them and the map, remove the dir if
        that empties it, without loading anything. Returns whether anything was there."""
        found = False
        for hook in HOOKS:
            path = os.path.join(pin_dir, hook.name)
            if not os.path.lexists(path):
                continue
            found = True
            with contextlib.suppress(OSError, ValueError), Link.open_pinned(path) as link:
                link.detach()
            os.unlink(path)
        path = os.path.join(pin_dir, MAP_PIN)
        if os.path.lexists(path):
            found = True
            os.unlink(path)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(pin_dir)
        return found

    def __enter__(self) -> AddressVirtualizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._map.closed

    # --- entries -----------------------------------------------------------------------------

    def add(self, sock: socket.socket | int, local: Endpoint, peer: Endpoint) -> int:
        """Make `sock` (any fd of the app's socket, e.g. the daemon's pidfd_getfd copy) show
        `local` to getsockname and `peer` to getpeername, in every process that holds it.
        Replaces an earlier entry for the same socket. Returns the socket's cookie.

        ValueError for a non-inet socket, a bad address, mixed families, or IPv6 addresses
        for an AF_INET socket; AddressTableFull when the map is full."""
        family, cookie = _inspect(sock)
        lip, lport = _endpoint(local, "local")
        pip, pport = _endpoint(peer, "peer")
        if lip.version != pip.version:
            raise ValueError(f"local {local!r} and peer {peer!r} are of different families")
        if family == socket.AF_INET and lip.version == 6:
            raise ValueError(f"an AF_INET socket cannot show IPv6 addresses ({local!r}, "
                             f"{peer!r})")
        value = _pack_side(lip, lport) + _pack_side(pip, pport)
        try:
            self._map.update(KEY.pack(cookie), value)
        except BPFError as e:
            if e.errno == errno.E2BIG:
                raise AddressTableFull(
                    f"address virtualization map is full ({self._map.max_entries} sockets); "
                    "remove() closed sockets or prune()") from None
            raise
        return cookie

    def remove(self, cookie: int) -> bool:
        """Forget socket `cookie` (getsockname/getpeername answer the truth again); returns
        False if it had no entry."""
        return self._map.delete(KEY.pack(cookie))

    def prune(self, keep: Iterable[int]) -> int:
        """Remove every entry whose cookie is not in `keep` (a restarted daemon passes the
        sockets it still knows, or `tcp_socket_cookies()`); returns how many were removed."""
        keep = set(keep)
        gone = [c for c in self.cookies() if c not in keep]
        return sum(self.remove(c) for c in gone)

    def get(self, cookie: int) -> VirtualAddresses | None:
        """The addresses socket `cookie` shows, or None."""
        data = self._map.lookup_bytes(KEY.pack(cookie))
        return None if data is None else _decode(data)

    def cookies(self) -> list[int]:
        """The cookies of every virtualized socket."""
        return [KEY.unpack(k)[0] for k in self._map]

    def items(self) -> Iterator[tuple[int, VirtualAddresses]]:
        """(cookie, addresses) for every virtualized socket."""
        for k, v in self._map.items():
            yield KEY.unpack(k)[0], _decode(v)

    def __contains__(self, cookie: object) -> bool:
        return isinstance(cookie, int) and self.get(cookie) is not None

    def __len__(self) -> int:
        return len(self._map)

    # --- introspection -----------------------------------------------------------------------

    @property
    def max_entries(self) -> int:
        return self._map.max_entries

    @property
    def map_id(self) -> int:
        return self._map.id

    @property
    def prog_ids(self) -> list[int]:
        return [p.id for p in self._progs]

    @property
    def link_ids(self) -> list[int]:
        return [link.id for link in self._links]

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"map fd={self._map.fd}"
        return f"<AddressVirtualizer cgroup={self.cgroup} pin_dir={self.pin_dir} {state}>"


def _prepare_pin_dir(pin_dir: str) -> str:
    pin_dir = os.path.abspath(pin_dir)
    try:
        bpffs.prepare_pin_path(os.path.join(pin_dir, MAP_PIN), "address virtualizer map")
    except ValueError as e:
        raise VirtualizationUnavailable(str(e)) from None
    os.makedirs(pin_dir, exist_ok=True)
    return pin_dir


def _open_map(pin_dir: str | None, max_entries: int, created: list[str]) -> Map:
    path = os.path.join(pin_dir, MAP_PIN) if pin_dir is not None else None
    if path is not None and os.path.lexists(path):
        addrs = Map.open_pinned(path)
        shape = (addrs.type, addrs.key_size, addrs.value_size)
        want = (MapType.HASH, KEY.size, VALUE.size)
        if shape != want:
            addrs.close()
            raise VirtualizationUnavailable(
                f"the map pinned at {path} is a {shape[0].name.lower()} map with {shape[1]}-byte "
                f"keys and {shape[2]}-byte values, not this version's hash map of {want[1]} and "
                f"{want[2]}; remove {pin_dir} (AddressVirtualizer.destroy_pinned) to start over")
        return addrs
    addrs = Map.create("hash", KEY.size, VALUE.size, max_entries, name=MAP_NAME,
                       flags=BPF_F_NO_PREALLOC)
    if path is not None:
        try:
            addrs.pin(path)
        except BaseException:
            addrs.close()
            raise
        created.append(path)
    return addrs


def _link(hook: Hook, prog: Program, cgroup: str, cg_id: int, pin_dir: str | None,
          created: list[str]) -> Link:
    """The hook's link: a pinned one still on `cgroup` gets `prog` (new code, same map);
    one pinned on another cgroup, or detached, is replaced by a new attachment."""
    path = os.path.join(pin_dir, hook.name) if pin_dir is not None else None
    if path is not None and os.path.lexists(path):
        link = Link.open_pinned(path)
        info = link.info()
        if (info.type == LinkType.CGROUP and info.cgroup.cgroup_id == cg_id
                and info.cgroup.attach_type == hook.attach_type):
            try:
                link.update(prog)
            except BaseException:
                link.close()
                raise
            return link
        with contextlib.suppress(BPFError):
            link.detach()
        link.close()
        os.unlink(path)
    link = attach_cgroup(prog, cgroup, hook.attach_type)
    if path is not None:
        try:
            link.pin(path)
        except BaseException:
            link.close()
            raise
        created.append(path)
    return link


def _explain(e: BPFError) -> str:
    """A reason for VirtualizationUnavailable: what the kernel refused, and the likely cause."""
    if e.errno in (errno.EPERM, errno.EACCES):
        if "MAP_CREATE" in e.op or "PROG_LOAD" in e.op:
            return (f"{e} (loading cgroup sock_addr programs needs CAP_BPF and CAP_NET_ADMIN, "
                    "or CAP_SYS_ADMIN)")
        return str(e)
    if e.errno in (errno.EINVAL, errno.E2BIG, errno.EOPNOTSUPP, 524) and "PROG_LOAD" in e.op:
        return (f"{e} (this kernel may lack the cgroup getpeername/getsockname hooks, which "
                "came in Linux 5.8)")
    return str(e)
