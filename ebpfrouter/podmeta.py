"""Pod metadata: who a pid or an IP belongs to. Pluggable; the Kubernetes source lives in k8s/."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from injector.netns import netns_inode


@dataclasses.dataclass(frozen=True)
class PodInfo:
    """One pod as the router sees it. `netns_inode` is set when known (testbed, CRI)."""

    name: str
    namespace: str = "default"
    uid: str = ""
    ip: str = ""
    node: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    container_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    netns_inode: int | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the inverse of `PodInfo.from_json`)."""
        data = dataclasses.asdict(self)
        data["labels"] = dict(self.labels)
        data["container_labels"] = dict(self.container_labels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PodInfo:
        """Build from a dict; unknown keys are an error naming them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = set(data) - fields
        if extra:
            raise ValueError(f"pod {data.get('name')!r}: unknown key(s) {sorted(extra)}")
        if not isinstance(data.get("name"), str) or not data["name"]:
            raise ValueError(f"pod entry without a name: {dict(data)!r}")
        values = dict(data)
        for key in ("labels", "container_labels"):
            labels = values.get(key, {})
            if not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise ValueError(f"pod {data['name']!r}: {key} must map strings to strings")
            values[key] = dict(labels)
        return cls(**values)


@runtime_checkable
class PodMetadataSource(Protocol):
    """Anything that can say which pod a pid or an IP belongs to."""

    def pod_for_pid(self, pid: int) -> PodInfo | None:
        """The pod running `pid`, or None (host process, unknown, gone)."""
        ...

    def pod_for_ip(self, ip: str) -> PodInfo | None:
        """The pod owning overlay address `ip`, or None."""
        ...


def netns_inode_of(pid: int, proc: str = "/proc") -> int | None:
    """Inode of the network namespace of `pid`, or None if the process is gone."""
    try:
        return netns_inode(pid, proc)
    except OSError:
        return None


class StaticPodMetadata:
    """Pod metadata from a fixed list (a dict or a JSON file); pids matched by netns inode."""

    def __init__(self, pods: list[PodInfo] | None = None, proc: str = "/proc") -> None:
        self.pods: list[PodInfo] = list(pods or [])
        self.proc = proc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaticPodMetadata:
        """From `{"pods": [PodInfo-as-dict, ...]}`."""
        pods = data.get("pods")
        if not isinstance(pods, list):
            raise ValueError("pod metadata: expected {'pods': [...]}")
        return cls([PodInfo.from_json(item) for item in pods])

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticPodMetadata:
        """Load a JSON file written by `write`, e.g. by the testbed."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"pod metadata {path}: {exc}") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"pod metadata {path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"pods": [pod.to_json() for pod in self.pods]}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the JSON form atomically."""
        target = Path(path)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, target)

    def pod_for_pid(self, pid: int) -> PodInfo | None:
        """The pod whose netns inode equals that of `/proc/PID/ns/net`."""
        inode = netns_inode_of(pid, self.proc)
        if inode is None:
            return None
        return self.pod_for_netns(inode)

    def pod_for_netns(self, inode: int) -> PodInfo | None:
        """The pod with network namespace inode `inode`."""
        for pod in self.pods:
            if pod.netns_inode == inode:
                return pod
        return None

    def pod_for_ip(self, ip: str) -> PodInfo | None:
        """The pod with overlay address `ip`."""
        for pod in self.pods:
            if pod.ip == ip:
                return pod
        return None
