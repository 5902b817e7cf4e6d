"""cgroup path parsing on samples shaped as each runtime, driver and cgroup version writes them.

The samples are whole `/proc/PID/cgroup` files as read on nodes of each kind (IDs made up
for these tests; formats as the kubelet, containerd, CRI-O, Docker and kind produce them).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ebpfrouter.k8s.cgroup import (
    CgroupIdentity,
    identity_of_pid,
    parse_cgroup_path,
    parse_proc_cgroup,
)

UID = "3f1c9a52-7d4e-4b8a-9c21-5e6f7a8b9c0d"
SUID = UID.replace("-", "_")  # the systemd driver's spelling
CID = "8e2b4f6a1c3d5e7f9a0b2c4d6e8f0a1b3c5d7e9f1a2b4c6d8e0f2a4b6c8d0e1f"
NODE = "5d0c3b2a19f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7c6b5a493827160f5e"
V1_CONTROLLERS = ["cpuset", "cpu,cpuacct", "blkio", "memory", "devices", "freezer",
                  "net_cls,net_prio", "perf_event", "hugetlb", "pids", "rdma"]


def v1(path: str, systemd_path: str | None = None) -> str:
    """A cgroup v1 file: every controller at `path`, rdma at root as the kernel shows it."""
    lines = [f"{12 - i}:{c}:{'/' if c == 'rdma' else path}" for i, c in enumerate(V1_CONTROLLERS)]
    lines.append(f"1:name=systemd:{systemd_path or path}")
    return "\n".join(lines) + "\n"


def v2(path: str) -> str:
    return f"0::{path}\n"


def hybrid(path: str) -> str:
    """systemd's hybrid layout: v1 controllers plus the unified hierarchy."""
    return v1(path) + v2(path)


CASES = {
    # containerd, cgroupfs driver (k3s, older kubeadm), v1, Burstable
    "containerd-cgroupfs-v1": (
        v1(f"/kubepods/burstable/pod{UID}/{CID}"),
        CgroupIdentity(UID, CID, None, "burstable")),
    # containerd, cgroupfs driver, v2, BestEffort
    "containerd-cgroupfs-v2": (
        v2(f"/kubepods/besteffort/pod{UID}/{CID}"),
        CgroupIdentity(UID, CID, None, "besteffort")),
    # containerd, systemd driver, v2 (kubeadm default since 1.22), Burstable
    "containerd-systemd-v2": (
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SUID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "burstable")),
    # containerd, systemd driver, v1 (Bottlerocket, EKS AL2), BestEffort
    "containerd-systemd-v1": (
        v1(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SUID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "besteffort")),
    # containerd, systemd driver, Guaranteed: no QoS slice
    "containerd-systemd-v2-guaranteed": (
        v2(f"/kubepods.slice/kubepods-pod{SUID}.slice/cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "guaranteed")),
    # CRI-O, systemd driver (OpenShift), v1, Guaranteed
    "crio-systemd-v1-guaranteed": (
        v1(f"/kubepods.slice/kubepods-pod{SUID}.slice/crio-{CID}.scope"),
        CgroupIdentity(UID, CID, "cri-o", "guaranteed")),
    # CRI-O, systemd driver, v2, BestEffort
    "crio-systemd-v2": (
        v2(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SUID}.slice/"
           f"crio-{CID}.scope"),
        CgroupIdentity(UID, CID, "cri-o", "besteffort")),
    # CRI-O, cgroupfs driver, v1, Burstable
    "crio-cgroupfs-v1": (
        v1(f"/kubepods/burstable/pod{UID}/crio-{CID}"),
        CgroupIdentity(UID, CID, "cri-o", "burstable")),
    # CRI-O's conmon: in the pod, in no container
    "crio-conmon-v2": (
        v2(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SUID}.slice/"
           f"crio-conmon-{CID}.scope"),
        CgroupIdentity(UID, None, None, "burstable")),
    # Docker (dockershim / cri-dockerd), systemd driver, v1
    "docker-systemd-v1": (
        v1(f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SUID}.slice/"
           f"docker-{CID}.scope"),
        CgroupIdentity(UID, CID, "docker", "besteffort")),
    # Docker, cgroupfs driver, v1, Guaranteed
    "docker-cgroupfs-v1-guaranteed": (
        v1(f"/kubepods/pod{UID}/{CID}"),
        CgroupIdentity(UID, CID, None, "guaranteed")),
    # systemd hybrid hierarchy (v1 controllers + unified)
    "containerd-systemd-hybrid": (
        hybrid(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SUID}.slice/"
               f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "burstable")),
    # kind on a cgroup v2 host, as the host sees it: the node container first
    "kind-v2-host-view": (
        v2(f"/system.slice/docker-{NODE}.scope/kubelet.slice/kubelet-kubepods.slice/"
           f"kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{SUID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "besteffort")),
    # kind with cgroupns=private and the docker cgroupfs parent
    "kind-v2-docker-parent": (
        v2(f"/docker/{NODE}/kubelet.slice/kubelet-kubepods.slice/"
           f"kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{SUID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "burstable")),
    # kind (or docker-in-docker) on a cgroup v1 host, cgroupfs driver inside
    "kind-v1-cgroupfs": (
        v1(f"/docker/{NODE}/kubepods/besteffort/pod{UID}/{CID}"),
        CgroupIdentity(UID, CID, None, "besteffort")),
    # read from inside another cgroup namespace (the router's own pod on v2)
    "v2-seen-from-a-cgroup-namespace": (
        v2(f"/../../kubepods-besteffort.slice/kubepods-besteffort-pod{SUID}.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity(UID, CID, "containerd", "besteffort")),
    # a sub-cgroup below the container's (kube-proxy does this on v1)
    "sub-cgroup-below-container": (
        v1(f"/kubepods/besteffort/pod{UID}/{CID}/kube-proxy"),
        CgroupIdentity(UID, CID, None, "besteffort")),
    # static pod: the UID is the kubelet's 32-hex config hash
    "static-pod-hash-uid": (
        v2(f"/kubepods.slice/kubepods-burstable.slice/"
           f"kubepods-burstable-pod6f4a2cc1bf0e4a9c8d7e5b3a2c1d0e9f.slice/"
           f"cri-containerd-{CID}.scope"),
        CgroupIdentity("6f4a2cc1bf0e4a9c8d7e5b3a2c1d0e9f", CID, "containerd", "burstable")),
    # plain Docker containers, no Kubernetes
    "docker-plain-v1": (v1(f"/docker/{CID}"), CgroupIdentity(None, CID, "docker")),
    "docker-plain-v2-systemd": (
        v2(f"/system.slice/docker-{CID}.scope"), CgroupIdentity(None, CID, "docker")),
    # host processes
    "host-root-v1": (v1("/"), None),
    "host-root-v2": (v2("/"), None),
    "host-user-session-v2": (v2("/user.slice/user-1000.slice/session-3.scope"), None),
    "host-service-v2": (v2("/system.slice/containerd.service"), None),
    "kubelet-itself": (v2("/system.slice/kubelet.service"), None),
    # a 32-hex cgroup name that is no pod (as on this CI machine's memory controller)
    "hex-named-non-pod": (
        v1("/", ) + "4:memory:/process_api/af52fdcb053bfcfc0b21bc25984c7b14\n", None),
}


@pytest.mark.parametrize(("text", "expected"), CASES.values(), ids=CASES.keys())
def test_proc_cgroup_samples(text: str, expected: CgroupIdentity | None) -> None:
    assert parse_proc_cgroup(text) == expected


def test_path_with_only_the_pod_level() -> None:
    ident = parse_cgroup_path(f"/kubepods/burstable/pod{UID}")
    assert ident == CgroupIdentity(UID, None, None, "burstable")
    assert ident.in_pod


def test_innermost_pod_wins_over_an_outer_one() -> None:
    other = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
    ident = parse_cgroup_path(f"/kubepods/pod{other}/{NODE}/kubepods/besteffort/pod{UID}/{CID}")
    assert ident is not None and ident.pod_uid == UID and ident.container_id == CID


def test_uppercase_or_short_ids_are_not_containers() -> None:
    assert parse_cgroup_path(f"/kubepods/pod{UID}/{CID[:60]}") == CgroupIdentity(
        UID, None, None, "guaranteed")
    assert parse_cgroup_path(f"/docker/{CID.upper()}") is None


def test_this_machines_own_process_is_in_no_pod() -> None:
    text = Path("/proc/self/cgroup").read_text()
    assert parse_proc_cgroup(text) is None
    assert identity_of_pid(os.getpid()) is None


def test_identity_of_pid_reads_the_proc_file(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text(CASES["containerd-systemd-v2"][0])
    assert identity_of_pid(4242, proc=str(tmp_path)) == CASES["containerd-systemd-v2"][1]
    assert identity_of_pid(4243, proc=str(tmp_path)) is None  # exited
