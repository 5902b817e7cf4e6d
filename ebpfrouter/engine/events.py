"""Events fed into the engine: what the tracer, the peers and the action runners observed."""

from __future__ import annotations

import dataclasses
from typing import Any

SockRef = int  # an opaque handle for a socket the daemon holds (its own dup or host socket)


@dataclasses.dataclass(frozen=True)
class FourTuple:
    """An overlay TCP connection, named from the client's point of view."""

    client_addr: str
    client_port: int
    server_addr: str
    server_port: int

    def to_body(self) -> dict[str, Any]:
        """The fields as they appear in peer messages."""
        return dataclasses.asdict(self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FourTuple:
        """From a schema-checked peer message body."""
        return cls(body["client_addr"], body["client_port"], body["server_addr"],
                   body["server_port"])

    def __str__(self) -> str:
        return f"{self.client_addr}:{self.client_port}->{self.server_addr}:{self.server_port}"


class Event:
    """Base class of all engine inputs."""


# -- traced by BPF (enriched by the daemon with addresses and its own dup of the socket) --------


@dataclasses.dataclass(frozen=True)
class ListenTraced(Event):
    """A pod process listens on overlay `addr:port` (wildcards resolved to the pod IP)."""

    pid: int
    fd: int
    inode: int
    addr: str
    port: int


@dataclasses.dataclass(frozen=True)
class AcceptTraced(Event):
    """A pod process accepted overlay connection `conn` on `fd`; `sock` is the daemon's dup.

    `stopped`: the tracer stopped the caller at `accept()` return (SIGSTOP) for an eager swap;
    it stays stopped until the engine emits `Resume`.
    """

    pid: int
    fd: int
    inode: int
    conn: FourTuple
    sock: SockRef
    stopped: bool = False


@dataclasses.dataclass(frozen=True)
class ConnectTraced(Event):
    """A pod process connected `fd` as overlay connection `conn`; `sock` is the daemon's dup.

    `stopped`: as for `AcceptTraced`, at `connect()` return (0 or EINPROGRESS). `aged`: the
    tracer held it in the kernel until it had lived `min_age` (it is not aged again here)."""

    pid: int
    fd: int
    inode: int
    conn: FourTuple
    sock: SockRef
    stopped: bool = False
    aged: bool = False


@dataclasses.dataclass(frozen=True)
class ShortLived(Event):
    """`count` connections accepted on our listener at overlay `addr:port` closed younger than
    `min_age` and were forgotten in the kernel (never reported one by one)."""

    addr: str
    port: int
    count: int


@dataclasses.dataclass(frozen=True)
class StopUnclaimed(Event):
    """The tracer stopped `pid` for a connection the daemon does not follow (not this node's,
    not readable, shutting down): resume it unless an eager swap holds that stop."""

    pid: int


@dataclasses.dataclass(frozen=True)
class CloseTraced(Event):
    """A process closed `fd`."""

    pid: int
    fd: int


@dataclasses.dataclass(frozen=True)
class FdMoved(Event):
    """`pid` no longer holds the socket at `fd`, and `new_pid` still holds it at `new_fd`.

    Sockets change process: a server accepts and forks (PostgreSQL's postmaster hands each
    connection to a backend and closes its copy), a client connects and forks, a listener's
    first owner exits and leaves it to pre-forked workers. The daemon follows forks and
    reports this instead of `CloseTraced`/`ProcessExited` while another process holds the
    socket, so the connection (or listener) carries on under its new holder.
    """

    pid: int
    fd: int
    new_pid: int
    new_fd: int


@dataclasses.dataclass(frozen=True)
class ProcessExited(Event):
    """A process exited."""

    pid: int


# -- peers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerMessage(Event):
    """An authenticated, schema-checked control message from peer node `peer`."""

    peer: str
    type: str
    body: dict[str, Any]

    @property
    def message(self) -> Any:
        """The body decoded into its message type's dataclass, from the schema table
        (`ebpfrouter.peers.messages.BODIES`): the engine reads fields, never dict keys."""
        from ..peers.messages import typed

        return typed(self.type, self.body)


@dataclasses.dataclass(frozen=True)
class PeerUp(Event):
    """A control connection to `peer` is established (announce our listeners)."""

    peer: str


@dataclasses.dataclass(frozen=True)
class PeerLost(Event):
    """The control connection to `peer` broke."""

    peer: str


@dataclasses.dataclass(frozen=True)
class HostAccepted(Event):
    """A host listener accepted a connection from `peer` whose first frame was `bind`."""

    listener: SockRef
    sock: SockRef
    inode: int
    peer: str
    bind: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class HostClosed(Event):
    """The remote end closed a host connection the daemon holds (`sock`): EOF or reset.

    Runners report it only after the `HostAccepted`/`HostConnected` event of that socket.
    """

    sock: SockRef


# -- results of actions (every action with a `ref` yields exactly one of these) ----------------


@dataclasses.dataclass(frozen=True)
class HostListenerOpened(Event):
    """`OpenHostListener` succeeded."""

    ref: int
    sock: SockRef
    host_addr: str
    host_port: int


@dataclasses.dataclass(frozen=True)
class HostConnected(Event):
    """`HostConnect` succeeded and the bind frame was sent."""

    ref: int
    sock: SockRef
    inode: int


@dataclasses.dataclass(frozen=True)
class FreezeDone(Event):
    """`Freeze` stopped every thread of the process."""

    ref: int


@dataclasses.dataclass(frozen=True)
class QueuesChecked(Event):
    """`CheckQueues` result: bytes in the send queue (unacknowledged) and unread bytes in the
    receive queue of the overlay socket."""

    ref: int
    send_queue: int
    recv_queue: int
    # TCP_INFO: payload bytes acknowledged by the peer (a client's SYN counts one) and
    # received; an eager swap requires that none crossed the overlay (None: unknown)
    bytes_acked: int | None = None
    bytes_received: int | None = None


@dataclasses.dataclass(frozen=True)
class BounceDone(Event):
    """`Bounce` wrote our bytes and echoed the peer's: the host socket may be handed over."""

    ref: int


@dataclasses.dataclass(frozen=True)
class ReplaceDone(Event):
    """`ReplaceFd` installed the socket at the fd inside the process."""

    ref: int


@dataclasses.dataclass(frozen=True)
class ConnProbed(Event):
    """`ProbeConn` result: whether the remote end closed the overlay / host connection."""

    ref: int
    overlay_closed: bool
    host_closed: bool


@dataclasses.dataclass(frozen=True)
class ActionFailed(Event):
    """The action with `ref` failed (the runner guarantees nothing changed in the target)."""

    ref: int
    reason: str


@dataclasses.dataclass(frozen=True)
class TimerFired(Event):
    """A timer started with `StartTimer(key, ...)` expired."""

    key: tuple[Any, ...]
