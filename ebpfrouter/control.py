"""The daemon's local control surface: status over a unix socket, health and metrics over HTTP.

`ebpf-router status` asks the running daemon through a unix stream socket (one JSON request
per line, one JSON answer per line). Kubernetes probes and Prometheus scrape a small HTTP
server: `/healthz` (the daemon's loop is alive), `/readyz` (tracer attached, peers listening)
and `/metrics` (Prometheus text format).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096

StatusProvider = Callable[[], dict[str, Any]]


class ControlError(RuntimeError):
    """The control socket could not be reached or answered wrongly; names the socket path."""


class Metrics:
    """Counters, gauges and histograms, thread-safe, rendered in the Prometheus text format.

    Names are declared once with their help text (and, for a histogram, its bucket bounds);
    `inc` and `set` take optional labels, `observe` adds one sample to a histogram.
    """

    def __init__(self, prefix: str = "ebpf_router") -> None:
        self._prefix = prefix
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self._bounds: dict[str, tuple[float, ...]] = {}
        self._hists: dict[str, _Histogram] = {}

    @property
    def prefix(self) -> str:
        """What every rendered name starts with (then `_`)."""
        return self._prefix

    def declare(self, name: str, kind: str, help_text: str,
                buckets: Iterable[float] = ()) -> None:
        """Declare metric `name` as a 'counter', 'gauge' or 'histogram' with its help line.

        A histogram needs its upper bucket bounds (`+Inf` is added when rendered).
        """
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric {name}: kind must be counter, gauge or histogram, "
                             f"not {kind!r}")
        bounds = tuple(sorted(float(b) for b in buckets))
        if (kind == "histogram") != bool(bounds):
            raise ValueError(f"metric {name}: buckets are for histograms, and a histogram "
                             "needs them")
        with self._lock:
            self._kinds[name] = (kind, help_text)
            self._values.setdefault(name, {})
            if bounds:
                self._bounds[name] = bounds
                self._hists.setdefault(name, _Histogram(bounds))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        """Add `amount` to counter or gauge `name`."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._series(name)
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set gauge `name` to `value`."""
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._series(name)[key] = float(value)

    def observe(self, name: str, value: float) -> None:
        """Add one sample (in the metric's base unit) to histogram `name`."""
        with self._lock:
            hist = self._hists.get(name)
            if hist is None:
                raise KeyError(f"histogram {name!r} was never declared")
            hist.add(value)

    def value(self, name: str, **labels: str) -> float:
        """The current value of one series (0 if never touched); a histogram's count."""
        with self._lock:
            if name in self._hists:
                return float(self._hists[name].count)
            return self._series(name).get(tuple(sorted(labels.items())), 0.0)

    def names(self) -> list[str]:
        """Every sample name `render` writes (histograms: `_bucket`, `_sum`, `_count`)."""
        with self._lock:
            out: list[str] = []
            for name, (kind, _) in sorted(self._kinds.items()):
                full = f"{self._prefix}_{name}"
                out += ([full + s for s in ("_bucket", "_sum", "_count")]
                        if kind == "histogram" else [full])
            return out

    def snapshot(self) -> dict[str, float]:
        """All series as `name{label="v"}` → value, for status output and tests."""
        with self._lock:
            return {
                self._prefix + "_" + name + _format_labels(key): value
                for name, series in self._values.items()
                for key, value in series.items()
            }

    def render(self) -> str:
        """The Prometheus text exposition of every declared metric."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in sorted(self._kinds.items()):
                full = f"{self._prefix}_{name}"
                lines.append(f"# HELP {full} {_escape_help(help_text)}")
                lines.append(f"# TYPE {full} {kind}")
                if kind == "histogram":
                    lines += self._hists[name].lines(full)
                    continue
                series = self._values.get(name) or {(): 0.0}
                for key, value in sorted(series.items()):
                    lines.append(f"{full}{_format_labels(key)} {_format_number(value)}")
        return "\n".join(lines) + "\n"

    def _series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        if name not in self._kinds:
            raise KeyError(f"metric {name!r} was never declared")
        if name in self._hists:
            raise KeyError(f"metric {name!r} is a histogram: use observe()")
        return self._values[name]


class _Histogram:
    """Cumulative bucket counts, sum and count of one unlabelled histogram."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def add(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.count += 1
        self.sum += value

    def lines(self, full: str) -> list[str]:
        out = [f'{full}_bucket{{le="{_format_number(b)}"}} {n}'
               for b, n in zip(self.bounds, self.counts, strict=True)]
        out.append(f'{full}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{full}_sum {_format_number(self.sum)}")
        out.append(f"{full}_count {self.count}")
        return out


def _format_labels(key: Iterable[tuple[str, str]]) -> str:
    parts = [f'{k}="{_escape_label(v)}"' for k, v in key]
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class _ControlHandler(socketserver.StreamRequestHandler):
    server: _ControlUnixServer

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
        if len(line) > MAX_REQUEST_BYTES:
            self._answer({"ok": False, "error": "request too large"})
            return
        try:
            request = json.loads(line)
            command = request["cmd"]
        except (ValueError, KeyError, TypeError):
            self._answer({"ok": False, "error": "expected a JSON object with 'cmd'"})
            return
        if command != "status":
            self._answer({"ok": False, "error": f"unknown command {command!r}"})
            return
        try:
            self._answer({"ok": True, "status": self.server.status_provider()})
        except Exception as exc:  # the daemon must keep serving; report, don't die
            log.exception("status provider failed")
            self._answer({"ok": False, "error": f"status failed: {exc}"})

    def _answer(self, payload: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(payload, default=str).encode() + b"\n")


class _ControlUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, status_provider: StatusProvider) -> None:
        self.status_provider = status_provider
        super().__init__(path, _ControlHandler)


class ControlServer:
    """Answers `status` requests on a unix socket at `path` (mode 0600: root's only)."""

    def __init__(self, path: str, status_provider: StatusProvider) -> None:
        self.path = path
        self._status_provider = status_provider
        self._server: _ControlUnixServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket (replacing a stale one from a dead daemon) and serve in a thread."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        if os.path.exists(self.path):
            if _socket_alive(self.path):
                raise ControlError(f"control socket {self.path} is in use by a running daemon")
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = _ControlUnixServer(self.path, self._status_provider)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="control", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _socket_alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def query_status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon listening on `path` for its status; raise `ControlError` if it cannot."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(path)
            conn.sendall(b'{"cmd": "status"}\n')
            answer = conn.makefile("rb").readline()
    except FileNotFoundError:
        raise ControlError(f"no daemon: control socket {path} does not exist") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from exc
    try:
        reply = json.loads(answer)
    except ValueError:
        raise ControlError(f"control socket {path}: answer is not JSON: {answer[:80]!r}") from None
    if not reply.get("ok"):
        raise ControlError(f"control socket {path}: {reply.get('error', 'unknown error')}")
    return reply["status"]


def format_status(status: dict[str, Any]) -> str:
    """A human-readable rendering of a status answer: counters, then one line per connection."""
    counters = status.get("counters", {})
    lines = [
        f"node {status.get('node', '?')}  up {status.get('uptime_s', 0):.0f}s  "
        f"peers {len(status.get('peers', []))}",
        "  ".join(f"{name} {counters[name]}" for name in sorted(counters)),
    ]
    connections = status.get("connections", [])
    if connections:
        lines.append(f"{'STATE':<12} {'PID':>7} {'FD':>4}  OVERLAY 4-TUPLE")
        for conn in connections:
            lines.append(
                f"{conn.get('state', '?'):<12} {conn.get('pid', '-'):>7} {conn.get('fd', '-'):>4}"
                f"  {conn.get('tuple', '')}"
            )
    return "\n".join(lines)


class HealthServer:
    """`/healthz`, `/readyz` and `/metrics` over HTTP on `host:port` (port 0 picks one)."""

    def __init__(
        self,
        port: int,
        metrics: Metrics,
        ready: Callable[[], bool],
        host: str = "0.0.0.0",
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self._metrics = metrics
        self._ready = ready
        self._alive = alive or (lambda: True)
        self._requested = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        if self._server is None:
            raise ControlError("health server is not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Bind and serve in a background thread."""
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._reply(*_probe(health._alive))
                elif path == "/readyz":
                    self._reply(*_probe(health._ready))
                elif path == "/metrics":
                    self._reply(200, health._metrics.render(), "text/plain; version=0.0.4")
                else:
                    self._reply(404, "not found\n")

            def _reply(self, code: int, body: str, ctype: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("health: " + fmt, *args)

        try:
            self._server = ThreadingHTTPServer(self._requested, Handler)
        except OSError as exc:
            host, port = self._requested
            raise ControlError(f"health port {host}:{port}: {exc.strerror or exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HealthServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _probe(check: Callable[[], bool]) -> tuple[int, str]:
    try:
        ok = check()
    except Exception as exc:  # a probe must answer, not crash the handler
        return 503, f"error: {exc}\n"
    return (200, "ok\n") if ok else (503, "not ready\n")

