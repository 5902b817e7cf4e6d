"""A stand-in kubelet: lay out a pod's volumes and run its container with podman.

`podspec` says what to run; this module does it: configMap and secret volumes written as the
kubelet writes them (a timestamped directory, a `..data` link, one link per key, the volume's
mode), emptyDirs made, hostPath types checked, the container started, probed over HTTP from
the node's network namespace, stopped and removed. Podman needs two settings on this kind of
machine, passed on each command (`scripts/build-image` passes the same): the runc runtime,
and ulimits within the machine's hard limits.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import resource
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .podspec import HostDir, PodmanRun, PodSpecError, Probe, Tmpfs, VolumeSource, parse_quantity

NPROC = 4096  # runc cannot raise nproc past podman's 32768 for conmon without CAP_SYS_RESOURCE


class PodmanError(RuntimeError):
    """A podman command failed; the message has the command and its stderr."""


def global_flags() -> list[str]:
    """Flags before the podman subcommand: the runtime that works on this machine."""
    return ["--runtime", "runc"]


def ulimit_flags() -> list[str]:
    """`--ulimit` flags within this machine's hard limits (podman's defaults exceed them)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nproc = NPROC if nproc == resource.RLIM_INFINITY else min(nproc, NPROC)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def podman(*args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `podman [global flags] ARGS`; raise PodmanError on failure when `check`."""
    argv = ["podman", *global_flags(), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise PodmanError(f"{' '.join(argv[:6])} ...: exit {proc.returncode}: "
                          f"{proc.stderr.strip()[-600:]}")
    return proc


# -- volumes, as the kubelet lays them out -------------------------------------------------------


def _write_atomic_layout(target: Path, files: Mapping[str, bytes], mode: int) -> None:
    """The kubelet's AtomicWriter layout: `..<time>/KEY`, `..data -> ..<time>`, and
    `KEY -> ..data/KEY`."""
    target.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.000000000", time.gmtime())
    data_dir = target / stamp
    data_dir.mkdir(mode=0o755)
    for key, content in files.items():
        if "/" in key or key.startswith(".."):
            raise PodSpecError(f"volume key {key!r}: not a file name")
        path = data_dir / key
        path.write_bytes(content)
        path.chmod(mode)
    (target / "..data").symlink_to(stamp)
    for key in files:
        (target / key).symlink_to(f"..data/{key}")


def _object(objects: Mapping[tuple[str, str], Mapping[str, Any]], kind: str,
            name: str, volume: str) -> Mapping[str, Any]:
    obj = objects.get((kind, name))
    if obj is None:
        raise PodSpecError(f"volume {volume}: {kind} {name} is not among the rendered objects")
    return obj


def _check_host_path(volume: str, path: str, kind: str) -> None:
    if kind == "DirectoryOrCreate":
        os.makedirs(path, mode=0o755, exist_ok=True)
        return
    checks = {"Directory": stat.S_ISDIR, "Socket": stat.S_ISSOCK, "File": stat.S_ISREG,
              "CharDevice": stat.S_ISCHR, "BlockDevice": stat.S_ISBLK}
    if kind in ("", None):
        return
    if kind not in checks:
        raise PodSpecError(f"volume {volume}: hostPath type {kind} not supported here")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PodSpecError(f"volume {volume}: hostPath {path} does not exist "
                           f"(type {kind})") from None
    if not checks[kind](mode):
        raise PodSpecError(f"volume {volume}: hostPath {path} is not a {kind}")


def lay_out_volumes(pod: Mapping[str, Any], objects: Mapping[tuple[str, str], Mapping[str, Any]],
                    root: Path) -> dict[str, VolumeSource]:
    """Make every volume of the pod under `root` (hostPaths are checked, not made)."""
    out: dict[str, VolumeSource] = {}
    for volume in pod.get("volumes", []):
        name = volume["name"]
        kinds = sorted(set(volume) - {"name"})
        if len(kinds) != 1:
            raise PodSpecError(f"volume {name}: expected one source, got {kinds}")
        kind, spec = kinds[0], volume[kinds[0]]
        if kind == "hostPath":
            _check_host_path(name, spec["path"], spec.get("type", ""))
            out[name] = HostDir(spec["path"])
        elif kind == "emptyDir":
            if spec.get("medium") == "Memory":
                size = spec.get("sizeLimit")
                out[name] = Tmpfs(int(parse_quantity(size)) if size is not None else None)
            else:
                path = root / name
                path.mkdir(parents=True)
                path.chmod(0o777)  # the kubelet's emptyDir mode
                out[name] = HostDir(str(path))
        elif kind in ("configMap", "secret"):
            unknown = sorted(set(spec) - {"name", "secretName", "defaultMode"})
            if unknown:
                raise PodSpecError(f"volume {name}: {kind} {', '.join(unknown)} not supported")
            if kind == "configMap":
                obj = _object(objects, "ConfigMap", spec["name"], name)
                files = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
                files |= {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
            else:
                obj = _object(objects, "Secret", spec["secretName"], name)
                files = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                files |= {k: str(v).encode() for k, v in (obj.get("stringData") or {}).items()}
            _write_atomic_layout(root / name, files, int(spec.get("defaultMode", 0o644)))
            out[name] = HostDir(str(root / name))
        else:
            raise PodSpecError(f"volume {name}: {kind} volumes are not supported here")
    return out


def objects_by_kind(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Rendered documents indexed by (kind, metadata.name)."""
    return {(d["kind"], d["metadata"]["name"]): d for d in docs if d and "metadata" in d}


# -- the container ------------------------------------------------------------------------------


class Container:
    """One container started from a PodmanRun; stop() and remove() are safe to repeat."""

    def __init__(self, run: PodmanRun) -> None:
        self.run = run
        self.name = run.name
        self.started = False

    def start(self) -> Container:
        """`podman run -d` with the translated arguments and this machine's ulimits."""
        podman("run", "-d", *ulimit_flags(), *self.run.args)
        self.started = True
        return self

    def inspect(self, fmt: str) -> str:
        """`podman inspect --format FMT` of the container ('' if it is gone)."""
        proc = podman("inspect", "--format", fmt, self.name, check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def pid(self) -> int:
        """The host pid of the container's process (0 if not running)."""
        return int(self.inspect("{{.State.Pid}}") or 0)

    def exit_code(self) -> int | None:
        code = self.inspect("{{.State.ExitCode}}")
        return int(code) if code and not self.running() else None

    def logs(self, tail: int = 40) -> str:
        proc = podman("logs", "--tail", str(tail), self.name, check=False)
        return (proc.stdout + proc.stderr).strip()

    def stop(self, timeout: int | None = None) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` (the pod's grace period); the exit code."""
        if not self.started:
            return None
        args = ["stop"] + (["--time", str(timeout)] if timeout is not None else [])
        podman(*args, self.name, timeout=(timeout or 30) + 30, check=False)
        return self.exit_code()

    def remove(self) -> None:
        podman("rm", "--force", "--ignore", self.name, check=False)
        self.started = False


def http_probe(probe: Probe, host: str, netns: str | None = None) -> tuple[bool, str]:
    """One httpGet probe as the kubelet runs it: 200-399 passes; (ok, what happened)."""
    from injector.netns import in_netns

    try:
        with in_netns(netns) if netns else contextlib.nullcontext():
            conn = http.client.HTTPConnection(host, probe.port, timeout=probe.timeout)
            try:
                conn.request("GET", probe.path)
                answer = conn.getresponse()
                body = answer.read(200).decode(errors="replace")
            finally:
                conn.close()
    except OSError as exc:
        return False, f"GET {probe.path}: {exc}"
    return 200 <= answer.status < 400, f"GET {probe.path}: {answer.status} {body.strip()}"
