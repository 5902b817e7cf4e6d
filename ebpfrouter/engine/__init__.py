"""Sans-I/O core of the router: events in, actions out (see `machine` for the swap protocol)."""

from .actions import (
    Action,
    Bounce,
    CancelTimer,
    CheckQueues,
    CloseSocket,
    Freeze,
    HostConnect,
    OpenHostListener,
    ProbeConn,
    ReplaceFd,
    SendPeer,
    StartTimer,
    Thaw,
)
from .events import (
    AcceptTraced,
    ActionFailed,
    BounceDone,
    CloseTraced,
    ConnectTraced,
    ConnProbed,
    Event,
    FourTuple,
    FreezeDone,
    HostAccepted,
    HostClosed,
    HostConnected,
    HostListenerOpened,
    ListenTraced,
    PeerLost,
    PeerMessage,
    PeerUp,
    ProcessExited,
    QueuesChecked,
    ReplaceDone,
    SockRef,
    TimerFired,
)
from .machine import Conn, Engine, EngineConfig, Listener, Role, State

__all__ = [
    "AcceptTraced", "Action", "ActionFailed", "Bounce", "BounceDone", "CancelTimer",
    "CheckQueues",
    "CloseSocket", "CloseTraced",
    "Conn", "ConnProbed", "ConnectTraced", "Engine", "EngineConfig", "Event", "FourTuple",
    "Freeze", "FreezeDone", "HostAccepted", "HostClosed", "HostConnect", "HostConnected",
    "HostListenerOpened",
    "Listener", "ListenTraced", "OpenHostListener", "PeerLost", "PeerMessage", "PeerUp",
    "ProbeConn", "ProcessExited", "QueuesChecked", "ReplaceDone", "ReplaceFd", "Role",
    "SendPeer", "SockRef", "StartTimer", "State", "Thaw", "TimerFired",
]
