"""A STAND-IN for the Kubernetes API server, for tests only.

No API server can run on the test machines, so this small threaded HTTP server on
127.0.0.1 speaks the part of the real protocol the router uses, for pods and nodes:

- `GET /api/v1/pods`, `/api/v1/namespaces/NS/pods`, `/api/v1/nodes`: JSON lists with
  `metadata.resourceVersion`, filtered by `fieldSelector` (`a=b`, `a==b`, `a!=b`, comma-joined).
- `?watch=true`: a chunked stream of `{"type": "ADDED|MODIFIED|DELETED|ERROR", "object": ...}`
  lines from `resourceVersion` on (without one: the current objects as ADDED first), ended
  after `timeoutSeconds` (with `allowWatchBookmarks=true`, a BOOKMARK event carrying the
  version reached comes just before the end); a resourceVersion older than the compaction
  point gets the real server's answer, an ERROR event carrying a 410 `Status`
  ("too old resource version").
- `GET` of one object (`/api/v1/namespaces/NS/secrets/NAME`) and the discovery documents
  (`/version`, `/api`, `/apis`, `/api/v1`, ...) that helm needs for `lookup`.
- Knobs for tests: `compact()` (expire old resourceVersions), `drop_watches()` (end open
  streams as an apiserver restart does), `expire_watches()` (send the 410 ERROR event on open
  streams), `fail_next(n)` (answer the next n requests with a 500 `Status`), and
  `stop()`/`start()` on the same port (the API becomes unreachable, then comes back).
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

KINDS = {"pods": "Pod", "nodes": "Node", "secrets": "Secret"}
NAMESPACED = {"pods", "secrets"}
# Discovery answers, so that helm (`--dry-run=server`, `lookup`) can map kinds to resources.
DISCOVERY: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("pods", "Pod", True), ("nodes", "Node", False), ("secrets", "Secret", True),
           ("configmaps", "ConfigMap", True), ("serviceaccounts", "ServiceAccount", True),
           ("services", "Service", True)],
    "apps/v1": [("daemonsets", "DaemonSet", True)],
    "rbac.authorization.k8s.io/v1": [("clusterroles", "ClusterRole", False),
                                     ("clusterrolebindings", "ClusterRoleBinding", False)],
}


def _field(obj: dict[str, Any], dotted: str) -> str:
    value: Any = obj
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _selector_matches(selector: str, obj: dict[str, Any]) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if _field(obj, key) == value:
                return False
        else:
            key, value = term.replace("==", "=").split("=", 1)
            if _field(obj, key) != value:
                return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class StandInApiServer:
    """The stand-in server. Use as a context manager; `url` is for the kubernetes client."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self._lock = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, resource, type, obj)
        self._rv = 100
        self._compacted = 0
        self._generation = 0  # bumped by drop_watches/expire_watches/stop
        self._expire_generation = 0
        self._fail_next = 0
        self._port = port
        self.host = host  # another address, e.g. for routers in other network namespaces
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[str] = []  # request paths with query, for assertions
        self.open_watches = 0
        self._bookmark_on_drop = True
        self._connections: set[socket.socket] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def start(self) -> StandInApiServer:
        """Listen (again) on `host` (127.0.0.1) and the same port as before."""
        server = ThreadingHTTPServer((self.host, self._port), _handler_for(self))
        server.daemon_threads = False
        server.block_on_close = True  # stop() joins every handler thread
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="apiserver-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port and every open stream: the API is unreachable until `start()`."""
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            self._generation += 1
            self._lock.notify_all()
        server.shutdown()
        with self._lock:  # idle keep-alive connections too: a dead server resets them all
            for conn in list(self._connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> StandInApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- objects -----------------------------------------------------------------------------
    def _record(self, resource: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append((self._rv, resource, kind, copy.deepcopy(obj)))
        self._lock.notify_all()
        return obj

    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace an object (ADDED or MODIFIED); returns it with its resourceVersion."""
        meta = obj["metadata"]
        meta.setdefault("namespace", "default" if resource in NAMESPACED else None)
        key = (meta.get("namespace") or "", meta["name"])
        with self._lock:
            old = self._objects[resource].get(key)
            if old is not None:
                meta.setdefault("uid", old["metadata"]["uid"])
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
            if meta.get("namespace") is None:
                meta.pop("namespace")
            stored = self._record(resource, "MODIFIED" if old else "ADDED", obj)
            self._objects[resource][key] = stored
            return copy.deepcopy(stored)

    def delete(self, resource: str, name: str, namespace: str = "default") -> None:
        key = (namespace if resource in NAMESPACED else "", name)
        with self._lock:
            obj = self._objects[resource].pop(key)
            self._record(resource, "DELETED", obj)

    def get(self, resource: str, name: str, namespace: str = "default") -> dict[str, Any]:
        with self._lock:
            key = (namespace if resource in NAMESPACED else "", name)
            return copy.deepcopy(self._objects[resource][key])

    # -- failure knobs -----------------------------------------------------------------------
    def compact(self) -> int:
        """Forget history: watches from any resourceVersion before now get 410 Gone."""
        with self._lock:
            self._compacted = self._rv
            self._events = []
            return self._compacted

    def drop_watches(self, bookmark: bool = True) -> None:
        """End every open watch stream (clients re-watch from their last version).

        `bookmark=False` ends them without the final BOOKMARK, as a restarting server does.
        """
        with self._lock:
            self._bookmark_on_drop = bookmark
            self._generation += 1
            self._lock.notify_all()

    def expire_watches(self) -> None:
        """Compact, and tell every open watch with an ERROR event carrying 410 Gone."""
        with self._lock:
            self._compacted = self._rv
            self._events = []
            self._expire_generation += 1
            self._lock.notify_all()

    def fail_next(self, count: int) -> None:
        """Answer the next `count` requests with HTTP 500 and a `Status` body."""
        with self._lock:
            self._fail_next = count

    # -- request handling --------------------------------------------------------------------
    def _take_failure(self) -> bool:
        with self._lock:
            if self._fail_next > 0:
                self._fail_next -= 1
                return True
            return False

    def _list(self, resource: str, namespace: str | None, selector: str) -> dict[str, Any]:
        with self._lock:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self._objects[resource].items())
                     if (namespace is None or ns == namespace) and _selector_matches(selector, o)]
            for item in items:  # list items carry no kind/apiVersion, as on the real server
                item.pop("kind", None)
                item.pop("apiVersion", None)
            return {"kind": KINDS[resource] + "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _watch(self, handler: BaseHTTPRequestHandler, resource: str, namespace: str | None,
               selector: str, since: str | None, timeout: float,
               bookmarks: bool = False) -> None:
        def send(event: dict[str, Any]) -> None:
            data = (json.dumps(event) + "\n").encode()
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            handler.wfile.flush()

        def visible(obj: dict[str, Any]) -> bool:
            ns = obj["metadata"].get("namespace")
            return (namespace is None or ns == namespace) and _selector_matches(selector, obj)

        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        deadline = time.monotonic() + timeout
        with self._lock:
            self.open_watches += 1
            self._lock.notify_all()
            generation, expire_gen = self._generation, self._expire_generation
            if since in (None, "", "0"):
                pending = [("ADDED", o) for o in self._objects[resource].values() if visible(o)]
                position = self._rv
            elif int(since) < self._compacted:
                pending = [("ERROR", _status(
                    410, "Expired", f"too old resource version: {since} ({self._compacted})"))]
                position = None
            else:
                position = int(since)
                pending = []
        try:
            while True:
                for kind, obj in pending:
                    send({"type": kind, "object": obj})
                if position is None:
                    break
                with self._lock:
                    while True:
                        if (self._generation != generation or not self.running
                                or time.monotonic() >= deadline):
                            pending = None
                            break
                        if self._expire_generation != expire_gen:
                            pending = [("ERROR", _status(
                                410, "Expired", f"too old resource version: {position} "
                                f"({self._compacted})"))]
                            position = None
                            break
                        new = [(k, copy.deepcopy(o)) for rv, r, k, o in self._events
                               if rv > position and r == resource and visible(o)]
                        if self._events and self._events[-1][0] > position:
                            position = self._events[-1][0]
                        if new:
                            pending = new
                            break
                        self._lock.wait(min(0.2, max(0.0, deadline - time.monotonic())))
                if pending is None:
                    break
            if bookmarks and position is not None and self.running and self._bookmark_on_drop:
                # As the real server does before it ends a stream: the version reached.
                with self._lock:
                    version = str(max(position, self._rv))
                send({"type": "BOOKMARK", "object": {
                    "kind": KINDS[resource], "apiVersion": "v1",
                    "metadata": {"resourceVersion": version}}})
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self._lock:
                self.open_watches -= 1
                self._lock.notify_all()

    def wait_watching(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until at least `count` watch streams are open."""
        with self._lock:
            return self._lock.wait_for(lambda: self.open_watches >= count, timeout)

    def _discovery(self, path: str) -> dict[str, Any] | None:
        if path == "/version":
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0",
                    "platform": "linux/amd64"}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self._port}"}]}
        if path == "/apis":
            groups = []
            for gv in DISCOVERY:
                if "/" in gv:
                    group, version = gv.split("/")
                    entry = {"groupVersion": gv, "version": version}
                    groups.append({"name": group, "versions": [entry],
                                   "preferredVersion": entry})
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
        gv = path.removeprefix("/api/").removeprefix("/apis/")
        if path.startswith(("/api/", "/apis/")) and gv in DISCOVERY:
            return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                    "resources": [{"name": n, "singularName": k.lower(), "namespaced": ns,
                                   "kind": k, "verbs": ["get", "list", "watch"]}
                                  for n, k, ns in DISCOVERY[gv]]}
        return None

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlparse(handler.path)
        self.requests.append(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = url.path.strip("/").split("/")
        namespace = None
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (5, 6):
            namespace, parts = parts[3], ["api", "v1", *parts[4:]]
        if self._take_failure():
            return _reply(handler, 500, _status(500, "InternalError", "stand-in: injected failure"))
        discovery = self._discovery(url.path.rstrip("/"))
        if discovery is not None:
            return _reply(handler, 200, discovery)
        if len(parts) == 4 and parts[:2] == ["api", "v1"] and parts[2] in KINDS:
            try:
                return _reply(handler, 200, {"kind": KINDS[parts[2]], "apiVersion": "v1",
                                             **self.get(parts[2], parts[3], namespace or "")})
            except KeyError:
                return _reply(handler, 404, _status(404, "NotFound",
                                                    f'{parts[2]} "{parts[3]}" not found'))
        if len(parts) != 3 or parts[:2] != ["api", "v1"] or parts[2] not in KINDS:
            return _reply(handler, 404, _status(404, "NotFound", f"no route {url.path}"))
        resource = parts[2]
        selector = query.get("fieldSelector", "")
        if query.get("watch") in ("true", "1"):
            timeout = float(query.get("timeoutSeconds", "1800"))
            return self._watch(handler, resource, namespace, selector,
                               query.get("resourceVersion"), timeout,
                               query.get("allowWatchBookmarks") == "true")
        return _reply(handler, 200, self._list(resource, namespace, selector))


def _reply(handler: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _handler_for(standin: StandInApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with standin._lock:
                standin._connections.add(self.connection)

        def finish(self) -> None:
            with standin._lock:
                standin._connections.discard(self.connection)
            with contextlib.suppress(OSError):
                super().finish()

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            standin.handle(self)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


def make_pod(name: str, node: str, ip: str, labels: dict[str, str] | None = None,
             namespace: str = "default", uid: str | None = None,
             host_network: bool = False, phase: str = "Running",
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """A Pod as the API returns it (the fields the router reads, and the required ones)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels or {})}
    if uid:
        meta["uid"] = uid
    if annotations:
        meta["annotations"] = dict(annotations)
    return {
        "kind": "Pod", "apiVersion": "v1", "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": host_network,
                 "containers": [{"name": "main", "image": "registry.example/app:1"}]},
        "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}] if ip else []},
    }


def make_node(name: str, internal_ip: str, pod_cidrs: list[str],
              external_ip: str | None = None) -> dict[str, Any]:
    """A Node as the API returns it."""
    addresses = [{"type": "Hostname", "address": name}, {"type": "InternalIP",
                                                          "address": internal_ip}]
    if external_ip:
        addresses.append({"type": "ExternalIP", "address": external_ip})
    spec: dict[str, Any] = {}
    if pod_cidrs:
        spec = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)}
    return {"kind": "Node", "apiVersion": "v1", "metadata": {"name": name, "labels": {}},
            "spec": spec, "status": {"addresses": addresses}}


def wait_for(predicate: Callable[[], object], timeout: float = 5.0,
             interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass (test helper)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)
    return True
