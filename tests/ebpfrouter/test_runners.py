"""The action -> runner table: every engine action has a family, and every family a runner in
the daemon and in the engine simulation (no root: nothing is started)."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from enginesim import World  # noqa: E402

from ebpfrouter.config import RouterConfig  # noqa: E402
from ebpfrouter.daemon import Daemon, DaemonOptions  # noqa: E402
from ebpfrouter.engine import actions  # noqa: E402
from ebpfrouter.runners import ACTION_RUNNERS, Family, UnknownAction  # noqa: E402


def _concrete_actions() -> set[type[actions.Action]]:
    """Every Action subclass defined in ebpfrouter.engine.actions (found by introspection)."""
    found: set[type[actions.Action]] = set()
    todo = list(actions.Action.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not inspect.isabstract(cls) and cls.__module__.startswith("ebpfrouter.engine"):
            found.add(cls)
    for _, member in inspect.getmembers(actions, inspect.isclass):
        if issubclass(member, actions.Action) and member is not actions.Action:
            found.add(member)
    return found


def test_every_action_has_a_family() -> None:
    missing = sorted(c.__name__ for c in _concrete_actions() - set(ACTION_RUNNERS))
    assert not missing, f"actions without a runner family in ACTION_RUNNERS: {missing}"
    assert _concrete_actions(), "no actions found"


def test_table_names_only_actions() -> None:
    for cls, family in ACTION_RUNNERS.items():
        assert issubclass(cls, actions.Action), cls
        assert isinstance(family, Family), (cls, family)


def test_every_family_is_used() -> None:
    assert set(ACTION_RUNNERS.values()) == set(Family)


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    d = Daemon(DaemonOptions(RouterConfig()))
    yield d
    d.injector.pool.shutdown(wait=True)


def test_daemon_has_a_runner_per_family(daemon: Daemon) -> None:
    assert set(daemon.runner_for) == set(Family)
    for family, runner in daemon.runner_for.items():
        assert callable(getattr(runner, "run", None)), (family, runner)


def test_sim_has_a_runner_per_family() -> None:
    world = World()
    assert set(world.runners) == set(Family)


def test_a_runner_refuses_actions_of_another_family(daemon: Daemon) -> None:
    """The table and the runners agree: a runner given another family's action says so."""
    closer = daemon.runner_for[Family.SOCKETS]
    with pytest.raises(UnknownAction, match="cannot run SendPeer"):
        closer.run(actions.SendPeer(None, "listener_add", {}))
