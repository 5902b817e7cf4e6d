"""Map a pid to its pod UID and container ID through `/proc/PID/cgroup`.

Handles the path forms the kubelet and the runtimes produce, on cgroup v1 and v2:

- cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (containerd, Docker),
  `/kubepods/pod<uid>/crio-<id>` (CRI-O); Guaranteed pods have no QoS level.
- systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
  cri-containerd-<id>.scope` (also `crio-<id>.scope`, `docker-<id>.scope`), where the UID
  has `_` instead of `-`.
- nested (kind, k3d, docker-in-docker): any prefix, e.g. `/system.slice/docker-<node>.scope/
  kubelet.slice/kubelet-kubepods-...`, or `/docker/<node>/kubepods/...`; the innermost pod
  wins, never the outer node container.
- a reader in its own cgroup namespace sees `/../../...` prefixes; they are skipped.
- plain containers outside Kubernetes: `/docker/<id>`, `/system.slice/docker-<id>.scope`.

Static pods have a 32-hex UID (the kubelet's config hash) instead of a UUID.
"""

from __future__ import annotations

import dataclasses
import re

_UUID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
_HASH = r"[0-9a-f]{32}"
_POD_UID = rf"(?P<uid>{_UUID}|{_HASH})"
_QOS = r"(?:guaranteed|burstable|besteffort)"
# cgroupfs: "pod<uid>"; systemd: "[prefix-]kubepods[-<qos>]-pod<uid>.slice"
_POD_CGROUPFS = re.compile(rf"^pod{_POD_UID}$")
_POD_SYSTEMD = re.compile(rf"^(?:[a-z0-9_.]+-)?kubepods(?:-(?P<qos>{_QOS}))?-pod{_POD_UID}\.slice$")
_QOS_CGROUPFS = re.compile(rf"^(?P<qos>{_QOS})$")
_QOS_SYSTEMD = re.compile(rf"^(?:[a-z0-9_.]+-)?kubepods-(?P<qos>{_QOS})\.slice$")
_ID = r"(?P<id>[0-9a-f]{64})"
# The container's own cgroup, as each runtime names it.
_CONTAINER_FORMS: tuple[tuple[re.Pattern[str], str | None], ...] = (
    (re.compile(rf"^cri-containerd-{_ID}\.scope$"), "containerd"),
    (re.compile(rf"^crio-{_ID}(?:\.scope)?$"), "cri-o"),
    (re.compile(rf"^docker-{_ID}\.scope$"), "docker"),
    (re.compile(rf"^cri-dockerd-{_ID}\.scope$"), "docker"),
    (re.compile(rf"^libpod-{_ID}\.scope$"), "podman"),
    (re.compile(rf"^{_ID}$"), None),  # cgroupfs driver: bare ID, runtime not named
)
# CRI-O's monitor process sits in the pod but in no container.
_CRIO_CONMON = re.compile(rf"^crio-conmon-{_ID}\.scope$")


@dataclasses.dataclass(frozen=True)
class CgroupIdentity:
    """Who a cgroup path belongs to. `pod_uid` is in API form (dashes) or a static-pod hash."""

    pod_uid: str | None
    container_id: str | None
    runtime: str | None = None
    qos: str | None = None

    @property
    def in_pod(self) -> bool:
        """True if the path is inside a Kubernetes pod."""
        return self.pod_uid is not None


def _normalise_uid(raw: str) -> str:
    return raw.replace("_", "-")


def _container_of(segment: str) -> tuple[str, str | None] | None:
    for pattern, runtime in _CONTAINER_FORMS:
        match = pattern.match(segment)
        if match:
            return match["id"], runtime
    return None


def parse_cgroup_path(path: str) -> CgroupIdentity | None:
    """Identity of one cgroup path, or None if it is in no pod and no container."""
    segments = [s for s in path.split("/") if s and s not in (".", "..")]
    pod_index = None
    uid = qos = None
    for index, segment in enumerate(segments):
        match = _POD_CGROUPFS.match(segment) or _POD_SYSTEMD.match(segment)
        if match:
            pod_index, uid = index, _normalise_uid(match["uid"])
            qos = match.groupdict().get("qos")
    if pod_index is not None:
        if qos is None and pod_index > 0:
            level = segments[pod_index - 1]
            found = _QOS_CGROUPFS.match(level) or _QOS_SYSTEMD.match(level)
            qos = found["qos"] if found else "guaranteed"
        container = None
        if pod_index + 1 < len(segments) and not _CRIO_CONMON.match(segments[pod_index + 1]):
            container = _container_of(segments[pod_index + 1])
        cid, runtime = container if container else (None, None)
        return CgroupIdentity(pod_uid=uid, container_id=cid, runtime=runtime, qos=qos)
    # No pod: the innermost plain container, if any ("/docker/<id>", "docker-<id>.scope").
    for index in range(len(segments) - 1, -1, -1):
        segment = segments[index]
        container = _container_of(segment)
        if container is None:
            continue
        cid, runtime = container
        if runtime is None:
            if index == 0 or segments[index - 1] not in ("docker", "lxc", "containerd"):
                continue  # a bare hex name elsewhere is not known to be a container
            runtime = "docker" if segments[index - 1] == "docker" else None
        return CgroupIdentity(pod_uid=None, container_id=cid, runtime=runtime)
    return None


def parse_proc_cgroup(text: str) -> CgroupIdentity | None:
    """Identity from the contents of a `/proc/PID/cgroup` file (v1, v2 or hybrid).

    Lines are `hierarchy:controllers:path`. The result carrying a pod (and then a
    container ID) wins over one that does not; the unified (v2) line is tried first.
    """
    paths = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, _controllers, path = parts
        paths.append((0 if hierarchy == "0" else 1, path))
    best: CgroupIdentity | None = None
    for _order, path in sorted(paths, key=lambda item: item[0]):
        identity = parse_cgroup_path(path)
        if identity is None:
            continue
        rank = (identity.pod_uid is not None, identity.container_id is not None)
        if best is None or rank > (best.pod_uid is not None, best.container_id is not None):
            best = identity
        if all(rank):
            break
    return best


def identity_of_pid(pid: int, proc: str = "/proc") -> CgroupIdentity | None:
    """Identity of process `pid`, or None if it is in no container or has exited."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parse_proc_cgroup(text)
