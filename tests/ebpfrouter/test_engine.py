"""The sans-I/O engine: happy path, every step failing, peer loss and crashes at every step
(with and without unread bytes to migrate), hostile and out-of-order messages, and random
interleavings (hypothesis).

Invariant everywhere: a connection ends either swapped on both sides or unchanged on both,
nothing is left frozen, and the daemons hold no sockets for settled connections.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))

from enginesim import CLIENT, SERVER, World  # noqa: E402

from ebpfrouter.engine import (  # noqa: E402
    AcceptTraced,
    ActionFailed,
    Bounce,
    BounceDone,
    CancelTimer,
    CheckQueues,
    CloseSocket,
    CloseTraced,
    ConnectTraced,
    Engine,
    EngineConfig,
    FdMoved,
    FourTuple,
    Freeze,
    FreezeDone,
    HostAccepted,
    HostClosed,
    HostConnect,
    HostConnected,
    ListenTraced,
    OpenHostListener,
    PeerLost,
    PeerMessage,
    ProcessExited,
    QueuesChecked,
    ReplaceFd,
    SendPeer,
    StartTimer,
    State,
    TimerFired,
)
from ebpfrouter.engine.keys import AcceptTimer  # noqa: E402
from ebpfrouter.peers import SCHEMAS  # noqa: E402

EXAMPLES = int(os.environ.get("ENGINE_FUZZ_EXAMPLES", "300"))
TUP = FourTuple("10.244.1.2", 40000, "10.244.2.2", 5201)
UNREAD = [(0, 0), (7, 3)]  # (client side, server side) unread overlay bytes while frozen


def happy_steps(unread: tuple[int, int]) -> int:
    world = World(unread=unread)
    steps = 0
    while world.step_default():
        steps += 1
    assert world.check_final() == ["swapped"]
    return steps


STEPS = {u: happy_steps(u) for u in UNREAD}
STEP_CASES = [(u, k) for u in UNREAD for k in range(STEPS[u])]


@pytest.mark.parametrize("unread", UNREAD)
def test_happy_path_swaps_both_sides_in_protocol_order(unread: tuple[int, int]) -> None:
    world = World(unread=unread)
    world.drain()
    assert world.check_final() == ["swapped"]
    order = [(n, a) for n, a in world.log
             if a in ("Freeze", "ReplaceFd", "Thaw", "CheckQueues", "Bounce")]
    bounce = [(CLIENT, "Bounce"), (SERVER, "Bounce")] if any(unread) else []
    assert order == [
        (CLIENT, "Freeze"), (CLIENT, "CheckQueues"),  # writer (client, attempt 1) first
        (SERVER, "Freeze"), (SERVER, "CheckQueues"),  # final for the server: R_s known
        (CLIENT, "CheckQueues"),  # final for the client: R_c known
        *bounce, (SERVER, "ReplaceFd"),
        (CLIENT, "ReplaceFd"), (CLIENT, "Thaw"), (SERVER, "Thaw"),
    ]
    bounces = [a for n, a in world.log if a == "Bounce"]
    assert len(bounces) == (2 if any(unread) else 0)
    for node in (CLIENT, SERVER):
        assert world.daemons[node].engine.stats["swapped"] == 1
        assert not world.daemons[node].handles or all(
            s.kind == "listener" for s in world.daemons[node].handles.values())


def test_busy_then_server_first_on_retry() -> None:
    world = World()
    busy_done = False
    while True:
        index = next((i for i, (n, a) in enumerate(world.pending)
                      if isinstance(a, CheckQueues) and n == SERVER), None)
        if index is not None and not busy_done:
            world.complete(index, busy=True)
            busy_done = True
            continue
        if not world.step_default():
            break
    assert world.check_final() == ["swapped"]
    engine = world.daemons[CLIENT].engine
    assert engine.stats["attempts"] == 2 and engine.stats["aborted_by_peer"] == 1
    freezes = [n for n, a in world.log if a == "Freeze"]
    assert freezes == [CLIENT, SERVER, SERVER, CLIENT]  # attempt 2: server first


@pytest.mark.parametrize("migrate", [True, False])
def test_unread_bytes_migrate_or_mean_busy(migrate: bool) -> None:
    """Unread bytes are carried over; with migrate=False they make the side busy (old rule)."""
    world = World(unread=(5, 0), migrate=migrate, max_attempts=2)
    world.drain()
    assert world.check_final() == (["swapped"] if migrate else ["overlay"])
    engine = world.daemons[CLIENT].engine
    assert engine.stats["busy"] == (0 if migrate else 2)
    assert engine.stats["bounces"] == (1 if migrate else 0)


def test_too_many_unread_bytes_is_busy() -> None:
    world = World(unread=(0, 101), max_migrate=100, max_attempts=1)
    world.drain()
    assert world.check_final() == ["overlay"]
    assert world.daemons[SERVER].engine.stats["busy"] == 1


def _bounce_pending(world: World, node: str) -> int | None:
    return next((i for i, (n, a) in enumerate(world.pending)
                 if n == node and isinstance(a, Bounce)), None)


def test_server_replaces_while_client_still_bounces() -> None:
    """ready(replaced) may overtake the client's own bounce: it replaces once that is done."""
    world = World(unread=(7, 3))
    while _bounce_pending(world, CLIENT) is None:
        assert world.step_default()
    client_bounce = world.pending.pop(_bounce_pending(world, CLIENT))
    while world.step_default():  # everything else: the server bounces, replaces, says so
        pass
    engine = world.daemons[CLIENT].engine
    (conn,) = engine.conns.values()
    assert conn.state is State.MIGRATING and conn.now.peer_replaced
    assert world.procs[CLIENT].frozen and world.procs[SERVER].frozen
    world.pending.append(client_bounce)
    world.drain()
    assert world.check_final() == ["swapped"]


@pytest.mark.parametrize("node", [CLIENT, SERVER])
def test_failed_bounce_leaves_the_connection_on_the_overlay(node: str) -> None:
    """The host connection holds bounced bytes: no retry on it, both sides let go."""
    world = World(unread=(7, 3))
    while _bounce_pending(world, node) is None:
        assert world.step_default()
    world.complete(_bounce_pending(world, node), ok=False)
    world.drain()
    assert world.check_final() == ["overlay"]
    for daemon in world.daemons.values():
        assert not daemon.engine.conns
        assert all(s.kind == "listener" for s in daemon.handles.values())
    assert world.daemons[CLIENT].engine.stats["attempts"] == 1


@pytest.mark.parametrize("fault", ["cut", "crash_client", "crash_server"])
@pytest.mark.parametrize("done", [CLIENT, SERVER, "both", "none"])
def test_peer_lost_mid_bounce(fault: str, done: str) -> None:
    """Peer lost while both bounces run, each finished or not: never one-sided."""
    world = World(unread=(7, 3))
    held = []
    while len(held) < 2:  # run until both bounces are under way, holding them
        for node in (CLIENT, SERVER):
            index = _bounce_pending(world, node)
            if index is not None:
                held.append(world.pending.pop(index))
        if len(held) < 2:
            assert world.step_default()
    world.pending += held
    for node in (CLIENT, SERVER):
        if done in (node, "both"):
            world.complete(_bounce_pending(world, node))
    if fault == "cut":
        world.cut_link()
    else:
        world.crash(CLIENT if fault == "crash_client" else SERVER)
    world.drain()
    assert world.check_final() in (["swapped"], ["overlay"])


def test_freezes_per_process_are_capped() -> None:
    """Past max_freezes_per_second the process is left alone until the window moves on."""
    world = World(n=3, max_freezes_per_second=2, max_swaps_per_process=1)
    peak = seen = 0
    while True:
        # the one-second windows expire before the client's next retry (0.2 s and more)
        idle = not any(world.inbox.values()) and not world.pending and not any(world.net.values())
        rate = [(node, i) for node in (CLIENT, SERVER)
                for i, key in enumerate(world.daemons[node].timers) if key[0] == "rate"]
        limited = sum(d.engine.stats["freeze_rate_limited"] for d in world.daemons.values())
        if idle and rate and limited > seen:  # a window expires once someone had to wait
            seen = limited
            world.fire(*rate[0])
        elif not world.step_default():
            break
        peak = max([peak, *(n for d in world.daemons.values() for n in d.engine.freezes.values())])
    assert world.check_final() == ["swapped"] * 3
    assert peak == 2  # three connections of the same two processes, two freezes a window
    stats = [world.daemons[n].engine.stats for n in (CLIENT, SERVER)]
    assert sum(s["freeze_rate_limited"] for s in stats) >= 1
    assert not any(d.engine.freezes for d in world.daemons.values())


def test_rate_window_counts_freezes() -> None:
    engine = _server_engine()
    engine.config.max_freezes_per_second = 1
    cid = b"\x07" * 16
    engine.handle(HostAccepted(900, 952, 99, CLIENT, {"cid": cid, **TUP.to_body()}))
    prepare = {"cid": cid, "attempt": 1, "stage": "check", "migrate_len": 0, **TUP.to_body()}
    acts = engine.handle(PeerMessage(CLIENT, "swap_prepare", prepare))
    assert [type(a).__name__ for a in acts] == ["Freeze", "StartTimer"]
    timer = acts[1]
    assert timer.key == ("rate", 200) and timer.delay == 1.0
    engine.handle(ActionFailed(acts[0].ref, "injected"))  # attempt over, process thawed
    again = engine.handle(PeerMessage(CLIENT, "swap_prepare", {**prepare, "attempt": 3}))
    assert [a.body["reason"] for a in again if isinstance(a, SendPeer)] == ["process busy"]
    engine.handle(TimerFired(timer.key))  # a second later
    later = engine.handle(PeerMessage(CLIENT, "swap_prepare", {**prepare, "attempt": 4}))
    assert isinstance(later[0], Freeze)


def test_bounce_lengths_come_from_both_final_checks() -> None:
    """The server learns |R_c| from prepare(migrate); its bounce writes R_s, echoes R_c."""
    engine = _server_engine()
    cid = b"\x07" * 16
    engine.handle(HostAccepted(900, 952, 99, CLIENT, {"cid": cid, **TUP.to_body()}))
    prepare = {"cid": cid, "attempt": 1, "stage": "check", "migrate_len": 0, **TUP.to_body()}
    (freeze, _) = engine.handle(PeerMessage(CLIENT, "swap_prepare", prepare))
    (check,) = engine.handle(FreezeDone(freeze.ref))
    acts = engine.handle(QueuesChecked(check.ref, 0, 1234))
    ready = next(a for a in acts if isinstance(a, SendPeer))
    assert (ready.type, ready.body["stage"], ready.body["migrate_len"]) == (
        "swap_ready", "checked", 1234)
    # a migrate for another attempt is ignored; the right one starts the bounce
    assert engine.handle(PeerMessage(CLIENT, "swap_prepare",
                                     {**prepare, "stage": "migrate", "attempt": 2})) == []
    (bounce,) = engine.handle(PeerMessage(CLIENT, "swap_prepare",
                                          {**prepare, "stage": "migrate", "migrate_len": 99}))
    assert isinstance(bounce, Bounce)
    assert (bounce.send_len, bounce.echo_len, bounce.overlay_sock, bounce.host_sock) == (
        1234, 99, 901, 952)
    (replace,) = engine.handle(BounceDone(bounce.ref))
    assert isinstance(replace, ReplaceFd) and replace.sock == 952


def test_always_busy_gives_up_and_stays_on_overlay() -> None:
    world = World(max_attempts=3)
    while True:
        index = next((i for i, (_, a) in enumerate(world.pending)
                      if isinstance(a, CheckQueues)), None)
        if index is not None:
            world.complete(index, busy=True)
        elif not world.step_default():
            break
    assert world.check_final() == ["overlay"]
    assert world.daemons[CLIENT].engine.stats["gave_up"] == 1
    assert not world.daemons[SERVER].engine.conns  # the server forgot it too


@pytest.mark.parametrize(("unread", "k"), STEP_CASES)
def test_failure_at_every_step(unread: tuple[int, int], k: int) -> None:
    world = World(unread=unread)
    for _ in range(k):
        world.step_default()
    if world.pending:
        world.complete(0, ok=False)
    world.drain()
    assert world.check_final() in (["swapped"], ["overlay"])


@pytest.mark.parametrize(("unread", "k"), STEP_CASES)
@pytest.mark.parametrize("fault", ["cut", "crash_client", "crash_server"])
def test_peer_loss_and_crash_at_every_step(unread: tuple[int, int], k: int, fault: str) -> None:
    world = World(unread=unread)
    for _ in range(k):
        world.step_default()
    if fault == "cut":
        world.cut_link()
    else:
        world.crash(CLIENT if fault == "crash_client" else SERVER)
    world.drain()
    assert world.check_final() in (["swapped"], ["overlay"])


@pytest.mark.parametrize(("unread", "k"), STEP_CASES)
@pytest.mark.parametrize("fault", ["close_client", "close_server", "exit_client", "exit_server"])
def test_app_close_or_exit_at_every_step(unread: tuple[int, int], k: int, fault: str) -> None:
    world = World(unread=unread)
    for _ in range(k):
        world.step_default()
    if not world.procs[CLIENT if fault.endswith("client") else SERVER].frozen or "exit" in fault:
        node = CLIENT if fault.endswith("client") else SERVER
        if fault.startswith("close"):
            world.app_close(node, 0)
        else:
            world.app_exit(node)
    world.drain()
    assert world.check_final() in (["closed"], ["swapped"], ["overlay"])
    for daemon in world.daemons.values():  # closes and exits forget state
        assert all(c.state is State.SWAPPED for c in daemon.engine.conns.values())


def test_stale_timers_and_duplicate_messages_are_ignored() -> None:
    world = World()
    world.drain()
    engine = world.daemons[SERVER].engine
    cid = next(iter(world.daemons[CLIENT].engine.conns))
    before = dict(engine.stats)
    for msg_type in ("swap_commit", "swap_ready", "swap_done"):
        body = {"cid": cid, "attempt": 1}
        if msg_type == "swap_ready":
            body["stage"], body["migrate_len"] = "replaced", 0
        assert world.daemons[SERVER].engine.handle(PeerMessage(CLIENT, msg_type, body)) == []
    assert engine.handle(TimerFired(("conn", cid, 1))) == []
    assert engine.handle(TimerFired(("bogus",))) == []
    assert engine.stats["unexpected_message"] == before.get("unexpected_message", 0) + 3
    assert world.check_final() == ["swapped"]


def _server_engine() -> Engine:
    engine = Engine(EngineConfig(SERVER), lambda ip: CLIENT if ip.startswith("10.244.1.")
                    else SERVER if ip.startswith("10.244.2.") else None)
    (listen,) = engine.handle(ListenTraced(200, 3, 77, "10.244.2.2", 5201))
    assert isinstance(listen, OpenHostListener)
    from ebpfrouter.engine import HostListenerOpened

    engine.handle(HostListenerOpened(listen.ref, 900, "192.168.77.2", 41000))
    engine.handle(AcceptTraced(200, 9, 88, TUP, 901))
    return engine


def test_peer_cannot_act_on_untraced_or_foreign_connections() -> None:
    engine = _server_engine()
    cid = b"\x07" * 16
    prepare = {"cid": cid, "attempt": 1, "stage": "check", "migrate_len": 0, **TUP.to_body()}
    # no bind yet: an unknown connection id is ignored, nothing frozen
    assert engine.handle(PeerMessage(CLIENT, "swap_prepare", prepare)) == []
    assert engine.stats["message_unknown_connection"] == 1
    # a bind naming a server address we do not listen on is refused
    other = {"cid": cid, **FourTuple("10.244.1.2", 40000, "10.244.2.9", 80).to_body()}
    acts = engine.handle(HostAccepted(900, 950, 99, CLIENT, other))
    assert [type(a).__name__ for a in acts] == ["CloseSocket"]
    # a bind from a node that does not own the client address is refused
    acts = engine.handle(HostAccepted(900, 951, 99, "node3", {"cid": cid, **TUP.to_body()}))
    assert [type(a).__name__ for a in acts] == ["CloseSocket"]
    assert engine.stats["bind_rejected"] == 2
    # a good bind (it meets the traced accept, whose timer goes); another peer cannot drive it
    assert engine.handle(HostAccepted(900, 952, 99, CLIENT, {"cid": cid, **TUP.to_body()})) == [
        CancelTimer(("accept", 200, 9, 88))]
    assert engine.handle(PeerMessage("node3", "swap_prepare", prepare)) == []
    # the wrong 4-tuple for this id is ignored
    bad = {**prepare, "server_port": 5202}
    assert engine.handle(PeerMessage(CLIENT, "swap_prepare", bad)) == []
    # the right peer and tuple: the freeze targets the pid *we* traced for that tuple
    acts = engine.handle(PeerMessage(CLIENT, "swap_prepare", prepare))
    assert acts[0] == Freeze(acts[0].ref, 200)
    # a listener_add for an address the peer does not own is rejected
    assert engine.handle(PeerMessage("node3", "listener_add", {
        "overlay_addr": "10.244.1.2", "overlay_port": 80, "host_addr": "1.2.3.4",
        "host_port": 80})) == []
    assert engine.stats["foreign_listener_rejected"] == 1


def test_rules_and_scoping() -> None:
    def peer(ip: str) -> str | None:
        return CLIENT if ip.startswith("10.244.1.") else SERVER if ip.startswith("10.244.2.") \
            else None

    engine = Engine(EngineConfig(CLIENT), peer, allow=lambda role, pid, conn: pid != 666)
    same_node = FourTuple("10.244.1.2", 1, "10.244.1.3", 80)
    # not handled: the daemon's copy of the socket is released at once
    assert engine.handle(ConnectTraced(100, 4, 1, same_node, 1)) == [CloseSocket(1)]
    assert engine.handle(ConnectTraced(100, 5, 2, FourTuple("10.244.1.2", 2, "8.8.8.8", 53),
                                       2)) == [CloseSocket(2)]
    assert engine.handle(ConnectTraced(666, 6, 3, TUP, 3)) == [CloseSocket(3)]
    assert engine.stats["connect_not_remote"] == 2 and engine.stats["connect_ruled_out"] == 1
    # allowed, but no listener announced yet: waits; the announcement starts it
    assert engine.handle(ConnectTraced(100, 7, 4, TUP, 4)) == [
        StartTimer(("waiting", 100, 7, 4), engine.config.listener_wait)]
    acts = engine.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000}))
    assert acts[0] == CancelTimer(("waiting", 100, 7, 4))
    assert [type(a).__name__ for a in acts] == ["CancelTimer", "HostConnect"]
    assert (acts[1].host_addr, acts[1].host_port) == ("192.168.77.2", 41000)
    # listen on an address that is not a local pod: not announced
    assert engine.handle(ListenTraced(100, 9, 5, "10.244.2.2", 80)) == []


def test_rollback_failure_thaws_and_tells_the_peer() -> None:
    world = World()
    while not any(isinstance(a, ReplaceFd) and n == CLIENT for n, a in world.pending):
        assert world.step_default()
    index = next(i for i, (n, a) in enumerate(world.pending) if isinstance(a, CheckQueues)) \
        if any(isinstance(a, CheckQueues) for _, a in world.pending) else None
    assert index is None
    # make the client's replace fail: the server must roll back
    world.complete(next(i for i, (n, _) in enumerate(world.pending) if n == CLIENT), ok=False)
    # fail the server's rollback too
    while not any(isinstance(a, ReplaceFd) and n == SERVER for n, a in world.pending):
        assert world.step_default()
    node, action = next((n, a) for n, a in world.pending if n == SERVER)
    world.pending.clear()
    world.feed(node, ActionFailed(action.ref, "injected"))
    assert world.daemons[SERVER].engine.stats["rollback_failed"] == 1
    assert not world.procs[SERVER].frozen
    world.drain()
    assert not world.procs[CLIENT].frozen and not world.daemons[SERVER].engine.conns


def test_two_connections_same_processes_serialise() -> None:
    world = World(n=2, max_swaps_per_process=1)
    world.drain()
    assert world.check_final() == ["swapped", "swapped"]


@pytest.mark.parametrize("limit", [1, 2, 8])
def test_swaps_of_one_process_share_its_freeze_up_to_the_limit(limit: int) -> None:
    """Eight connections between the same two processes: up to `limit` swaps hold each
    process at once (the injector counts holds), and all end swapped."""
    world = World(n=8, max_swaps_per_process=limit)
    peak = {CLIENT: 0, SERVER: 0}
    while world.step_default():
        for node, daemon in world.daemons.items():
            holders = daemon.engine.busy_pids.get(world.procs[node].pid, ())
            peak[node] = max(peak[node], len(holders))
    assert world.check_final() == ["swapped"] * 8
    assert peak[CLIENT] == limit and peak[SERVER] <= limit


def test_connections_queue_for_a_busy_process_and_are_woken_in_turn() -> None:
    """Eight connections of one client process: each waits once, queued, and is woken when the
    process is free (a zero-delay timer), instead of polling until max_waits runs out."""
    world = World(n=8, max_waits=2, unread=(7, 3), max_swaps_per_process=1)
    world.drain()
    assert world.check_final() == ["swapped"] * 8
    engine = world.daemons[CLIENT].engine
    assert engine.stats["pid_busy"] == 7 and engine.stats["gave_up"] == 0
    assert not engine.pid_waiters


# -- hostile messages ----------------------------------------------------------------------------

_values = {
    bytes: st.binary(min_size=16, max_size=16),
    int: st.integers(1, 65535),
    str: st.sampled_from(["10.244.1.2", "10.244.2.2", "freeze", "check", "migrate", "frozen",
                          "checked", "replaced", "x"]),
    bool: st.booleans(),
}


@st.composite
def peer_messages(draw: st.DrawFn, cids: list[bytes]) -> PeerMessage:
    msg_type = draw(st.sampled_from(sorted(SCHEMAS)))
    body = {}
    for name, field in SCHEMAS[msg_type].items():
        if name == "cid":
            body[name] = draw(st.sampled_from(cids) | _values[bytes])
        elif field.choices:
            body[name] = draw(st.sampled_from(field.choices))
        else:
            body[name] = draw(_values[field.kind])
    return PeerMessage(draw(st.sampled_from([CLIENT, SERVER, "node3"])), msg_type, body)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_hostile_messages_never_act_on_untraced(data: st.DataObject) -> None:
    world = World(unread=data.draw(st.sampled_from(UNREAD)))
    for _ in range(data.draw(st.integers(0, STEPS[UNREAD[-1]]))):
        world.step_default()
    cids = list(world.daemons[CLIENT].engine.conns) or [b"\x01" * 16]
    for _ in range(data.draw(st.integers(1, 30))):
        node = data.draw(st.sampled_from([CLIENT, SERVER]))
        msg = data.draw(peer_messages(cids))
        acts = world.daemons[node].engine.handle(msg)
        for act in acts:
            if isinstance(act, Freeze | ReplaceFd):
                assert act.pid == world.procs[node].pid
            if isinstance(act, SendPeer):
                assert act.peer in (None, CLIENT, SERVER)
        if msg.body.get("cid") not in cids:
            assert acts == [] or msg.type.startswith("listener")


# -- random interleavings ------------------------------------------------------------------------


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_random_interleavings_never_one_sided(data: st.DataObject) -> None:
    world = World(n=data.draw(st.integers(1, 2)), max_attempts=4,
                  unread=data.draw(st.sampled_from([(0, 0), (7, 3), (0, 5), (5, 0)])),
                  min_age=data.draw(st.sampled_from([0.0, 0.2])), eager=data.draw(st.booleans()))
    world.app_read = data.draw(st.booleans())
    faults = set()
    for _ in range(data.draw(st.integers(0, 120))):
        moves = world.moves()
        extra = ["busy", "fail"] if world.pending else []
        extra += ["read"] if not world.app_read else []
        extra += [f"share_{n}" for n in (CLIENT, SERVER) if not world.shared[n]]
        extra += [f"unshare_{n}" for n in (CLIENT, SERVER) if world.shared[n]]
        extra += [f for f in ("cut", "crash_client", "crash_server", "close", "exit")
                  if f not in faults]
        choice = data.draw(st.integers(0, len(moves) + len(extra) - 1)) if moves or extra \
            else None
        if choice is None:
            break
        if choice < len(moves):
            kind, args = moves[choice]
            if kind == "inbox":
                world.deliver_inbox(*args)
            elif kind == "deliver":
                world.deliver(*args)
            elif kind == "fire":
                world.fire(*args)
            elif kind == "hand_off":
                world.app_hand_off(*args)
            else:
                world.complete(*args)
            continue
        fault = extra[choice - len(moves)]
        faults.add(fault)
        if fault == "read":
            world.app_read = True
        elif fault.startswith(("share_", "unshare_")):
            kind, node = fault.split("_", 1)
            world.shared[node] = kind == "share"
        elif fault in ("busy", "fail"):
            index = data.draw(st.integers(0, len(world.pending) - 1))
            node, action = world.pending[index]
            if fault == "fail" and _unsafe_to_fail(world, node, action):
                continue
            world.complete(index, ok=fault != "fail", busy=fault == "busy")
        elif fault == "cut":
            world.cut_link()
        elif fault.startswith("crash"):
            if not any(not d.alive for d in world.daemons.values()):
                world.crash(CLIENT if fault == "crash_client" else SERVER)
        elif fault == "close":
            node = data.draw(st.sampled_from([CLIENT, SERVER]))
            if not world.procs[node].frozen and not world.procs[node].stopped:  # (no syscalls)
                world.app_close(node, data.draw(st.integers(0, world.n - 1)))
        elif fault == "exit":
            world.app_exit(data.draw(st.sampled_from([CLIENT, SERVER])))
    world.shared = {CLIENT: False, SERVER: False}  # the forked child let go in the end
    world.drain()
    try:
        world.check_final()
    except AssertionError:
        print("\n".join(f"{n} {a}" for n, a in world.log))
        raise


def _unsafe_to_fail(world: World, node: str, action: object) -> bool:
    """Failures the protocol cannot mask: putting the overlay socket back, and going forward
    after the peer daemon died having swapped its side (both documented limitations)."""
    if isinstance(action, Bounce):  # the client's bounce fails after the server swapped and died
        return not all(d.alive for d in world.daemons.values())
    if not isinstance(action, ReplaceFd):
        return False
    daemon = world.daemons[node]
    sock = daemon.handles.get(action.sock)
    if sock is not None and sock.kind == "overlay":
        return True
    return not all(d.alive for d in world.daemons.values())


def test_many_random_messages_mid_swap() -> None:
    """ENGINE_MESSAGES (default 100k) random schema-valid messages at engines caught at random
    points of a swap: no exception, nothing aimed at a process the engine did not trace."""
    import random

    rng = random.Random(7)
    total = int(os.environ.get("ENGINE_MESSAGES", "100000"))
    strs = ["10.244.1.2", "10.244.2.2", "10.244.3.3", "freeze", "check", "migrate", "frozen",
            "checked", "replaced"]
    sent = 0
    while sent < total:
        world = World(unread=(7, 3))
        for _ in range(rng.randrange(STEPS[(7, 3)])):
            world.step_default()
        cids = list(world.daemons[CLIENT].engine.conns) + [bytes(16)]
        for _ in range(2000):
            msg_type = rng.choice(sorted(SCHEMAS))
            body = {}
            for name, field in SCHEMAS[msg_type].items():
                if name == "cid":
                    body[name] = rng.choice(cids)
                elif field.choices:
                    body[name] = rng.choice(field.choices)
                elif field.kind is int:
                    body[name] = rng.choice([1, 2, 3, 5201, 40000, 65535])
                elif field.kind is bool:
                    body[name] = rng.random() < 0.5
                else:
                    body[name] = rng.choice(strs)
            node = rng.choice([CLIENT, SERVER])
            peer = rng.choice([CLIENT, SERVER, "node3"])
            for act in world.daemons[node].engine.handle(PeerMessage(peer, msg_type, body)):
                if isinstance(act, Freeze | ReplaceFd):
                    assert act.pid == world.procs[node].pid
            sent += 1
    assert sent >= total


def test_summary_counts() -> None:
    world = World(n=2)
    world.drain()
    summary = world.daemons[CLIENT].engine.summary()
    assert summary["seen"] == 2 and summary["bypassed"] == 2
    assert summary["pending"] == 0 and summary["failed"] == 0
    assert summary["states"] == {"swapped": 2} and summary["frozen_pids"] == []


def test_late_accept_waits_without_using_up_attempts() -> None:
    world = World(max_attempts=2)
    accept = next(e for e in world.inbox[SERVER] if isinstance(e, AcceptTraced))
    world.inbox[SERVER].remove(accept)
    for _ in range(400):  # the server app has not called accept() yet
        if not world.step_default():
            break
        if world.daemons[SERVER].engine.stats["prepare_not_ready"] >= 4:
            break
    assert world.daemons[SERVER].engine.stats["prepare_not_ready"] >= 4
    assert not world.procs[CLIENT].frozen
    world.inbox[SERVER].append(accept)
    world.drain()
    assert world.check_final() == ["swapped"]
    assert world.daemons[CLIENT].engine.stats["gave_up"] == 0


@pytest.mark.parametrize("ok", [True, False])
def test_peer_lost_while_server_freezes_is_not_forgotten(ok: bool) -> None:
    """Regression: a failing freeze used to turn a decided final abort into a retry."""
    world = World()
    while not any(isinstance(a, Freeze) and n == SERVER for n, a in world.pending):
        assert world.step_default()
    world.feed(SERVER, PeerLost(CLIENT))
    index = next(i for i, (n, a) in enumerate(world.pending) if n == SERVER)
    world.complete(index, ok=ok)
    engine = world.daemons[SERVER].engine
    assert not engine.conns and not engine.busy_pids and not world.procs[SERVER].frozen


def test_unmatched_connects_and_accepts_expire() -> None:
    def peer(ip: str) -> str | None:
        return CLIENT if ip.startswith("10.244.1.") else SERVER if ip.startswith("10.244.2.") \
            else None

    client = Engine(EngineConfig(CLIENT), peer)
    (timer,) = client.handle(ConnectTraced(100, 7, 4, TUP, 40))
    assert client.handle(TimerFired(timer.key)) == [CloseSocket(40)]
    assert not client.waiting and client.stats["waiting_expired"] == 1
    assert client.handle(TimerFired(timer.key)) == []  # once only
    # a reused fd number with another socket is not expired by the old timer
    client.handle(ConnectTraced(100, 7, 5, TUP, 41))
    assert client.handle(TimerFired(timer.key)) == [] and len(client.waiting) == 1
    server = _server_engine()
    (acc,) = server.accepts.values()
    assert server.handle(TimerFired(AcceptTimer(acc.pid, acc.fd, acc.inode))) == [
        CloseSocket(acc.sock)]
    assert not server.accepts and server.stats["accepts_expired"] == 1


TUP2 = FourTuple("10.244.1.2", 40001, "10.244.2.2", 5201)  # a bind no traced accept matches


def test_unmatched_bind_expires_and_its_host_socket_is_closed() -> None:
    """A bind whose accept never comes is dropped after `bind_wait`; a matched one is kept."""
    server = _server_engine()
    cid = b"\x07" * 16
    (timer,) = server.handle(HostAccepted(900, 960, 99, CLIENT, {"cid": cid, **TUP2.to_body()}))
    assert timer == StartTimer(("bind", cid), server.config.bind_wait)
    assert server.summary()["pending"] == 1
    acts = server.handle(TimerFired(timer.key))
    assert SendPeer(CLIENT, "conn_closed", {"cid": cid}) in acts and CloseSocket(960) in acts
    assert not server.conns and server.stats["binds_expired"] == 1
    assert server.summary()["pending"] == 0
    assert server.handle(TimerFired(timer.key)) == []  # once only
    # a bind that finds its accept starts no timer; one matched later outlives its timer
    matched = b"\x08" * 16
    bind = {"cid": matched, **TUP.to_body()}
    assert server.handle(HostAccepted(900, 961, 98, CLIENT, bind)) == [
        CancelTimer(("accept", 200, 9, 88))]
    late = b"\x09" * 16
    (timer,) = server.handle(HostAccepted(900, 962, 97, CLIENT, {"cid": late, **TUP2.to_body()}))
    assert server.handle(AcceptTraced(200, 10, 89, TUP2, 902)) == [CancelTimer(timer.key)]
    assert server.handle(TimerFired(timer.key)) == []  # had it fired anyway: ignored
    assert server.conns[late].matched and server.stats["binds_expired"] == 1


def test_host_closed_before_the_accept_cleans_up() -> None:
    server = _server_engine()
    cid = b"\x07" * 16
    (timer,) = server.handle(HostAccepted(900, 960, 99, CLIENT, {"cid": cid, **TUP2.to_body()}))
    acts = server.handle(HostClosed(960))
    assert CloseSocket(960) in acts and not server.conns
    assert server.stats["host_closed_by_peer"] == 1
    assert server.handle(TimerFired(timer.key)) == [] and server.stats["binds_expired"] == 0


def test_client_closed_during_host_connect_says_conn_closed() -> None:
    """The app closes while the host connect runs: once connected, the client tells the peer
    and closes both its sockets."""
    client = Engine(EngineConfig(CLIENT), lambda ip: CLIENT if ip.startswith("10.244.1.")
                    else SERVER if ip.startswith("10.244.2.") else None)
    client.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000}))
    (connect,) = client.handle(ConnectTraced(100, 7, 4, TUP, 40))
    assert isinstance(connect, HostConnect)
    assert client.handle(CloseTraced(100, 7)) == []  # decided; acted on when connected
    acts = client.handle(HostConnected(connect.ref, 41, 5))
    assert SendPeer(SERVER, "conn_closed", {"cid": connect.cid}) in acts
    assert CloseSocket(40) in acts and CloseSocket(41) in acts and not client.conns


@pytest.mark.parametrize("host_closed", [True, False])
def test_close_during_host_connect_leaves_no_server_state(host_closed: bool) -> None:
    """Both apps close while the client's host connect runs; conn_closed overtakes the bind.
    The server forgets the bind on HostClosed, or (no EOF seen) when its timer fires."""
    world = World()
    while not any(isinstance(a, HostConnect) for _, a in world.pending):
        assert world.step_default()
    world.app_close(CLIENT, 0)
    world.app_close(SERVER, 0)
    for node in (CLIENT, SERVER):
        while world.inbox[node]:
            world.deliver_inbox(node)
    world.complete(next(i for i, (_, a) in enumerate(world.pending)
                        if isinstance(a, HostConnect)))
    world.deliver(CLIENT)  # conn_closed, before the bind: an unknown connection
    world.deliver_inbox(SERVER)  # the bind (HostAccepted): no accept left to match
    server = world.daemons[SERVER].engine
    assert len(server.conns) == 1 and not next(iter(server.conns.values())).matched
    if not host_closed:
        world.inbox[SERVER] = [e for e in world.inbox[SERVER] if not isinstance(e, HostClosed)]
    world.drain()
    assert world.check_final() == ["closed"]
    assert not server.conns and server.summary()["pending"] == 0
    assert [s.kind for s in world.daemons[SERVER].handles.values()] == ["listener"]
    assert server.stats["binds_expired"] == (0 if host_closed else 1)
    assert server.stats["host_closed_by_peer"] == (1 if host_closed else 0)


def test_state_changes_are_logged_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="ebpfrouter.engine.machine")
    world = World()
    world.drain()
    lines = [r.getMessage() for r in caplog.records]
    head = f"conn {'01' * 4} {TUP}: "
    for change in ("new -> connecting", "connecting -> idle", "replacing -> swapped"):
        assert head + change in lines
    caplog.clear()
    caplog.set_level("INFO", logger="ebpfrouter.engine.machine")
    World().drain()
    assert not any(" -> " in r.getMessage() for r in caplog.records)


def _peer(ip: str) -> str | None:
    return CLIENT if ip.startswith("10.244.1.") else SERVER if ip.startswith("10.244.2.") \
        else None


def test_young_connects_cost_nothing_until_min_age() -> None:
    """With `min_age`, a connect is only remembered; closed before the timer, it leaves no
    trace; a reused fd is not started by the old timer; one that grew up is bypassed."""
    client = Engine(EngineConfig(CLIENT, min_age=0.2), _peer)
    client.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000}))
    (timer,) = client.handle(ConnectTraced(100, 7, 4, TUP, 40))
    assert timer == StartTimer(("young", 100, 7, 4), 0.2)
    assert client.holds_traced(100, 7, 40) and client.summary()["young"] == 1
    assert client.handle(CloseTraced(100, 7)) == [CancelTimer(timer.key), CloseSocket(40)]
    assert client.summary()["short"] == 1
    assert client.handle(TimerFired(timer.key)) == [] and not client.conns
    assert client.stats["stale_timer"] == 1 and not client.holds_traced(100, 7, 40)
    (old,) = client.handle(ConnectTraced(100, 7, 5, TUP, 41))
    acts = client.handle(ConnectTraced(100, 7, 6, TUP, 42))  # fd reused: 41 dropped
    assert acts[:2] == [CancelTimer(old.key), CloseSocket(41)]
    (new,) = acts[2:]
    assert client.handle(TimerFired(old.key)) == [] and len(client.young) == 1
    (connect,) = client.handle(TimerFired(new.key))
    assert isinstance(connect, HostConnect) and connect.host_port == 41000
    assert not client.young and client.holds_traced(100, 7, 42)
    assert client.stats["bypass_started"] == 1


def test_a_connect_the_kernel_aged_is_routed_at_once() -> None:
    """`aged`: the tracer held it until `min_age` already: no second wait in the engine."""
    client = Engine(EngineConfig(CLIENT, min_age=0.2), _peer)
    client.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000}))
    (connect,) = client.handle(ConnectTraced(100, 7, 4, TUP, 40, aged=True))
    assert isinstance(connect, HostConnect) and connect.host_port == 41000
    assert not client.young and client.holds_traced(100, 7, 40)


def test_young_connects_are_bounded_and_dropped_on_exit() -> None:
    client = Engine(EngineConfig(CLIENT, min_age=0.2, max_waiting=3), _peer)
    for fd in range(5):
        client.handle(ConnectTraced(100, fd, 10 + fd, TUP, 40 + fd))
    assert list(client.young) == [(100, 2), (100, 3), (100, 4)]
    assert client.stats["young_evicted"] == 2
    acts = client.handle(ProcessExited(100))
    assert sorted(a.sock for a in acts if isinstance(a, CloseSocket)) == [42, 43, 44]
    assert not client.young


@pytest.mark.parametrize("min_age", [0.0, 0.2])
def test_world_with_min_age_swaps(min_age: float) -> None:
    world = World(min_age=min_age)
    world.drain()
    assert world.check_final() == ["swapped"]


def test_server_waits_for_its_app_to_read_without_freezing_anyone() -> None:
    """`server_ready` False: the server answers "wait" before freezing; the client's next
    attempts go server-first, so neither app is frozen again until the app has read."""
    world = World(max_attempts=2)
    world.app_read = False
    server = world.daemons[SERVER].engine
    for _ in range(2000):
        if server.stats["app_not_read"] >= 5 or not world.step_default():
            break
    assert server.stats["app_not_read"] >= 5
    freezes = [n for n, a in world.log if a == "Freeze"]
    assert freezes == [CLIENT]  # attempt 1 froze the client first; never again
    assert not world.procs[CLIENT].frozen and not world.procs[SERVER].frozen
    world.app_read = True
    world.drain()
    assert world.check_final() == ["swapped"]
    assert world.daemons[CLIENT].engine.stats["gave_up"] == 0


def test_server_never_ready_gives_up_after_max_waits() -> None:
    world = World(max_waits=6)
    world.app_read = False
    world.drain()
    assert world.check_final() == ["overlay"]
    assert world.daemons[CLIENT].engine.stats["gave_up"] == 1
    assert world.daemons[SERVER].engine.stats["app_not_read"] == 6


def test_accept_and_bind_indexes_follow_closes() -> None:
    """Closing an accepted fd that waits for its bind goes through the fd index; a bind that
    came first is found by its tuple when the accept arrives, and leaves the index."""
    server = _server_engine()  # one traced accept (pid 200, fd 9) waits for its bind
    assert server.accepts_by_fd == {(200, 9): TUP} and server.holds_traced(200, 9, 901)
    assert server.handle(CloseTraced(200, 9)) == [CancelTimer(("accept", 200, 9, 88)),
                                                  CloseSocket(901)]
    assert not server.accepts and not server.accepts_by_fd and server.summary()["short"] == 1
    cid = b"\x07" * 16
    server.handle(HostAccepted(900, 960, 99, CLIENT, {"cid": cid, **TUP2.to_body()}))
    assert server.unbound == {TUP2: cid}
    assert server.handle(AcceptTraced(200, 10, 89, TUP2, 902)) == [CancelTimer(("bind", cid))]
    assert server.conns[cid].matched and not server.unbound and not server.accepts
    assert server.holds_traced(200, 10, 902) and not server.holds_traced(200, 10, 903)


@pytest.mark.parametrize("node", [CLIENT, SERVER])
@pytest.mark.parametrize("min_age", [0.0, 0.2])
def test_socket_handed_to_a_child_is_swapped_there(node: str, min_age: float) -> None:
    """Accept (or connect), fork, the parent closes: the connection is swapped in the child
    (every freeze, replace and thaw names the child's pid; the world asserts the thaw's)."""
    world = World(min_age=min_age)
    world.deliver_inbox(node, 0)  # the traced accept / connect
    world.app_hand_off(node)
    world.drain()
    assert world.check_final() == ["swapped"]
    engine = world.daemons[node].engine
    assert engine.stats["fd_moved"] >= 1 and engine.stats["moved_during_swap"] == 0
    new_pid = world.procs[node].pid
    pids = {a.pid for n, a in world.actions
            if n == node and isinstance(a, (Freeze, ReplaceFd))}
    assert pids == {new_pid}


@pytest.mark.parametrize(("unread", "k"), STEP_CASES)
def test_hand_off_at_every_step(unread: tuple[int, int], k: int) -> None:
    """The server app hands its connection to a child at any step where it runs: the
    connection ends swapped, or (moved mid-swap) on the overlay on both sides."""
    world = World(unread=unread)
    for _ in range(k):
        world.step_default()
    if not world.procs[SERVER].frozen and not any(n == SERVER for n, _ in world.pending):
        world.app_hand_off(SERVER)
    world.drain()
    assert world.check_final() in (["swapped"], ["overlay"])


def test_shared_socket_waits_both_sides_then_swaps() -> None:
    """While two processes hold a side's socket, no one is frozen: the client waits, the
    server answers "wait"; once one holder is left the swap goes through."""
    for node in (CLIENT, SERVER):
        world = World(max_attempts=2)
        world.shared[node] = True
        for _ in range(2000):
            if world.daemons[node].engine.stats["socket_shared"] >= 3 \
                    or not world.step_default():
                break
        assert world.daemons[node].engine.stats["socket_shared"] >= 3
        assert not any(a == "Freeze" for n, a in world.log if n == node)
        world.shared[node] = False
        world.drain()
        assert world.check_final() == ["swapped"]


def test_moved_accept_waits_for_its_bind_under_the_new_holder() -> None:
    """An accept waiting for its bind moves with its timer; the old (pid, fd) means nothing
    any more, and the bind matches the new holder."""
    server = _server_engine()  # one traced accept (pid 200, fd 9) waits for its bind
    acts = server.handle(FdMoved(200, 9, 300, 9))
    assert acts == [CancelTimer(("accept", 200, 9, 88)),
                    StartTimer(("accept", 300, 9, 88), server.config.bind_wait)]
    assert server.accepts_by_fd == {(300, 9): TUP} and server.holds_traced(300, 9, 901)
    assert server.handle(CloseTraced(200, 9)) == []  # the parent's close: nothing
    assert server.handle(TimerFired(AcceptTimer(200, 9, 88))) == []
    cid = b"\x07" * 16
    server.handle(HostAccepted(900, 960, 99, CLIENT, {"cid": cid, **TUP.to_body()}))
    assert server.conns[cid].pid == 300 and server.conns[cid].fd == 9
    assert server.handle(FdMoved(1, 2, 3, 4)) == []  # unknown: ignored


@pytest.mark.parametrize("n", [1, 3])
def test_eager_world_swaps_at_birth_and_resumes_everyone(n: int) -> None:
    world = World(n=n, eager=True)
    world.drain()
    assert world.check_final() == ["swapped"] * n
    for node in (CLIENT, SERVER):
        stats = world.daemons[node].engine.stats
        assert stats["swapped"] == stats["swapped_eager"] == n
        assert not world.procs[node].stopped
    assert "Bounce" not in [a for _, a in world.log]  # nothing to carry: no byte was sent
