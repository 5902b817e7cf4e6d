"""A rendered pod spec's container as `podman run` flags: what a kubelet would run.

No kubelet runs here, so the chart's DaemonSet is run by translating its pod spec: host
namespaces, the security context (user, capabilities, read-only root, seccomp), volume mounts,
env (values, the downward API, `$(VAR)` expansion), command and args, resources and the grace
period. Every field is either translated or named below as not applying here, with why; any
other field is an error, so a chart change this code does not understand fails loudly instead
of being dropped. Pure: volumes arrive already laid out (`ebpfrouter.k8s.podman` does that).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Pod fields with no effect on how the container runs on its node (the API server, the
# scheduler or the controller use them), or that cannot apply without an API server.
POD_FIELDS_NOT_RUN = {
    "nodeSelector": "scheduling",
    "affinity": "scheduling",
    "tolerations": "scheduling",
    "priorityClassName": "scheduling and eviction order",
    "imagePullSecrets": "registry credentials; the image is local",
    "serviceAccountName": "no API server here: no token is mounted, so the router runs "
                          "without Kubernetes (pod CIDR and peers from the overlay route)",
    "automountServiceAccountToken": "no API server here (see serviceAccountName)",
    "dnsPolicy": "no cluster DNS here: the node's resolver",
}
POD_FIELDS_RUN = {"containers", "volumes", "hostNetwork", "hostPID", "hostIPC",
                  "terminationGracePeriodSeconds"}
CONTAINER_FIELDS_NOT_RUN = {
    "ports": "with hostNetwork a containerPort only documents the port",
    "livenessProbe": "returned as a Probe for the caller to run",
    "readinessProbe": "returned as a Probe for the caller to run",
    "startupProbe": "returned as a Probe for the caller to run",
}
CONTAINER_FIELDS_RUN = {"name", "image", "imagePullPolicy", "command", "args", "env",
                        "securityContext", "resources", "volumeMounts", "workingDir"}
SECURITY_FIELDS = {"runAsUser", "runAsGroup", "runAsNonRoot", "readOnlyRootFilesystem",
                   "privileged", "capabilities", "seccompProfile", "allowPrivilegeEscalation"}
PULL_POLICY = {"IfNotPresent": "missing", "Always": "always", "Never": "never"}
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


class PodSpecError(ValueError):
    """A pod spec field this translation cannot run; the message names the field."""


@dataclass(frozen=True)
class Node:
    """The node the pod runs on, as the kubelet knows it."""

    name: str                  # spec.nodeName
    ip: str                    # status.hostIP (and status.podIP, with hostNetwork)
    netns: str | None = None   # path of its network namespace; None: this host's own


@dataclass(frozen=True)
class HostDir:
    """A volume backed by a host directory or file (hostPath, or one laid out by the kubelet)."""

    path: str


@dataclass(frozen=True)
class Tmpfs:
    """A memory-backed emptyDir."""

    size_bytes: int | None


VolumeSource = HostDir | Tmpfs


@dataclass(frozen=True)
class Probe:
    """An httpGet probe, resolved to a port number."""

    kind: str  # liveness, readiness, startup
    path: str
    port: int
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3


@dataclass
class PodmanRun:
    """`podman run` arguments for one container (after `podman [global flags] run`)."""

    name: str
    args: list[str]
    env: dict[str, str]
    mounts: dict[str, str] = field(default_factory=dict)  # mountPath -> host path (binds)
    probes: dict[str, Probe] = field(default_factory=dict)

    def host_path(self, container_path: str) -> str:
        """Where a path inside the container is on the host, through its bind mounts."""
        best = ""
        for mount in self.mounts:
            if (container_path == mount or container_path.startswith(mount.rstrip("/") + "/")) \
                    and len(mount) > len(best):
                best = mount
        if not best:
            raise KeyError(f"{container_path} is not under any bind mount of {self.name}")
        return self.mounts[best] + container_path[len(best):]


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (`256Mi`, `50m`, `1.5`, `2G`) as a number of base units."""
    if isinstance(text, int | float):
        return float(text)
    match = _QUANTITY.match(text.strip())
    if not match or match.group(2) not in _UNITS:
        raise PodSpecError(f"quantity {text!r}: not a number with a known suffix")
    return float(match.group(1)) * _UNITS[match.group(2)]


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion: defined names replaced, `$$` -> `$`, others kept."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env[name] if name in env else match.group(0)

    return _VAR_REF.sub(one, text)


def pod_template(docs: Sequence[Mapping[str, Any]], kind: str = "DaemonSet") -> dict[str, Any]:
    """The pod template spec of the only `kind` among rendered documents."""
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        raise PodSpecError(f"expected one {kind} among the rendered documents, got {len(found)}")
    return dict(found[0]["spec"]["template"]["spec"])


def container_of(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The container called `name` in a pod spec."""
    for container in pod.get("containers", []):
        if container.get("name") == name:
            return dict(container)
    raise PodSpecError(f"no container {name!r} in the pod spec")


def _check_fields(spec: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(spec) - known)
    if unknown:
        raise PodSpecError(f"{where}: {', '.join(unknown)}: not translated to podman (add it "
                           f"to ebpfrouter/k8s/podspec.py, or name why it does not apply)")


def _field_ref(path: str, node: Node, pod: Mapping[str, Any]) -> str:
    host_network = bool(pod.get("hostNetwork"))
    if path == "spec.nodeName":
        return node.name
    if path == "status.hostIP" or (path == "status.podIP" and host_network):
        return node.ip
    raise PodSpecError(f"env valueFrom.fieldRef {path}: not supported here")


def container_env(container: Mapping[str, Any], node: Node, pod: Mapping[str, Any],
                  objects: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, str]:
    """The container's environment in order, each value expanded with those before it."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            env[name] = _field_ref(source["fieldRef"]["fieldPath"], node, pod)
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind, ref = (("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source
                         else ("Secret", source["secretKeyRef"]))
            obj = objects.get((kind, ref["name"]))
            data = (obj or {}).get("data", {})
            if ref["key"] not in data:
                raise PodSpecError(f"env {name}: {kind} {ref['name']} has no key {ref['key']}")
            value = data[ref["key"]]
            env[name] = base64.b64decode(value).decode() if kind == "Secret" else str(value)
        else:
            raise PodSpecError(f"env {name}: valueFrom {sorted(source)} not supported here")
    return env


def _security_args(sc: Mapping[str, Any]) -> list[str]:
    _check_fields(sc, SECURITY_FIELDS, "securityContext")
    args: list[str] = []
    user = sc.get("runAsUser")
    if sc.get("runAsNonRoot") and user in (None, 0):
        raise PodSpecError("securityContext: runAsNonRoot with uid 0 would not start")
    if user is not None:
        group = sc.get("runAsGroup")
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if sc.get("readOnlyRootFilesystem"):
        # podman's --read-only adds writable tmpfs on /run, /tmp, /var/tmp; the kubelet
        # does not
        args += ["--read-only", "--read-only-tmpfs=false"]
    if sc.get("privileged"):
        args.append("--privileged")
    else:
        caps = sc.get("capabilities", {})
        _check_fields(caps, {"add", "drop"}, "securityContext.capabilities")
        for cap in caps.get("drop", []):
            args += ["--cap-drop", "all" if cap == "ALL" else f"CAP_{cap}"]
        for cap in caps.get("add", []):
            args += ["--cap-add", f"CAP_{cap}"]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    seccomp = sc.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        args += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":  # RuntimeDefault: podman's default profile
        raise PodSpecError(f"securityContext.seccompProfile {seccomp}: not supported here")
    return args


def _resource_args(resources: Mapping[str, Any]) -> list[str]:
    _check_fields(resources, {"limits", "requests"}, "resources")
    args: list[str] = []
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    if "memory" in limits:
        args += ["--memory", str(int(parse_quantity(limits["memory"])))]
    if "cpu" in limits:
        args += ["--cpus", f"{parse_quantity(limits['cpu']):g}"]
    if "cpu" in requests:  # the kubelet's cpu.shares: millicores * 1024 / 1000, at least 2
        args += ["--cpu-shares", str(max(2, int(parse_quantity(requests["cpu"]) * 1024)))]
    return args


def _mount_args(container: Mapping[str, Any], volumes: Mapping[str, VolumeSource],
                mounts: dict[str, str]) -> list[str]:
    args: list[str] = []
    for mount in container.get("volumeMounts", []):
        _check_fields(mount, {"name", "mountPath", "readOnly"}, f"volumeMount {mount['name']}")
        source = volumes.get(mount["name"])
        if source is None:
            raise PodSpecError(f"volumeMount {mount['name']}: no such volume laid out")
        target = mount["mountPath"]
        if isinstance(source, Tmpfs):
            opts = [f"destination={target}", "tmpfs-mode=0777"]
            if source.size_bytes:
                opts.append(f"tmpfs-size={source.size_bytes}")
            args += ["--mount", ",".join(["type=tmpfs", *opts])]
            continue
        ro = ",ro=true" if mount.get("readOnly") else ""
        args += ["--mount", f"type=bind,source={source.path},destination={target}{ro}"]
        mounts[target] = source.path
    return args


def _probes(container: Mapping[str, Any]) -> dict[str, Probe]:
    ports = {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])
             if "name" in p}
    probes = {}
    for kind in ("liveness", "readiness", "startup"):
        spec = container.get(f"{kind}Probe")
        if spec is None:
            continue
        if "httpGet" not in spec:
            raise PodSpecError(f"{kind}Probe: only httpGet probes are supported here")
        port = spec["httpGet"]["port"]
        probes[kind] = Probe(kind, spec["httpGet"].get("path", "/"),
                             ports[port] if isinstance(port, str) else int(port),
                             float(spec.get("initialDelaySeconds", 0)),
                             float(spec.get("periodSeconds", 10)),
                             float(spec.get("timeoutSeconds", 1)),
                             int(spec.get("failureThreshold", 3)))
    return probes


def podman_run(pod: Mapping[str, Any], container_name: str, node: Node,
               volumes: Mapping[str, VolumeSource], name: str,
               objects: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
               labels: Mapping[str, str] | None = None) -> PodmanRun:
    """Translate the pod's container `container_name` into `podman run` arguments.

    `volumes` maps each volume name to where it is laid out; `objects` holds the rendered
    ConfigMaps and Secrets by (kind, name) for env references; `name` names the container.
    """
    _check_fields(pod, POD_FIELDS_RUN | set(POD_FIELDS_NOT_RUN), "pod spec")
    container = container_of(pod, container_name)
    _check_fields(container, CONTAINER_FIELDS_RUN | set(CONTAINER_FIELDS_NOT_RUN),
                  f"container {container_name}")
    args = ["--name", name]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    if pod.get("hostNetwork"):
        # the node's network namespace (and the host's UTS namespace, as with hostNetwork)
        args += ["--network", f"ns:{node.netns}" if node.netns else "host", "--uts", "host"]
    if pod.get("hostPID"):
        args += ["--pid", "host"]
    if pod.get("hostIPC"):
        args += ["--ipc", "host"]
    args += ["--stop-timeout", str(int(pod.get("terminationGracePeriodSeconds", 30)))]
    policy = container.get("imagePullPolicy", "IfNotPresent")
    if policy not in PULL_POLICY:
        raise PodSpecError(f"imagePullPolicy {policy}: not one of {sorted(PULL_POLICY)}")
    args += ["--pull", PULL_POLICY[policy]]
    args += _security_args(container.get("securityContext", {}))
    args += _resource_args(container.get("resources", {}))
    if "workingDir" in container:
        args += ["--workdir", container["workingDir"]]
    mounts: dict[str, str] = {}
    args += _mount_args(container, volumes, mounts)
    env = container_env(container, node, pod, objects or {})
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    command = [expand(c, env) for c in container.get("command", [])]
    extra = [expand(a, env) for a in container.get("args", [])]
    if command:  # command replaces the image's ENTRYPOINT, args its CMD
        args += ["--entrypoint", json.dumps(command)]
    args.append(container["image"])
    args += extra
    return PodmanRun(name=name, args=args, env=env, mounts=mounts, probes=_probes(container))
