"""The Kubernetes pod metadata source: pods of this node, watched, found by pid or IP.

`KubePodMetadata` implements `ebpfrouter.podmeta.PodMetadataSource`. It lists and watches
the pods whose `spec.nodeName` is this node (from the downward API's `NODE_NAME`), keeps
them by UID and by IP, and maps a pid to its pod through `/proc/PID/cgroup`. Label changes
arrive as watch events and apply at once; reads are thread-safe.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Protocol

from kubernetes import client

from ebpfrouter.k8s.cgroup import identity_of_pid
from ebpfrouter.k8s.watcher import Backoff, ListWatcher, WatchedCache, first_attr
from ebpfrouter.podmeta import PodInfo

log = logging.getLogger(__name__)

# A static pod's mirror in the API has its own UID; its cgroups carry this hash instead.
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"
FINISHED_PHASES = ("Succeeded", "Failed")


class ContainerLabelSource(Protocol):
    """Container-level labels by container ID (see `ebpfrouter.k8s.containers`)."""

    def labels_for(self, container_id: str) -> Mapping[str, str]:
        """The container's runtime labels ({} if unknown)."""
        ...


class NodeNameMissing(RuntimeError):
    """The node name is needed (downward API `NODE_NAME`) and was not given."""


def node_name_from_env(env: Mapping[str, str] | None = None) -> str:
    """This node's name from `NODE_NAME` (set by the chart from `spec.nodeName`)."""
    env = os.environ if env is None else env
    name = env.get("NODE_NAME", "").strip()
    if not name:
        raise NodeNameMissing("NODE_NAME is not set: the pod spec must pass spec.nodeName "
                              "through the downward API")
    return name


def _canonical_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def pod_info_from_api(pod: Any) -> PodInfo:
    """A `PodInfo` from a kubernetes `V1Pod`."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    return PodInfo(
        name=meta.name,
        namespace=meta.namespace or "default",
        uid=meta.uid or "",
        ip=(status.pod_ip if status and status.pod_ip else ""),
        node=(spec.node_name if spec and spec.node_name else ""),
        labels=dict(meta.labels or {}),
    )


def _pod_ips(pod: Any) -> list[str]:
    status = pod.status
    if status is None or (pod.spec is not None and pod.spec.host_network):
        return []  # a host-network pod's IP is the node's: it owns no overlay address
    if status.phase in FINISHED_PHASES:
        return []  # its IP may already belong to a new pod
    texts = [entry.ip for entry in (first_attr(status, "pod_ips", "pod_i_ps") or []) if entry.ip]
    if status.pod_ip and status.pod_ip not in texts:
        texts.insert(0, status.pod_ip)
    return [ip for ip in (_canonical_ip(t) for t in texts) if ip]


@dataclasses.dataclass(frozen=True)
class _Entry:
    info: PodInfo
    ips: tuple[str, ...]
    aliases: tuple[str, ...]  # other UIDs its cgroups may carry (static pods)


class KubePodMetadata(WatchedCache):
    """Pod metadata of one node from the Kubernetes API (a `PodMetadataSource`).

    `start`/`stop`/`wait_synced` and `with` come from `WatchedCache`; synced means the first
    list of this node's pods has arrived.
    """

    def __init__(
        self,
        api: client.CoreV1Api,
        node_name: str,
        *,
        containers: ContainerLabelSource | None = None,
        proc: str = "/proc",
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        backoff: Backoff | None = None,
    ) -> None:
        if not node_name:
            raise NodeNameMissing("node name is empty")
        self.node_name = node_name
        self.containers = containers
        self.proc = proc
        self._lock = threading.Lock()
        self._by_uid: dict[str, _Entry] = {}
        self._by_ip: dict[str, str] = {}
        self._alias: dict[str, str] = {}
        self.watcher = ListWatcher(
            f"pods of node {node_name}",
            api.list_pod_for_all_namespaces,
            self._replace,
            self._event,
            field_selector=f"spec.nodeName={node_name}",
            watch_timeout=watch_timeout,
            request_timeout=request_timeout,
            backoff=backoff,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def last_error(self) -> str | None:
        """The last API error (None after a successful list)."""
        return self.watcher.last_error

    # -- cache updates (watcher thread) ------------------------------------------------------
    @staticmethod
    def _entry(pod: Any) -> _Entry:
        annotations = pod.metadata.annotations or {}
        mirror = annotations.get(MIRROR_ANNOTATION)
        return _Entry(pod_info_from_api(pod), tuple(_pod_ips(pod)), (mirror,) if mirror else ())

    def _replace(self, pods: list[Any]) -> None:
        entries = [self._entry(p) for p in pods if p.metadata and p.metadata.uid]
        by_uid = {e.info.uid: e for e in entries}
        by_ip = {ip: e.info.uid for e in entries for ip in e.ips}
        alias = {a: e.info.uid for e in entries for a in e.aliases}
        with self._lock:
            self._by_uid, self._by_ip, self._alias = by_uid, by_ip, alias
        log.debug("pods of node %s: %d after list", self.node_name, len(by_uid))

    def _event(self, kind: str, pod: Any) -> None:
        if not pod.metadata or not pod.metadata.uid:
            return
        entry = self._entry(pod)
        uid = entry.info.uid
        with self._lock:
            old = self._by_uid.pop(uid, None)
            if old is not None:
                for ip in old.ips:
                    if self._by_ip.get(ip) == uid:
                        del self._by_ip[ip]
                for alias in old.aliases:
                    self._alias.pop(alias, None)
            if kind == "DELETED":
                return
            self._by_uid[uid] = entry
            for ip in entry.ips:
                self._by_ip[ip] = uid
            for alias in entry.aliases:
                self._alias[alias] = uid

    # -- reads (any thread) ------------------------------------------------------------------
    def pods(self) -> list[PodInfo]:
        """Every known pod of this node."""
        with self._lock:
            return [e.info for e in self._by_uid.values()]

    def pod_by_uid(self, uid: str) -> PodInfo | None:
        """The pod with API UID (or static-pod hash) `uid`."""
        with self._lock:
            entry = self._by_uid.get(uid) or self._by_uid.get(self._alias.get(uid, ""))
            return entry.info if entry else None

    def pod_for_ip(self, ip: str) -> PodInfo | None:
        """The pod of this node owning `ip` (host-network and finished pods excluded)."""
        key = _canonical_ip(ip)
        if key is None:
            return None
        with self._lock:
            uid = self._by_ip.get(key)
            entry = self._by_uid.get(uid) if uid else None
            return entry.info if entry else None

    def pod_for_pid(self, pid: int) -> PodInfo | None:
        """The pod running `pid` (through its cgroup), with its container's labels if known."""
        identity = identity_of_pid(pid, self.proc)
        if identity is None or identity.pod_uid is None:
            return None
        info = self.pod_by_uid(identity.pod_uid)
        if info is None:
            return None
        if self.containers is not None and identity.container_id:
            labels = self.containers.labels_for(identity.container_id)
            if labels:
                info = dataclasses.replace(info, container_labels=dict(labels))
        return info
