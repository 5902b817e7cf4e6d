"""Container labels through crictl, with a TEST DOUBLE of crictl (no runtime runs here).

`fake_crictl` writes an executable named `crictl` that behaves like cri-tools' crictl for the
two commands the router uses (`version`, `inspect -o json ID`), printing output in crictl's
real format, and answering only on the endpoint whose socket the test created.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
from apiserver_standin import StandInApiServer, make_pod
from kubernetes import client

from ebpfrouter.k8s.containers import (
    ContainerRuntimeUnavailable,
    CrictlContainerLabels,
    candidate_endpoints,
    connect_runtime,
    container_labels_if_needed,
)
from ebpfrouter.k8s.pods import KubePodMetadata

CID = "8e2b4f6a1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8e0f2a4b6c8d0e1f"
POD_UID = "3f1c9a52-7d4e-4b8a-9c21-5e6f7a8b9c0d"

# What `crictl inspect -o json` prints for a running container (containerd 1.7, crictl 1.31).
INSPECT = {
    "status": {
        "id": CID,
        "metadata": {"attempt": 0, "name": "worker"},
        "state": "CONTAINER_RUNNING",
        "createdAt": "2026-11-27T12:00:01.123456789Z",
        "startedAt": "2026-11-27T12:00:01.234567890Z",
        "finishedAt": "0001-01-01T00:00:00Z",
        "exitCode": 0,
        "image": {"annotations": {}, "image": "docker.io/library/redis:7",
                  "runtimeHandler": "", "userSpecifiedImage": ""},
        "imageRef": "docker.io/library/redis@sha256:" + "ab" * 32,
        "reason": "",
        "message": "",
        "labels": {
            "io.kubernetes.container.name": "worker",
            "io.kubernetes.pod.name": "cache-0",
            "io.kubernetes.pod.namespace": "shop",
            "io.kubernetes.pod.uid": POD_UID,
        },
        "annotations": {
            "io.kubernetes.container.hash": "9b5e5a7c",
            "io.kubernetes.container.restartCount": "0",
            "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
            "io.kubernetes.pod.terminationGracePeriod": "30",
        },
        "mounts": [],
        "logPath": f"/var/log/pods/shop_cache-0_{POD_UID}/worker/0.log",
    },
    "info": {"sandboxID": "5d0c3b2a19f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a493827160f5e",
             "pid": 4242, "runtimeType": "io.containerd.runc.v2"},
}

FAKE_CRICTL = r'''#!{python}
"""TEST DOUBLE of cri-tools' crictl (version, inspect -o json), for tests/k8s only."""
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_CRICTL_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
endpoint = None
while args and args[0].startswith("-"):
    flag = args.pop(0)
    value = args.pop(0)
    if flag in ("--runtime-endpoint", "-r"):
        endpoint = value
if endpoint != os.environ["FAKE_CRICTL_ENDPOINT"]:
    sys.stderr.write('level=fatal msg="validate service connection: validate CRI v1 runtime '
                     'API for endpoint \\"%s\\": rpc error: code = Unavailable desc = '
                     'connection error"\n' % endpoint)
    sys.exit(1)
if args[:1] == ["version"]:
    print("Version:  0.1.0\nRuntimeName:  containerd\nRuntimeVersion:  v1.7.22\n"
          "RuntimeApiVersion:  v1")
    sys.exit(0)
if args[:3] == ["inspect", "-o", "json"] and len(args) == 4:
    path = os.path.join(os.environ["FAKE_CRICTL_DIR"], args[3] + ".json")
    if os.path.exists(path):
        print(open(path).read())
        sys.exit(0)
    sys.stderr.write('level=fatal msg="getting the status of the container \\"%s\\": rpc '
                     'error: code = NotFound desc = an error occurred when try to find '
                     'container \\"%s\\": not found"\n' % (args[3], args[3]))
    sys.exit(1)
sys.stderr.write("fake crictl: unsupported command %r\n" % (args,))
sys.exit(2)
'''


@pytest.fixture
def runtime_dir():
    """A short directory (unix socket paths are limited to 107 bytes), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="cri-"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def cri_socket(runtime_dir: Path):
    """A real listening unix socket standing where the runtime's socket would be."""
    path = runtime_dir / "containerd.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    yield f"unix://{path}"
    sock.close()


@pytest.fixture
def fake_crictl(runtime_dir: Path, cri_socket: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install the crictl test double on PATH; returns its call log."""
    bindir = runtime_dir / "bin"
    bindir.mkdir()
    (runtime_dir / "containers").mkdir()
    (runtime_dir / "containers" / f"{CID}.json").write_text(json.dumps(INSPECT, indent=2))
    script = bindir / "crictl"
    script.write_text(FAKE_CRICTL.replace("{python}", sys.executable))
    script.chmod(0o755)
    log = runtime_dir / "calls.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CRICTL_LOG", str(log))
    monkeypatch.setenv("FAKE_CRICTL_DIR", str(runtime_dir / "containers"))
    monkeypatch.setenv("FAKE_CRICTL_ENDPOINT", cri_socket)
    return log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_labels_from_crictl_inspect(fake_crictl: Path, cri_socket: str) -> None:
    source = connect_runtime([cri_socket])
    assert source.endpoint == cri_socket
    labels = source.labels_for(CID)
    assert labels == INSPECT["status"]["labels"]
    assert source.labels_for(CID) == labels  # cached: labels never change
    inspects = [c for c in calls(fake_crictl) if " inspect " in c]
    assert inspects == [f"--runtime-endpoint {cri_socket} --timeout 5s inspect -o json {CID}"]


def test_unknown_container_has_no_labels_and_is_asked_again(fake_crictl: Path,
                                                            cri_socket: str) -> None:
    source = CrictlContainerLabels(cri_socket)
    assert source.labels_for("0" * 64) == {}
    assert source.labels_for("0" * 64) == {}
    assert sum(" inspect " in c for c in calls(fake_crictl)) == 2
    with pytest.raises(LookupError, match="NotFound"):
        source.inspect("0" * 64)


def test_first_reachable_endpoint_wins(fake_crictl: Path, cri_socket: str,
                                       runtime_dir: Path) -> None:
    not_a_socket = runtime_dir / "crio.sock"
    not_a_socket.write_text("")
    endpoints = [f"unix://{runtime_dir}/missing.sock", f"unix://{not_a_socket}", cri_socket]
    assert connect_runtime(endpoints).endpoint == cri_socket


def test_unavailable_names_every_endpoint_and_reason(fake_crictl: Path, runtime_dir: Path,
                                                     cri_socket: str) -> None:
    not_a_socket = runtime_dir / "crio.sock"
    not_a_socket.write_text("")
    other = runtime_dir / "other.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(other))  # a socket, but no CRI runtime answers on it
    try:
        endpoints = [f"unix://{runtime_dir}/missing.sock", f"unix://{not_a_socket}",
                     f"unix://{other}"]
        with pytest.raises(ContainerRuntimeUnavailable) as info:
            connect_runtime(endpoints)
    finally:
        sock.close()
    message = str(info.value)
    assert "containerLabel" in message
    for endpoint in endpoints:
        assert endpoint in message
    reasons = dict(info.value.attempts)
    assert reasons[endpoints[0]] == "no such socket"
    assert reasons[endpoints[1]] == "exists but is not a socket"
    assert "Unavailable" in reasons[endpoints[2]]


def test_unavailable_without_crictl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(ContainerRuntimeUnavailable, match="crictl is not installed") as info:
        connect_runtime()
    assert "/run/containerd/containerd.sock" in str(info.value)
    assert "/run/crio/crio.sock" in str(info.value)


def test_default_endpoints_on_this_machine_are_unavailable() -> None:
    # No container runtime runs on the test machines: the real default sockets are absent.
    if any(os.path.exists(e.removeprefix("unix://")) for e in candidate_endpoints({})):
        pytest.skip("a container runtime socket exists on this machine")
    with pytest.raises(ContainerRuntimeUnavailable):
        connect_runtime(candidate_endpoints({}), crictl="/bin/true")


def test_endpoint_from_environment() -> None:
    env = {"CONTAINER_RUNTIME_ENDPOINT": "/run/crio/crio.sock"}
    assert candidate_endpoints(env) == ["unix:///run/crio/crio.sock"]
    assert candidate_endpoints({})[0] == "unix:///run/containerd/containerd.sock"


def test_runtime_needed_only_for_container_label_rules(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert container_labels_if_needed(["cidr", "podLabel"], ["unix:///nonexistent.sock"]) is None
    with pytest.raises(ContainerRuntimeUnavailable, match="nonexistent.sock"):
        container_labels_if_needed(["podLabel", "containerLabel"], ["unix:///nonexistent.sock"])


def test_pod_for_pid_carries_container_labels(fake_crictl: Path, cri_socket: str,
                                              standin: StandInApiServer,
                                              core_api: client.CoreV1Api,
                                              tmp_path: Path) -> None:
    standin.put("pods", make_pod("cache-0", "node-a", "10.244.1.8", {"app": "cache"},
                                 namespace="shop", uid=POD_UID))
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(
        f"0::/kubepods/besteffort/pod{POD_UID}/{CID}\n")
    containers = container_labels_if_needed(["containerLabel"], [cri_socket])
    with KubePodMetadata(core_api, "node-a", proc=str(tmp_path), containers=containers,
                         request_timeout=2.0) as pods:
        assert pods.wait_synced(5)
        pod = pods.pod_for_pid(4242)
        assert pod is not None and pod.name == "cache-0"
        assert pod.labels == {"app": "cache"}
        assert pod.container_labels["io.kubernetes.container.name"] == "worker"
