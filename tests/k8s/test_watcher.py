"""ListWatcher details not covered through the pod and node sources."""

from __future__ import annotations

from typing import Any

from apiserver_standin import StandInApiServer, make_pod, wait_for
from kubernetes import client

from ebpfrouter.k8s.watcher import Backoff, ListWatcher


def test_backoff_doubles_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next_delay() == 1.0
    jittered = Backoff(initial=1.0, maximum=8.0, jitter=0.2)
    assert all(0.8 <= jittered.next_delay() / d <= 1.2 for d in (1.0, 2.0, 4.0))


def test_a_failing_callback_does_not_kill_the_watcher(standin: StandInApiServer,
                                                      core_api: client.CoreV1Api) -> None:
    standin.put("pods", make_pod("a", "n1", "10.0.0.1"))
    seen: list[list[Any]] = []

    def on_replace(items: list[Any]) -> None:
        seen.append(items)
        if len(seen) == 1:
            raise KeyError("first list breaks")

    watcher = ListWatcher("test", core_api.list_pod_for_all_namespaces, on_replace,
                          lambda kind, obj: None, request_timeout=2.0,
                          backoff=Backoff(initial=0.05, maximum=0.2))
    watcher.start()
    try:
        assert wait_for(lambda: watcher.synced)
        assert len(seen) == 2 and watcher.last_error is None
        assert [p.metadata.name for p in seen[1]] == ["a"]
    finally:
        watcher.stop()
