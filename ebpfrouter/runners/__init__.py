"""Runners: the adapters that carry out the engine's actions against sockets, ptrace and peers.

Every action type belongs to one family, and each family has one runner: `ACTION_RUNNERS` is
the only place that says which. The daemon dispatches with
`runner_for[ACTION_RUNNERS[type(action)]].run(action)`; the engine simulation in the tests
looks its fake runners up in the same table, so a new action needs a runner in both.

    HOST       hostconn.HostConnections   host listeners, accept + bind frame, host connect
    DATAPATH   datapath.DataPath          queue checks, bounces of unread bytes, probes
    INJECTION  injection.Injection        freeze, replace the fd, thaw (one ptrace thread)
    PEERS      peers.PeerLinks            control messages to other nodes
    TIMERS     timers.Timers              the engine's timers on the event loop
    SOCKETS    sockets.SocketCloser       closing the daemon's copies
    STATUS     status.SwapNotes           counting swaps for status and metrics
    KERNEL     kernel.TracerMaps          the tracer's maps: remote pod CIDRs, eager-swap verdicts
"""

from __future__ import annotations

import enum
from typing import Protocol

from ..engine.actions import (
    Action,
    Bounce,
    CancelTimer,
    CheckQueues,
    CloseSocket,
    EagerListener,
    EagerPeer,
    Freeze,
    HostConnect,
    NoteForgotten,
    NoteSwapped,
    OpenHostListener,
    ProbeConn,
    ReplaceFd,
    Resume,
    SendPeer,
    StartTimer,
    Thaw,
)


class Family(enum.Enum):
    """A family of actions, run by one runner."""

    HOST = "host connections"
    DATAPATH = "data path"
    INJECTION = "injection"
    PEERS = "peers"
    TIMERS = "timers"
    SOCKETS = "sockets"
    STATUS = "status"
    KERNEL = "kernel maps"


ACTION_RUNNERS: dict[type[Action], Family] = {
    OpenHostListener: Family.HOST,
    HostConnect: Family.HOST,
    CheckQueues: Family.DATAPATH,
    Bounce: Family.DATAPATH,
    ProbeConn: Family.DATAPATH,
    Freeze: Family.INJECTION,
    Thaw: Family.INJECTION,
    ReplaceFd: Family.INJECTION,
    Resume: Family.INJECTION,  # after the thaws before it, on the same thread
    NoteForgotten: Family.INJECTION,  # its address virtualization entry goes
    SendPeer: Family.PEERS,
    StartTimer: Family.TIMERS,
    CancelTimer: Family.TIMERS,
    CloseSocket: Family.SOCKETS,
    NoteSwapped: Family.STATUS,
    EagerListener: Family.KERNEL,
    EagerPeer: Family.KERNEL,
}


class Runner(Protocol):
    """Runs the actions of one family; results go back to the engine as events."""

    def run(self, action: Action) -> None:
        """Start (or do) `action`. Its result, if it has one, comes back as an event; an
        exception raised here reaches the engine as `ActionFailed` (see `Daemon.feed`)."""


class UnknownAction(TypeError):
    """An action reached a runner not made for it (the table and the runner disagree)."""

    def __init__(self, runner: object, action: Action) -> None:
        super().__init__(f"{type(runner).__name__} cannot run {type(action).__name__}")


__all__ = ["ACTION_RUNNERS", "Family", "Runner", "UnknownAction"]
