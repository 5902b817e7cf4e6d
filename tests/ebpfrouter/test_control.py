"""The control socket, health endpoints and metrics, over real sockets."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

import pytest

from ebpfrouter.control import (
    ControlError,
    ControlServer,
    HealthServer,
    Metrics,
    format_status,
    query_status,
)


def test_metrics_render_prometheus_text() -> None:
    metrics = Metrics()
    metrics.declare("swaps_total", "counter", "Swaps by outcome.")
    metrics.declare("connections", "gauge", "Connections tracked.")
    metrics.inc("swaps_total", outcome="done")
    metrics.inc("swaps_total", 2, outcome="done")
    metrics.inc("swaps_total", outcome='ab"orted')
    metrics.set("connections", 7)
    text = metrics.render()
    assert "# TYPE ebpf_router_swaps_total counter" in text
    assert 'ebpf_router_swaps_total{outcome="done"} 3' in text
    assert 'ebpf_router_swaps_total{outcome="ab\\"orted"} 1' in text
    assert "ebpf_router_connections 7" in text
    assert metrics.value("swaps_total", outcome="done") == 3
    with pytest.raises(KeyError, match="never declared"):
        metrics.inc("nope")


def test_status_round_trip(tmp_path) -> None:
    path = str(tmp_path / "control.sock")
    status = {"node": "n1", "uptime_s": 3.0, "counters": {"seen": 2, "bypassed": 1},
              "connections": [{"state": "swapped", "pid": 42, "fd": 7, "tuple": "a->b"}]}
    with ControlServer(path, lambda: status):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)
        assert query_status(path) == status
        text = format_status(query_status(path))
        assert "bypassed 1" in text and "swapped" in text and "a->b" in text
    assert not os.path.exists(path)


def test_status_errors_are_clear(tmp_path) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(ControlError, match="does not exist"):
        query_status(missing)

    def broken() -> dict:
        raise RuntimeError("engine exploded")

    path = str(tmp_path / "c.sock")
    with ControlServer(path, broken):
        with pytest.raises(ControlError, match="engine exploded"):
            query_status(path)
        # Garbage requests get an error answer and the server keeps serving.
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(path)
            conn.sendall(b"not json\n")
            assert json.loads(conn.makefile().readline())["ok"] is False


def test_second_daemon_refused_stale_socket_replaced(tmp_path) -> None:
    path = str(tmp_path / "c.sock")
    with ControlServer(path, dict), pytest.raises(ControlError, match="in use"):
        ControlServer(path, dict).start()
    # A stale socket file (daemon died) is replaced.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    with ControlServer(path, lambda: {"ok": 1}):
        assert query_status(path) == {"ok": 1}


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_health_endpoints() -> None:
    metrics = Metrics()
    metrics.declare("events_total", "counter", "Events read.")
    metrics.inc("events_total", 5)
    ready = {"value": False}
    with HealthServer(0, metrics, ready=lambda: ready["value"], host="127.0.0.1") as health:
        assert _get(health.port, "/healthz") == (200, "ok\n")
        assert _get(health.port, "/readyz")[0] == 503
        ready["value"] = True
        assert _get(health.port, "/readyz") == (200, "ok\n")
        code, body = _get(health.port, "/metrics")
        assert code == 200 and "ebpf_router_events_total 5" in body
        assert _get(health.port, "/other")[0] == 404


def test_health_port_in_use_is_named() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ControlError, match=f"127.0.0.1:{port}"):
            HealthServer(port, Metrics(), ready=lambda: True, host="127.0.0.1").start()
