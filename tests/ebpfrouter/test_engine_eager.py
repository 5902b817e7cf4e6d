"""The eager swap in the engine, without I/O: stop holds, the message path, every fallback
resumes the stopped apps exactly once and leaves the connection to the late swap."""

from __future__ import annotations

import os
import sys
from typing import Any

from ebpfrouter.engine import (
    AcceptTraced,
    ConnectTraced,
    Engine,
    EngineConfig,
    FourTuple,
    FreezeDone,
    HostAccepted,
    HostConnected,
    HostListenerOpened,
    ListenTraced,
    PeerMessage,
    PeerUp,
    QueuesChecked,
    ReplaceDone,
    Resume,
    StopUnclaimed,
    TimerFired,
)
from ebpfrouter.engine.actions import (
    EagerListener,
    EagerPeer,
    Freeze,
    HostConnect,
    OpenHostListener,
    ReplaceFd,
    SendPeer,
    StartTimer,
    Thaw,
)
from ebpfrouter.engine.keys import ConnTimer, EagerTimer

sys.path.insert(0, os.path.dirname(__file__))
from enginesim import CLIENT, SERVER, peer_of  # noqa: E402

TUP = FourTuple("10.244.1.2", 40000, "10.244.2.2", 5201)
CID = b"\x01" * 16


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def client_engine(**config: Any) -> Engine:
    eng = Engine(EngineConfig(CLIENT, **config), peer_of, new_cid=lambda: CID)
    eng.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000, "eager": True}))
    return eng


def server_engine(**config: Any) -> tuple[Engine, int]:
    eng = Engine(EngineConfig(SERVER, **{"eager_mode": "always", **config}), peer_of)
    out = eng.handle(ListenTraced(200, 3, 900, "10.244.2.2", 5201))
    ref = of(out, OpenHostListener)[0].ref
    out = eng.handle(HostListenerOpened(ref, 77, "192.168.77.2", 41000))
    assert of(out, EagerListener) == [EagerListener("10.244.2.2", 5201, True, remote=False)]
    assert of(eng.handle(PeerUp(CLIENT)), EagerPeer) == [EagerPeer(CLIENT, True)]
    return eng, 77


def test_announcements_keep_the_kernel_maps() -> None:
    eng = Engine(EngineConfig(CLIENT), peer_of)
    body = {"overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
            "host_port": 41000}
    assert of(eng.handle(PeerMessage(SERVER, "listener_add", body)), EagerListener) == []
    out = eng.handle(PeerMessage(SERVER, "listener_add", {**body, "eager": True}))
    assert of(out, EagerListener) == [EagerListener("10.244.2.2", 5201, True, remote=True)]
    from ebpfrouter.engine import PeerLost

    out = eng.handle(PeerLost(SERVER))
    assert EagerListener("10.244.2.2", 5201, False, remote=True) in out
    assert EagerPeer(SERVER, False) in out


def test_client_eager_path_resumes_once_after_the_commit() -> None:
    eng = client_engine()
    out = eng.handle(ConnectTraced(100, 5, 1000, TUP, 11, stopped=True))
    connect = of(out, HostConnect)[0]
    assert connect.bind["eager"] is True and not of(out, Resume)
    out = eng.handle(HostConnected(connect.ref, 12, 2000))
    freeze = of(out, Freeze)[0]  # ours is seized and checked while the server works
    out = eng.handle(FreezeDone(freeze.ref))
    check = out[0]
    out = eng.handle(QueuesChecked(check.ref, 0, 0, bytes_acked=1, bytes_received=0))
    assert of(out, StartTimer) and not of(out, ReplaceFd)  # waiting, at most eager_wait
    out = eng.handle(PeerMessage(SERVER, "swap_ready", {"cid": CID, "attempt": 1,
                                                        "stage": "replaced", "migrate_len": 0}))
    replace = of(out, ReplaceFd)[0]
    assert replace.overlay_local == ("10.244.1.2", 40000)
    assert replace.overlay_peer == ("10.244.2.2", 5201)
    out = eng.handle(ReplaceDone(replace.ref))
    names = [type(a).__name__ for a in out]
    assert names.index("Thaw") < names.index("Resume")  # SIGCONT after the detach
    assert of(out, Resume) == [Resume(100)]
    assert of(out, SendPeer)[0].type == "swap_commit"
    assert eng.stats["swapped_eager"] == 1
    assert eng.conns[CID].summary()["path"] == "eager"


def await_server(eng: Engine, ev: ConnectTraced, sock: int) -> Any:
    """Drive a stopped connect to the point where the client waits for the server's
    replace (seized, checked); the wait's timer key."""
    out = eng.handle(ev)
    out = eng.handle(HostConnected(of(out, HostConnect)[0].ref, sock, sock + 1000))
    out = eng.handle(FreezeDone(of(out, Freeze)[0].ref))
    out = eng.handle(QueuesChecked(out[0].ref, 0, 0, bytes_acked=1, bytes_received=0))
    return [a for a in of(out, StartTimer) if isinstance(a.key, ConnTimer)][-1].key


def test_client_timeout_resumes_and_falls_back_to_the_late_swap() -> None:
    eng = client_engine(min_age=0.2)
    timer = await_server(eng, ConnectTraced(100, 5, 1000, TUP, 11, stopped=True), 12)
    out = eng.handle(TimerFired(timer))
    assert of(out, Thaw) and of(out, Resume) == [Resume(100)]
    assert of(out, SendPeer)[0].type == "swap_abort"
    later = [a for a in of(out, StartTimer) if isinstance(a.key, ConnTimer)]
    assert later and later[-1].delay >= 0.2  # the late swap waits for min_age too
    assert eng.stats["eager_fallback"] == 1
    assert eng.conns[CID].summary()["path"] == "overlay"


def test_a_payload_on_the_overlay_aborts_the_eager_attempt() -> None:
    eng = client_engine()
    out = eng.handle(ConnectTraced(100, 5, 1000, TUP, 11, stopped=True))
    out = eng.handle(HostConnected(of(out, HostConnect)[0].ref, 12, 2000))
    out = eng.handle(FreezeDone(of(out, Freeze)[0].ref))
    out = eng.handle(QueuesChecked(out[0].ref, 0, 0, bytes_acked=12, bytes_received=0))
    assert not of(out, ReplaceFd) and of(out, Thaw) and of(out, Resume) == [Resume(100)]
    assert eng.stats["eager_not_pristine"] == 1


def test_two_stopped_connects_of_one_process_resume_it_once_at_the_last() -> None:
    cids = iter([b"\x01" * 16, b"\x02" * 16])
    eng = Engine(EngineConfig(CLIENT, min_age=0.2), peer_of, new_cid=lambda: next(cids))
    eng.handle(PeerMessage(SERVER, "listener_add", {
        "overlay_addr": "10.244.2.2", "overlay_port": 5201, "host_addr": "192.168.77.2",
        "host_port": 41000, "eager": True}))
    timer_a = await_server(eng, ConnectTraced(100, 5, 1000, TUP, 11, stopped=True), 12)
    tup2 = FourTuple("10.244.1.2", 40001, "10.244.2.2", 5201)
    timer_b = await_server(eng, ConnectTraced(100, 6, 1001, tup2, 13, stopped=True), 14)
    assert not of(eng.handle(TimerFired(timer_a)), Resume)  # b still needs it stopped
    assert of(eng.handle(TimerFired(timer_b)), Resume) == [Resume(100)]


def test_a_stop_nobody_claims_is_resumed_unless_held() -> None:
    eng = client_engine()
    assert of(eng.handle(StopUnclaimed(100)), Resume) == [Resume(100)]
    eng.handle(ConnectTraced(100, 5, 1000, TUP, 11, stopped=True))
    assert not of(eng.handle(StopUnclaimed(100)), Resume)


def test_ruled_out_or_unannounced_connects_resume_at_once() -> None:
    eng = Engine(EngineConfig(CLIENT, min_age=0.2), peer_of)  # no listener announced
    out = eng.handle(ConnectTraced(100, 5, 1000, TUP, 11, stopped=True))
    assert of(out, Resume) == [Resume(100)] and eng.stats["eager_no_listener"] == 1
    assert (100, 5) in eng.young  # it ages like any connection
    eng = Engine(EngineConfig(CLIENT), peer_of, allow=lambda role, pid, conn: False)
    out = eng.handle(ConnectTraced(100, 5, 1000, TUP, 11, stopped=True))
    assert of(out, Resume) == [Resume(100)]


def test_server_eager_path_and_its_fallbacks() -> None:
    eng, lst = server_engine()
    bind = {"cid": CID, **TUP.to_body(), "eager": True}
    out = eng.handle(AcceptTraced(200, 50, 3000, TUP, 21, stopped=True))
    assert of(out, StartTimer)[-1].key == EagerTimer(200, 50, 3000)
    out = eng.handle(HostAccepted(lst, 22, 3001, CLIENT, bind))
    freeze = of(out, Freeze)[0]
    out = eng.handle(FreezeDone(freeze.ref))
    out = eng.handle(QueuesChecked(out[0].ref, 0, 0, bytes_acked=0, bytes_received=0))
    replace = of(out, ReplaceFd)[0]
    assert replace.overlay_local == ("10.244.2.2", 5201)
    assert replace.overlay_peer == ("10.244.1.2", 40000)
    out = eng.handle(ReplaceDone(replace.ref))
    assert of(out, SendPeer)[0].body["stage"] == "replaced" and not of(out, Resume)
    out = eng.handle(PeerMessage(CLIENT, "swap_commit", {"cid": CID, "attempt": 1}))
    assert of(out, Resume) == [Resume(200)] and eng.stats["swapped_eager"] == 1

    # the client's bind never comes in time: the app resumes, the accept waits as usual
    eng, lst = server_engine()
    eng.handle(AcceptTraced(200, 50, 3000, TUP, 21, stopped=True))
    out = eng.handle(TimerFired(EagerTimer(200, 50, 3000)))
    assert of(out, Resume) == [Resume(200)]
    out = eng.handle(HostAccepted(lst, 22, 3001, CLIENT, bind))  # late: decline, no stop
    assert of(out, SendPeer)[0].body["reason"] == "app not stopped at accept"
    assert not of(out, Freeze) and not of(out, Resume)


def test_auto_mode_learns_eagerness_from_lifetimes() -> None:
    """A listener becomes eager after long connections, and stops being eager when most of
    its connections close young (short connections must not pay for stops)."""
    eng = Engine(EngineConfig(SERVER, eager_after=3, eager_window=8), peer_of)
    ref = of(eng.handle(ListenTraced(200, 3, 900, "10.244.2.2", 5201)), OpenHostListener)[0].ref
    out = eng.handle(HostListenerOpened(ref, 77, "192.168.77.2", 41000))
    assert not of(out, EagerListener)  # nothing learned yet: late
    outs = []
    for i in range(3):  # three connections bound after their client's min_age: long
        tup = FourTuple("10.244.1.2", 41000 + i, "10.244.2.2", 5201)
        eng.handle(AcceptTraced(200, 60 + i, 3100 + i, tup, 30 + i))
        outs += eng.handle(HostAccepted(77, 40 + i, 3200 + i, CLIENT,
                                        {"cid": bytes([i + 1]) * 16, **tup.to_body()}))
    assert of(outs, EagerListener) == [EagerListener("10.244.2.2", 5201, True, remote=False)]
    assert [a.body["eager"] for a in of(outs, SendPeer) if a.type == "listener_add"] == [True]
    from ebpfrouter.engine import CloseTraced

    outs = []
    for i in range(3):  # then short ones: closed before their bind
        tup = FourTuple("10.244.1.2", 42000 + i, "10.244.2.2", 5201)
        eng.handle(AcceptTraced(200, 70 + i, 3300 + i, tup, 50 + i))
        outs += eng.handle(CloseTraced(200, 70 + i))
    assert EagerListener("10.244.2.2", 5201, False, remote=False) in outs


def test_short_lived_counts_from_the_kernel_teach_the_listener() -> None:
    """Accepts the kernel forgot young (`ShortLived`) count as short outcomes: a listener
    learned eager turns late; a count above the window is one window's worth."""
    from ebpfrouter.engine import ShortLived

    eng = Engine(EngineConfig(SERVER, eager_after=3, eager_window=8), peer_of)
    ref = of(eng.handle(ListenTraced(200, 3, 900, "10.244.2.2", 5201)), OpenHostListener)[0].ref
    eng.handle(HostListenerOpened(ref, 77, "192.168.77.2", 41000))
    for i in range(3):
        tup = FourTuple("10.244.1.2", 41000 + i, "10.244.2.2", 5201)
        eng.handle(AcceptTraced(200, 60 + i, 3100 + i, tup, 30 + i))
        eng.handle(HostAccepted(77, 40 + i, 3200 + i, CLIENT,
                                {"cid": bytes([i + 1]) * 16, **tup.to_body()}))
    assert eng.book.eager_local(("10.244.2.2", 5201))
    assert not of(eng.handle(ShortLived("10.244.2.9", 5201, 5)), EagerListener)  # not ours
    out = eng.handle(ShortLived("10.244.2.2", 5201, 1000))
    assert of(out, EagerListener) == [EagerListener("10.244.2.2", 5201, False, remote=False)]
    assert list(eng.book.lifetimes[("10.244.2.2", 5201)]) == [False] * 8


def test_a_rules_swap_key_overrides_the_learned_mode() -> None:
    from ebpfrouter.rules import RuleError, RuleSet, parse_rule_text

    rule = parse_rule_text("type=cidr\nfrom=10.244.2.0/24\nto=10.244.1.0/24\nswap=eager\n")
    assert rule.swap == "eager"
    rules = RuleSet.from_rules([rule])
    assert rules.swap_mode("10.244.2.2") == "eager" and rules.swap_mode("10.244.3.1") is None
    for bad in ("swap=soon", "swap="):
        try:
            parse_rule_text(f"type=cidr\nfrom=10.0.0.0/8\nto=10.0.0.0/8\n{bad}\n", "r1")
        except RuleError as exc:
            assert "swap" in str(exc) and "r1:4" in str(exc)
        else:
            raise AssertionError(bad)
    mode = {"value": "eager"}
    eng = Engine(EngineConfig(SERVER), peer_of, listener_mode=lambda a, p: mode["value"])
    ref = of(eng.handle(ListenTraced(200, 3, 900, "10.244.2.2", 5201)), OpenHostListener)[0].ref
    out = eng.handle(HostListenerOpened(ref, 77, "192.168.77.2", 41000))
    assert of(out, EagerListener) == [EagerListener("10.244.2.2", 5201, True, remote=False)]
    mode["value"] = "late"
    out = eng.rules_changed()
    assert of(out, EagerListener) == [EagerListener("10.244.2.2", 5201, False, remote=False)]
    assert of(out, SendPeer)[0].body["eager"] is False
