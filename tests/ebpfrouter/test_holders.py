"""The socket holder table: forks share, closes and exits let go, stale holders are pruned."""

from __future__ import annotations

from ebpfrouter.holders import SocketHolders


def test_fork_then_parent_close_leaves_the_child() -> None:
    """PostgreSQL's pattern: the postmaster accepts (fd 9), forks, closes its copy."""
    table = SocketHolders()
    assert table.add(100, 3, 500)  # the listener
    assert table.add(100, 9, 900)  # the accepted connection
    assert table.forked(100, 101) == [(3, 500), (9, 900)]
    assert table.holders(900) == {(100, 9), (101, 9)}
    inode, left = table.remove(100, 9)
    assert (inode, left) == (900, {(101, 9)})
    assert table.successor(left) == (101, 9)
    assert table.remove(101, 3) == (500, {(100, 3)})  # the backend closes the listener
    assert table.remove(101, 9) == (900, set())  # the backend's close is the last
    assert table.holders(900) == set() and table.inode_of(101, 9) is None


def test_successor_is_the_newest_hold() -> None:
    """Pre-forked workers share a listener: when the master goes, the newest worker takes it."""
    table = SocketHolders()
    table.add(10, 3, 77)
    for worker in (11, 12, 13):
        table.forked(10, worker)
    fd, inode, left = table.exited(10)[0]
    assert (fd, inode) == (3, 77) and left == {(11, 3), (12, 3), (13, 3)}
    assert table.successor(left) == (13, 3)


def test_reused_fd_number_replaces_its_socket() -> None:
    table = SocketHolders()
    table.add(5, 4, 1)
    table.add(5, 4, 2)  # fd 4 closed unseen and reused
    assert table.holders(1) == set() and table.holders(2) == {(5, 4)}
    assert table.held_by(5) == [(4, 2)] and len(table) == 1


def test_prune_drops_holders_whose_fd_changed() -> None:
    """close-on-exec and close_range close fds without a traced close: verified on demand."""
    table = SocketHolders()
    table.add(1, 7, 42)
    table.forked(1, 2)
    left = table.prune(42, lambda pid, fd, inode: pid == 1)
    assert left == {(1, 7)} and table.held_by(2) == []


def test_bounded_and_gone_pids_dropped() -> None:
    table = SocketHolders(max_sockets=2)
    assert table.add(1, 1, 10) and table.add(1, 2, 11)
    assert not table.add(1, 3, 12)  # full: a new socket is refused
    assert table.add(2, 1, 10)  # another holder of a known socket still fits
    assert table.drop_pids([1]) == 2
    assert table.pids() == {2} and table.holders(10) == {(2, 1)}
    assert table.remove(9, 9) is None and table.exited(9) == []
