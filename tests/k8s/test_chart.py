"""The Helm chart: lint, render, validate against the Kubernetes schemas, reject bad values."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from ebpfrouter.privileges import chart_capabilities
from ebpfrouter.rules import RuleSet

HERE = Path(__file__).resolve().parent
FULL_VALUES = HERE / "values-full.yaml"
KUBE_VERSION = "1.33.0"
# Kinds the Kubernetes schemas do not cover (CRDs); checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CAPABILITIES = chart_capabilities()  # the router's one list (ebpfrouter/privileges.py)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with no network and no user config influencing the result."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HELM_CACHE_HOME": "/nonexistent/c",
           "HELM_CONFIG_HOME": "/nonexistent/f", "HELM_DATA_HOME": "/nonexistent/d"}
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=60, env=env)


def render(helm: str, chart: Path, *args: str, kube_version: str = KUBE_VERSION) -> list[dict]:
    """`helm template` the chart; return its documents (fails the test on a helm error)."""
    proc = run_helm(helm, "template", "rt", str(chart), "--namespace", "kube-system",
                    "--kube-version", kube_version, *args)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def validate_all(docs: list[dict], kube_version: str = KUBE_VERSION) -> None:
    """Validate every document against the strict Kubernetes JSON schemas (offline)."""
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


def named(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
    return found[0]


def router_container(docs: list[dict]) -> dict:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "router")


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_lint_is_clean(helm: str, chart: Path, values: list[str]) -> None:
    proc = run_helm(helm, "lint", "--strict", str(chart), *values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("kube_version", ["1.25.0", KUBE_VERSION, "1.37.0"])
def test_default_render_is_valid(helm: str, chart: Path, kube_version: str) -> None:
    docs = render(helm, chart, kube_version=kube_version)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "Secret", "ConfigMap", "ClusterRole",
                            "ClusterRoleBinding", "DaemonSet"])
    validate_all(docs, kube_version)


def test_older_kubernetes_is_refused(helm: str, chart: Path) -> None:
    proc = run_helm(helm, "template", "rt", str(chart), "--kube-version", "1.24.0")
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_full_render_is_valid(helm: str, chart: Path) -> None:
    docs = render(helm, chart, "-f", str(FULL_VALUES))
    validate_all(docs)
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_labels = one(docs, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_daemonset_shape(helm: str, chart: Path) -> None:
    docs = render(helm, chart)
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert "hostIPC" not in pod
    assert pod["priorityClassName"] == "system-node-critical"
    host_paths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"/sys/fs/bpf", "/sys/kernel/tracing", "/sys/kernel/btf",
                          "/sys/fs/cgroup"}
    router = router_container(docs)
    mounts = {m["mountPath"]: m for m in router["volumeMounts"]}
    assert mounts["/sys/kernel/btf"]["readOnly"] is True
    # The node's cgroup hierarchy, where address virtualization attaches: read-only will do.
    assert mounts["/sys/fs/cgroup"]["readOnly"] is True
    assert mounts["/etc/rules"]["readOnly"] is True
    assert not any(p.startswith("/usr/src") for p in mounts)
    sc = router["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert router["command"] == ["ebpf-router", "run"]
    assert "--health-port=9180" in router["args"]
    assert "--node-name=$(NODE_NAME)" in router["args"]  # expanded by the kubelet from env
    env = env_of(router)
    assert env["OVERLAY_IF"] == "flannel.1" and env["HOST_IF"] == "eth0"
    assert env["ROUTER_PORT"] == "1234" and env["ROUTER_LOGLEVEL"] == "WARNING"
    assert env["NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    key_mount = next(m for m in router["volumeMounts"] if m["name"] == "peer-key")["mountPath"]
    assert env["ROUTER_KEY_FILE"] == f"{key_mount}/peer-key"
    assert router["image"] == "ghcr.io/ebpf-router/ebpf-router:0.1.0"  # appVersion
    assert router["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert router["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"peer": 1234, "http": 9180}


def test_full_values_reach_the_pod(helm: str, chart: Path) -> None:
    docs = render(helm, chart, "-f", str(FULL_VALUES))
    router = router_container(docs)
    env = env_of(router)
    assert (env["OVERLAY_IF"], env["HOST_IF"]) == ("vxlan.calico", "ens3")
    assert (env["ROUTER_PORT"], env["ROUTER_LOGLEVEL"]) == ("4321", "DEBUG")
    assert env["CONTAINER_RUNTIME_ENDPOINT"] == "unix:///run/crio/crio.sock"
    assert router["image"] == "registry.example.com/net/ebpf-router:0.1.0-rc1"
    assert {p["name"]: p["containerPort"] for p in router["ports"]} == {"peer": 4321, "http": 9191}
    assert "SYS_RESOURCE" in router["securityContext"]["capabilities"]["add"]
    pod = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "ebpf-router-sa"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "ebpf-router-sa"
    binding = one(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "ebpf-router-sa"
    socket = next(v for v in pod["volumes"] if v["name"] == "cri-socket")["hostPath"]
    assert socket == {"path": "/run/crio/crio.sock", "type": "Socket"}


def test_rbac_is_read_only_pods_and_nodes(helm: str, chart: Path) -> None:
    role = one(render(helm, chart), "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}
    ]


def test_privileged_switch(helm: str, chart: Path) -> None:
    sc = router_container(render(helm, chart, "--set", "securityContext.privileged=true"))[
        "securityContext"]
    assert sc["privileged"] is True
    assert "capabilities" not in sc


def test_container_label_rule_mounts_the_runtime_socket(helm: str, chart: Path) -> None:
    args = ["--set", "rules.w.type=containerLabel", "--set", "rules.w.name=role",
            "--set", "rules.w.value=worker"]
    docs = render(helm, chart, *args)
    router = router_container(docs)
    assert env_of(router)["CONTAINER_RUNTIME_ENDPOINT"] == "unix:///run/containerd/containerd.sock"
    assert "/run/containerd/containerd.sock" in {m["mountPath"] for m in router["volumeMounts"]}
    plain = router_container(render(helm, chart))
    assert "CONTAINER_RUNTIME_ENDPOINT" not in env_of(plain)


def parse_key_values(text: str) -> dict[str, str]:
    """The rule format: `key=value` lines, blank lines and `#` comments ignored."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        assert key not in out, f"duplicate key {key!r}"
        out[key] = value
    return out


def test_rules_configmap_matches_values_and_loads(helm: str, chart: Path, tmp_path: Path) -> None:
    docs = render(helm, chart, "-f", str(FULL_VALUES))
    data = named(docs, "ConfigMap", "bypass-router-rules")["data"]
    wanted = yaml.safe_load(FULL_VALUES.read_text())["rules"]
    assert set(data) == set(wanted)
    for name, rule in wanted.items():
        expected = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in rule.items()}
        assert parse_key_values(data[name]) == expected, name
        (tmp_path / name).write_text(data[name])
    # The router's own loader reads the rendered files.
    rules = RuleSet.load(tmp_path)
    assert len(rules.filters) == 2 and len(rules.validators) == 2


def test_grafana_dashboard_configmap_carries_the_file(helm: str, chart: Path) -> None:
    docs = render(helm, chart, "-f", str(FULL_VALUES))
    cm = named(docs, "ConfigMap", "bypass-router-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "networking"
    shipped = (chart / "dashboards" / "ebpf-router.json").read_text()
    assert json.loads(cm["data"]["ebpf-router.json"]) == json.loads(shipped)


def test_no_rules_renders_an_empty_configmap(helm: str, chart: Path) -> None:
    assert one(render(helm, chart), "ConfigMap")["data"] == {}


def test_peer_key_generated_random_or_given(helm: str, chart: Path) -> None:
    keys = []
    for _ in range(2):
        secret = one(render(helm, chart), "Secret")
        keys.append(base64.b64decode(secret["data"]["peer-key"]).decode())
    assert all(len(k) == 48 and k.isalnum() for k in keys)
    assert keys[0] != keys[1]
    secret = one(render(helm, chart, "-f", str(FULL_VALUES)), "Secret")
    assert base64.b64decode(secret["data"]["peer-key"]) == b"a-test-key-of-thirty-two-bytes!!"


def test_existing_secret_is_used_not_created(helm: str, chart: Path) -> None:
    docs = render(helm, chart, "--set", "peerKey.existingSecret=my-key")
    assert not by_kind(docs, "Secret")
    volumes = one(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "peer-key")["secret"]["secretName"] == "my-key"


BAD_VALUES = {
    "router-port-zero": ["--set", "router.port=0"],
    "router-port-too-big": ["--set", "router.port=70000"],
    "health-port-too-big": ["--set", "health.port=65536"],
    "unknown-loglevel": ["--set", "router.logLevel=TRACE"],
    "bad-rule-type": ["--set", "rules.r.type=ipLabel", "--set", "rules.r.name=a",
                      "--set", "rules.r.value=b"],
    "cidr-without-from": ["--set", "rules.r.type=cidr", "--set", "rules.r.to=10.0.0.0/8"],
    "cidr-without-to": ["--set", "rules.r.type=cidr", "--set", "rules.r.from=10.0.0.0/8"],
    "cidr-not-a-network": ["--set", "rules.r.type=cidr", "--set", "rules.r.from=10.0.0.0/33",
                           "--set", "rules.r.to=10.0.0.0/8"],
    "cidr-reverse-not-bool": ["--set", "rules.r.type=cidr", "--set", "rules.r.from=10.0.0.0/8",
                              "--set", "rules.r.to=10.0.0.0/8", "--set-string",
                              "rules.r.reverse=yes"],
    "label-rule-without-value": ["--set", "rules.r.type=podLabel", "--set", "rules.r.name=app"],
    "label-rule-with-cidr-key": ["--set", "rules.r.type=podLabel", "--set", "rules.r.name=app",
                                 "--set", "rules.r.value=x", "--set", "rules.r.from=10.0.0.0/8"],
    "bad-rule-name": ["--set", "rules.bad\\ name.type=podLabel"],
    "interface-too-long": ["--set", "router.hostInterface=averyveryverylongname"],
    "unknown-top-level-key": ["--set", "hostIPC=true"],
    "bad-pull-policy": ["--set", "image.pullPolicy=Sometimes"],
    "short-peer-key": ["--set", "peerKey.value=short"],
}


@pytest.mark.parametrize("args", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected_by_the_schema(helm: str, chart: Path, args: list[str]) -> None:
    proc = run_helm(helm, "template", "rt", str(chart), *args)
    assert proc.returncode != 0, f"accepted: {args}"
    assert "schema" in proc.stderr, proc.stderr


def test_notes_tell_how_to_check_status(helm: str, chart: Path) -> None:
    proc = run_helm(helm, "install", "rt", str(chart), "--namespace", "kube-system",
                    "--dry-run=client", "-f", str(FULL_VALUES))
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "kubectl -n kube-system exec ds/bypass-router -- ebpf-router status" in notes
    assert "-l app.kubernetes.io/name=router,app.kubernetes.io/instance=rt" in notes
    assert "4 rule(s)" in notes and ":9191" in notes


@pytest.mark.parametrize("values", [[], ["-f", str(FULL_VALUES)]], ids=["default", "full"])
def test_rendered_command_and_env_are_what_the_router_accepts(
        helm: str, chart: Path, values: list[str], tmp_path: Path) -> None:
    from ebpfrouter.cli import build_parser
    from ebpfrouter.config import RouterConfig

    docs = render(helm, chart, *values)
    router = router_container(docs)
    argv = [a.replace("$(NODE_NAME)", "node-a") for a in router["command"][1:] + router["args"]]
    args = build_parser().parse_args(argv)
    assert args.command == "run" and args.node_name == "node-a"
    # in the pod the router uses the API through its service account (cluster.in_cluster())
    assert args.kubeconfig is None and not args.no_kubernetes
    pod_spec = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pod_spec.get("automountServiceAccountToken", True) is not False
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert args.health_port == ports["http"]  # where the probes and /metrics are asked
    secret = one(docs, "Secret")
    key_file = tmp_path / "peer-key"
    key_file.write_bytes(base64.b64decode(secret["data"]["peer-key"]))
    env = {k: v for k, v in env_of(router).items() if isinstance(v, str)}
    env["ROUTER_KEY_FILE"] = str(key_file)
    cfg = RouterConfig.from_env(env, args).validate(check_interfaces=False)
    assert cfg.router_port == ports["peer"]
    assert cfg.overlay_if == env["OVERLAY_IF"] and cfg.loglevel == env["ROUTER_LOGLEVEL"]
    assert cfg.rules_dir == "/etc/rules"
    assert cfg.control_socket.startswith(
        next(m["mountPath"] for m in router["volumeMounts"] if m["name"] == "run"))


def test_peer_key_is_kept_across_upgrades(helm: str, chart: Path, standin,
                                          tmp_path: Path) -> None:
    """`lookup` against the API server stand-in: an existing key is reused, else a new one."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": standin.url}}],
        "users": [{"name": "nobody", "user": {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "nobody"}}],
    }))
    args = ["--dry-run=server", "--disable-openapi-validation", "--kubeconfig", str(kubeconfig)]

    def rendered_key() -> str:
        secret = one(render(helm, chart, *args), "Secret")
        return base64.b64decode(secret["data"]["peer-key"]).decode()

    first = rendered_key()  # first install: nothing to look up, a new key
    assert len(first) == 48 and first.isalnum()
    assert any("/secrets/rt-ebpf-router-peer-key" in r for r in standin.requests)
    standin.put("secrets", {"kind": "Secret", "apiVersion": "v1", "type": "Opaque",
                            # as the first install left it, owned by release rt
                            "metadata": {"name": "rt-ebpf-router-peer-key",
                                         "namespace": "kube-system",
                                         "labels": {"app.kubernetes.io/managed-by": "Helm"},
                                         "annotations": {
                                             "meta.helm.sh/release-name": "rt",
                                             "meta.helm.sh/release-namespace": "kube-system"}},
                            "data": {"peer-key": base64.b64encode(first.encode()).decode()}})
    assert rendered_key() == first  # upgrade: the installed key is kept
    assert rendered_key() == first
