"""Container-level labels from the container runtime, for containerLabel rules.

The CRI is gRPC; rather than carry grpcio and generated stubs, the router asks `crictl`
(the CRI's own command-line client) with an explicit `--runtime-endpoint`:
`crictl inspect -o json <id>` answers `{"status": {"labels": {...}, ...}, "info": {...}}`.
A container's labels never change during its life, so answers are cached by container ID.
When a containerLabel rule exists but no runtime answers, startup fails with
`ContainerRuntimeUnavailable`, naming every endpoint tried and why it failed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable, Mapping, Sequence

log = logging.getLogger(__name__)

# Where the common runtimes put their CRI socket.
DEFAULT_ENDPOINTS = (
    "unix:///run/containerd/containerd.sock",
    "unix:///run/crio/crio.sock",
    "unix:///run/k3s/containerd/containerd.sock",
    "unix:///var/run/cri-dockerd.sock",
)
ENDPOINT_ENV = "CONTAINER_RUNTIME_ENDPOINT"  # also what crictl itself reads


class ContainerRuntimeUnavailable(RuntimeError):
    """No container runtime could be reached; the message names each endpoint tried."""

    def __init__(self, attempts: Sequence[tuple[str, str]]) -> None:
        self.attempts = list(attempts)
        tried = "; ".join(f"{endpoint}: {why}" for endpoint, why in self.attempts)
        super().__init__(
            "containerLabel rules need the container runtime, but none is reachable "
            f"(tried {tried}). Mount the runtime's CRI socket into the router "
            "(chart value containerRuntime.socket) or remove the containerLabel rules."
        )


def _socket_path(endpoint: str) -> str:
    return endpoint.removeprefix("unix://")


def _check_socket(path: str) -> str | None:
    """Why `path` is not a usable socket, or None if it is one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such socket"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISSOCK(mode):
        return "exists but is not a socket"
    return None


class CrictlContainerLabels:
    """Container labels through `crictl inspect` on one CRI endpoint (a ContainerLabelSource)."""

    def __init__(self, endpoint: str, crictl: str = "crictl", timeout: float = 5.0,
                 cache_size: int = 4096) -> None:
        self.endpoint = endpoint
        self.crictl = crictl
        self.timeout = timeout
        self._cache: collections.OrderedDict[str, dict[str, str]] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [self.crictl, "--runtime-endpoint", self.endpoint,
                   "--timeout", f"{max(1, int(self.timeout))}s", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=self.timeout + 2,
                              check=False, stdin=subprocess.DEVNULL)

    def check(self) -> str:
        """Ask the runtime for its version; returns crictl's answer or raises RuntimeError."""
        try:
            proc = self._run("version")
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"crictl {self.crictl}: {exc}") from None
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            detail = lines[-1] if lines else f"exit status {proc.returncode}"
            raise RuntimeError(f"crictl version failed: {detail}")
        return proc.stdout

    def inspect(self, container_id: str) -> dict:
        """`crictl inspect` of one container as parsed JSON; raises LookupError if unknown."""
        try:
            proc = self._run("inspect", "-o", "json", container_id)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LookupError(f"container {container_id}: crictl failed: {exc}") from None
        if proc.returncode != 0:
            raise LookupError(f"container {container_id}: {proc.stderr.strip() or 'not found'}")
        try:
            data = json.loads(proc.stdout)
        except ValueError as exc:
            raise LookupError(f"container {container_id}: crictl printed bad JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("status"), dict):
            raise LookupError(f"container {container_id}: no 'status' in crictl's answer")
        return data

    def labels_for(self, container_id: str) -> Mapping[str, str]:
        """The container's labels (`status.labels`); {} if the runtime does not know it."""
        with self._lock:
            if container_id in self._cache:
                self._cache.move_to_end(container_id)
                return self._cache[container_id]
        try:
            raw = self.inspect(container_id)["status"].get("labels") or {}
        except LookupError as exc:
            log.debug("%s", exc)
            return {}  # not cached: the container may just be starting
        labels = {str(k): str(v) for k, v in raw.items()}
        with self._lock:
            self._cache[container_id] = labels
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return labels


def candidate_endpoints(env: Mapping[str, str] | None = None) -> list[str]:
    """`$CONTAINER_RUNTIME_ENDPOINT` if set, else the usual sockets."""
    env = os.environ if env is None else env
    given = env.get(ENDPOINT_ENV, "").strip()
    if given:
        return [e if "://" in e else f"unix://{e}" for e in given.split(",") if e.strip()]
    return list(DEFAULT_ENDPOINTS)


def connect_runtime(endpoints: Iterable[str] | None = None,
                    crictl: str | None = None) -> CrictlContainerLabels:
    """The first endpoint that answers `crictl version`; else `ContainerRuntimeUnavailable`."""
    endpoints = list(candidate_endpoints() if endpoints is None else endpoints)
    binary = crictl or shutil.which("crictl")
    if binary is None:
        raise ContainerRuntimeUnavailable(
            [(e, "crictl is not installed (not on PATH)") for e in endpoints])
    attempts = []
    for endpoint in endpoints:
        problem = _check_socket(_socket_path(endpoint)) if endpoint.startswith("unix://") else None
        if problem:
            attempts.append((endpoint, problem))
            continue
        source = CrictlContainerLabels(endpoint, binary)
        try:
            source.check()
        except RuntimeError as exc:
            attempts.append((endpoint, str(exc)))
            continue
        log.info("container labels from %s through %s", endpoint, binary)
        return source
    raise ContainerRuntimeUnavailable(attempts)


def container_labels_if_needed(rule_kinds: Iterable[str], endpoints: Iterable[str] | None = None,
                               crictl: str | None = None) -> CrictlContainerLabels | None:
    """A runtime connection when a containerLabel rule exists, else None (nothing is asked)."""
    if "containerLabel" not in set(rule_kinds):
        return None
    return connect_runtime(endpoints, crictl)
