"""The chart's pod spec as `podman run` flags (ebpfrouter/k8s/podspec.py), and the volumes
the stand-in kubelet lays out for it (ebpfrouter/k8s/podman.py). No root, no podman: the
chart is rendered with the real helm and the translation checked flag by flag."""

from __future__ import annotations

import copy
import json
import os
import resource
import stat
from pathlib import Path
from typing import Any

import pytest

from ebpfrouter.chartbed import render_chart
from ebpfrouter.k8s import podman as kubelet
from ebpfrouter.k8s.podspec import (
    HostDir,
    Node,
    PodSpecError,
    Tmpfs,
    VolumeSource,
    container_of,
    expand,
    parse_quantity,
    pod_template,
    podman_run,
)
from ebpfrouter.privileges import chart_capabilities
from ebpfrouter.rules import RuleSet

HERE = Path(__file__).resolve().parent
FULL_VALUES = HERE / "values-full.yaml"
NODE = Node("node1", "192.168.77.1", "/run/netns/tb-n1")
IMAGE = ["--set", "image.repository=localhost/ebpf-router-test", "--set", "image.tag=t1"]


def fake_volumes(pod: dict[str, Any]) -> dict[str, VolumeSource]:
    """Where each volume would be: hostPaths as they are, the rest under /v."""
    out: dict[str, VolumeSource] = {}
    for v in pod["volumes"]:
        if "hostPath" in v:
            out[v["name"]] = HostDir(v["hostPath"]["path"])
        elif v.get("emptyDir", {}).get("medium") == "Memory":
            out[v["name"]] = Tmpfs(int(parse_quantity(v["emptyDir"]["sizeLimit"])))
        else:
            out[v["name"]] = HostDir(f"/v/{v['name']}")
    return out


def flag_values(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]


@pytest.fixture(scope="module")
def default_docs(helm: str, chart: Path) -> list[dict[str, Any]]:
    return render_chart(helm, chart, *IMAGE)


@pytest.fixture
def pod(default_docs: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(pod_template(default_docs))


def translate(pod: dict[str, Any], docs: list[dict[str, Any]] | None = None):
    objects = kubelet.objects_by_kind(docs) if docs else {}
    return podman_run(pod, "router", NODE, fake_volumes(pod), name="c1", objects=objects,
                      labels={"test": "1"})


def test_default_chart_flags(pod: dict[str, Any]) -> None:
    run = translate(pod)
    args = run.args
    assert args[:2] == ["--name", "c1"]
    # host network = the node's netns (and the host's UTS namespace); host pid namespace
    assert flag_values(args, "--network") == ["ns:/run/netns/tb-n1"]
    assert flag_values(args, "--uts") == ["host"] and flag_values(args, "--pid") == ["host"]
    assert "--ipc" not in args
    # exactly the chart's capabilities: everything dropped, the list added
    assert flag_values(args, "--cap-drop") == ["all"]
    assert flag_values(args, "--cap-add") == [f"CAP_{c}" for c in chart_capabilities()]
    assert "--privileged" not in args
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert flag_values(args, "--user") == ["0"]
    assert "--security-opt" not in args  # RuntimeDefault: podman's default seccomp profile
    assert flag_values(args, "--stop-timeout") == ["30"]
    assert flag_values(args, "--pull") == ["missing"]  # IfNotPresent
    assert flag_values(args, "--memory") == [str(256 << 20)]
    assert flag_values(args, "--cpu-shares") == ["51"]  # 50m, as the kubelet computes it
    # command replaces the entrypoint; $(NODE_NAME) expanded from the downward API
    assert json.loads(flag_values(args, "--entrypoint")[0]) == ["ebpf-router", "run"]
    image_at = args.index("localhost/ebpf-router-test:t1")
    assert args[image_at + 1:] == ["--health-port=9180", "--node-name=node1"]
    assert run.env["NODE_NAME"] == "node1"
    assert run.env["ROUTER_KEY_FILE"] == "/etc/ebpf-router/key/peer-key"
    assert run.probes["readiness"].port == 9180 and run.probes["readiness"].path == "/readyz"
    assert run.probes["liveness"].path == "/healthz"


def test_every_mount_and_env_entry_of_the_chart_is_carried(pod: dict[str, Any]) -> None:
    """Generic over the chart: a mount or variable added to the template reaches podman."""
    run = translate(pod)
    mounts = flag_values(run.args, "--mount")
    container = container_of(pod, "router")
    volumes = fake_volumes(pod)
    assert len(mounts) == len(container["volumeMounts"])
    for vm, spec in zip(container["volumeMounts"], mounts, strict=True):
        source = volumes[vm["name"]]
        if isinstance(source, Tmpfs):
            assert spec == (f"type=tmpfs,destination={vm['mountPath']},tmpfs-mode=0777,"
                            f"tmpfs-size={source.size_bytes}")
        else:
            ro = ",ro=true" if vm.get("readOnly") else ""
            assert spec == f"type=bind,source={source.path},destination={vm['mountPath']}{ro}"
    env = flag_values(run.args, "--env")
    assert [e.split("=", 1)[0] for e in env] == [e["name"] for e in container["env"]]


def test_host_path_follows_the_bind_mounts(pod: dict[str, Any]) -> None:
    run = translate(pod)
    assert run.host_path("/run/ebpf-router/control.sock") == "/v/run/control.sock"
    assert run.host_path("/etc/ebpf-router/key/peer-key") == "/v/peer-key/peer-key"
    assert run.host_path("/sys/fs/bpf/x") == "/sys/fs/bpf/x"
    with pytest.raises(KeyError, match="/usr/bin/python3"):
        run.host_path("/usr/bin/python3")  # the image's own filesystem
    with pytest.raises(KeyError):
        run.host_path("/tmp/x")  # a tmpfs has no host path


def test_privileged_switch(helm: str, chart: Path) -> None:
    pod = pod_template(render_chart(helm, chart, *IMAGE, "--set",
                                    "securityContext.privileged=true"))
    args = translate(pod).args
    assert "--privileged" in args and "--cap-add" not in args and "--cap-drop" not in args


def test_full_values_are_translated_or_refused_by_name(helm: str, chart: Path) -> None:
    docs = render_chart(helm, chart, "-f", str(FULL_VALUES))
    pod = pod_template(docs)
    with pytest.raises(PodSpecError, match="seccompProfile Localhost"):
        translate(pod, docs)  # a node-local profile file: not on this machine
    pod["containers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    run = translate(pod, docs)
    args = run.args
    assert flag_values(args, "--security-opt") == ["seccomp=unconfined"]
    assert "CAP_SYS_RESOURCE" in flag_values(args, "--cap-add")
    assert flag_values(args, "--pull") == ["always"]
    assert flag_values(args, "--stop-timeout") == ["60"]
    assert flag_values(args, "--cpus") == ["1"] and flag_values(args, "--cpu-shares") == ["102"]
    assert run.env["CONTAINER_RUNTIME_ENDPOINT"] == "unix:///run/crio/crio.sock"
    assert run.env["PYTHONFAULTHANDLER"] == "1"  # extraEnv
    assert "--control-socket=/run/ebpf-router/control.sock" in args  # extraArgs
    assert run.probes["liveness"].period == 15 and run.probes["readiness"].port == 9191


@pytest.mark.parametrize("where,field", [("pod", "hostUsers"), ("pod", "initContainers"),
                                         ("container", "lifecycle"),
                                         ("container", "volumeDevices")])
def test_an_untranslated_field_is_an_error_naming_it(pod: dict[str, Any], where: str,
                                                     field: str) -> None:
    target = pod if where == "pod" else pod["containers"][0]
    target[field] = {}
    with pytest.raises(PodSpecError, match=field):
        translate(pod)


def test_an_unknown_security_context_field_is_an_error(pod: dict[str, Any]) -> None:
    pod["containers"][0]["securityContext"]["procMount"] = "Unmasked"
    with pytest.raises(PodSpecError, match="procMount"):
        translate(pod)


def test_run_as_non_root_with_uid_0_is_refused(pod: dict[str, Any]) -> None:
    pod["containers"][0]["securityContext"]["runAsNonRoot"] = True
    with pytest.raises(PodSpecError, match="runAsNonRoot"):
        translate(pod)


def test_env_references(pod: dict[str, Any], default_docs: list[dict[str, Any]]) -> None:
    secret = next(d for d in default_docs if d["kind"] == "Secret")["metadata"]["name"]
    pod["containers"][0]["env"] += [
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "WHERE", "value": "$(NODE_NAME)/$(IP)/$$(IP)/$(NOPE)"},
        {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "peer-key"}}},
    ]
    env = translate(pod, default_docs).env
    assert env["IP"] == "192.168.77.1"  # hostNetwork: the pod IP is the node's
    assert env["WHERE"] == "node1/192.168.77.1/$(IP)/$(NOPE)"
    assert len(env["KEY"]) == 48
    pod["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}})
    with pytest.raises(PodSpecError, match="metadata.uid"):
        translate(pod, default_docs)


def test_expand_is_the_kubelets() -> None:
    env = {"A": "1", "B": "x y"}
    assert expand("$(A)-$(B)", env) == "1-x y"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("$(C) $A $(", env) == "$(C) $A $("
    assert expand("$$$(A)", env) == "$1"


@pytest.mark.parametrize("text,value", [("256Mi", 256 << 20), ("16Mi", 16 << 20),
                                        ("50m", 0.05), ("1", 1.0), ("1.5", 1.5),
                                        ("2G", 2e9), (3, 3.0), ("1Gi", 1 << 30)])
def test_parse_quantity(text: str | int, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["", "Mi", "12Q", "1e3x"])
def test_parse_quantity_rejects(bad: str) -> None:
    with pytest.raises(PodSpecError, match="quantity"):
        parse_quantity(bad)


# -- volumes as the kubelet lays them out --------------------------------------------------------


def test_volumes_are_laid_out_as_the_kubelet_does(helm: str, chart: Path,
                                                  tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(json.dumps({
        "peerKey": {"value": "a-test-key-of-thirty-two-bytes!!"},
        "rules": {"iperf-server": {"type": "podLabel", "name": "app", "value": "iperf3"},
                  "cluster-v4": {"type": "cidr", "from": "10.244.0.0/16", "to": "10.244.0.0/16",
                                 "reverse": True},
                  "cluster-v6": {"type": "cidr", "from": "fd00::/56", "to": "fd00::/56"}}}))
    docs = render_chart(helm, chart, "-f", str(values))
    tmp_path = tmp_path / "volumes"
    pod = pod_template(docs)
    volumes = kubelet.lay_out_volumes(pod, kubelet.objects_by_kind(docs), tmp_path)
    assert volumes["bpffs"] == HostDir("/sys/fs/bpf")
    assert volumes["tmp"] == Tmpfs(16 << 20)
    rules = Path(volumes["rules"].path)  # type: ignore[union-attr]
    assert (rules / "..data").is_symlink() and os.readlink(rules / "..data").startswith("..")
    assert os.readlink(rules / "cluster-v4") == "..data/cluster-v4"
    assert sorted(p for p in os.listdir(rules) if not p.startswith("..")) == \
        ["cluster-v4", "cluster-v6", "iperf-server"]
    loaded = RuleSet.load(rules)  # the router's loader reads the kubelet's layout
    assert len(loaded.filters) == 1 and len(loaded.validators) == 2
    key = Path(volumes["peer-key"].path) / "peer-key"  # type: ignore[union-attr]
    assert key.read_bytes() == b"a-test-key-of-thirty-two-bytes!!"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o400  # the volume's defaultMode
    run = Path(volumes["run"].path)  # type: ignore[union-attr]
    assert run.is_dir() and stat.S_IMODE(run.stat().st_mode) == 0o777


def test_a_missing_host_path_fails_like_the_kubelet(helm: str, chart: Path,
                                                    tmp_path: Path) -> None:
    docs = render_chart(helm, chart, "--set", "containerRuntime.enabled=true",
                        "--set", f"containerRuntime.socket={tmp_path}/no.sock")
    with pytest.raises(PodSpecError, match=r"hostPath .*no\.sock does not exist \(type Socket\)"):
        kubelet.lay_out_volumes(pod_template(docs), kubelet.objects_by_kind(docs), tmp_path)


def test_a_missing_configmap_is_named(pod: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(PodSpecError, match="ConfigMap .* is not among the rendered objects"):
        kubelet.lay_out_volumes(pod, {}, tmp_path)


def test_podman_flags_for_this_machine_stay_within_its_hard_limits() -> None:
    assert kubelet.global_flags() == ["--runtime", "runc"]
    flags = kubelet.ulimit_flags()
    limits = dict(f.split("=") for f in flags[1::2])
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert limits["nofile"] == f"{nofile}:{nofile}"
    soft, hard = (int(x) for x in limits["nproc"].split(":"))
    assert soft == hard <= kubelet.NPROC
