"""Which processes hold each traced socket: followed through fork, close, exec and exit.

A socket is not tied to the process that made it. PostgreSQL's postmaster accepts, forks a
backend and closes its own copy; sshd and inetd-style servers do the same, pre-forked
workers (nginx, gunicorn, Apache) share the listener their master opened, and a client may
fork after connect. The tracer reports `FORK` (parent, child) for processes with tracked
sockets; this table gives the child the parent's holds, so that a close in one holder ends
nothing while another holder is left: the daemon then tells the engine `FdMoved` instead.

Plain data, no I/O: the daemon verifies a holder (its fd still is that socket) where it
matters, with `verify`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

Holder = tuple[int, int]  # (pid, fd)


class SocketHolders:
    """(pid, fd) holders of socket inodes; `max_sockets` bounds the table."""

    def __init__(self, max_sockets: int = 200_000) -> None:
        self.max_sockets = max_sockets
        self._by_inode: dict[int, set[Holder]] = {}
        self._inode_of: dict[Holder, int] = {}
        self._fds_of: dict[int, set[int]] = {}  # pid -> fds it holds (of traced sockets)
        self._since: dict[Holder, int] = {}  # when each hold began (a counter)
        self._clock = 0

    def __len__(self) -> int:
        return len(self._by_inode)

    def add(self, pid: int, fd: int, inode: int) -> bool:
        """Note that `pid` holds socket `inode` at `fd` (a reused fd number replaces its old
        socket). False if the table is full and `inode` is new."""
        key = (pid, fd)
        if self._inode_of.get(key) == inode:
            return True
        if key in self._inode_of:
            self.remove(pid, fd)
        if inode not in self._by_inode and len(self._by_inode) >= self.max_sockets:
            return False
        self._by_inode.setdefault(inode, set()).add(key)
        self._inode_of[key] = inode
        self._fds_of.setdefault(pid, set()).add(fd)
        self._clock += 1
        self._since[key] = self._clock
        return True

    def inode_of(self, pid: int, fd: int) -> int | None:
        """The socket `pid` holds at `fd`, if it is one of ours."""
        return self._inode_of.get((pid, fd))

    def holders(self, inode: int) -> set[Holder]:
        """Every (pid, fd) holding socket `inode` (a copy)."""
        return set(self._by_inode.get(inode, ()))

    def held_by(self, pid: int) -> list[tuple[int, int]]:
        """(fd, inode) of every traced socket `pid` holds."""
        return [(fd, self._inode_of[(pid, fd)]) for fd in sorted(self._fds_of.get(pid, ()))]

    def pids(self) -> set[int]:
        """Every process holding a traced socket."""
        return set(self._fds_of)

    def forked(self, parent: int, child: int) -> list[tuple[int, int]]:
        """`child` was forked from `parent`: it holds what the parent holds, at the same fds.
        Returns the (fd, inode) pairs the child got."""
        got = self.held_by(parent)
        for fd, inode in got:
            self.add(child, fd, inode)
        return got

    def remove(self, pid: int, fd: int) -> tuple[int, set[Holder]] | None:
        """`pid` closed `fd`: (its socket inode, the holders left), or None if untracked."""
        key = (pid, fd)
        inode = self._inode_of.pop(key, None)
        if inode is None:
            return None
        self._since.pop(key, None)
        fds = self._fds_of.get(pid)
        if fds is not None:
            fds.discard(fd)
            if not fds:
                del self._fds_of[pid]
        left = self._by_inode.get(inode, set())
        left.discard(key)
        if not left:
            self._by_inode.pop(inode, None)
        return inode, set(left)

    def exited(self, pid: int) -> list[tuple[int, int, set[Holder]]]:
        """`pid` is gone: (fd, inode, holders left) for each socket it held."""
        out = []
        for fd, _ in self.held_by(pid):
            removed = self.remove(pid, fd)
            if removed is not None:
                out.append((fd, removed[0], removed[1]))
        return out

    def prune(self, inode: int, still_holds: Callable[[int, int, int], bool]) -> set[Holder]:
        """Drop the holders of `inode` for which `still_holds(pid, fd, inode)` is False (an
        fd closed without a traced close: close-on-exec, close_range); the holders left."""
        for pid, fd in sorted(self._by_inode.get(inode, ())):
            if not still_holds(pid, fd, inode):
                self.remove(pid, fd)
        return self.holders(inode)

    def successor(self, left: set[Holder]) -> Holder:
        """The holder that takes over when another lets go: the newest hold (after a fork,
        the child that was handed the socket), by the order holds were added."""
        return max(left, key=lambda h: self._since.get(h, 0))

    def drop_pids(self, pids: Iterable[int]) -> int:
        """Forget every hold of `pids` (processes found gone); how many were dropped."""
        n = 0
        for pid in list(pids):
            n += len(self.exited(pid))
        return n

