"""The Helm chart's DaemonSet on the local testbed: one router container per node, with podman.

The chart is rendered with helm; its pod spec is translated into `podman run` flags
(`ebpfrouter.k8s.podspec`) and run on each testbed node by a stand-in kubelet
(`ebpfrouter.k8s.podman`): the node's network namespace for hostNetwork, the host's pid
namespace, only the capabilities the chart adds, its mounts, env and read-only root. A router
counts as started once its readinessProbe passes (as the kubelet would see it) and it sees its
peers. The interface matches `ebpfrouter.demo.Routers`, so measurements can use either.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from .config import DEFAULT_CONTROL_SOCKET
from .k8s.podman import Container, http_probe, lay_out_volumes, objects_by_kind
from .k8s.podspec import Node, PodmanRun, pod_template, podman_run
from .testbed import NETNS_DIR, Testbed

CONTAINER = "router"
LABEL = "io.github.ebpf-router.chartbed"


class ChartBedError(RuntimeError):
    """A chart router did not start or answer; the message names the node and has its log."""


def render_chart(helm: str, chart: Path, *args: str, namespace: str = "kube-system",
                 release: str = "rt", kube_version: str = "1.33.0") -> list[dict[str, Any]]:
    """`helm template` the chart offline (no user config, no cluster); its documents."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "HELM_CACHE_HOME": "/nonexistent/c",
           "HELM_CONFIG_HOME": "/nonexistent/f", "HELM_DATA_HOME": "/nonexistent/d"}
    proc = subprocess.run([helm, "template", release, str(chart), "--namespace", namespace,
                           "--kube-version", kube_version, *args],
                          capture_output=True, text=True, timeout=60, env=env)
    if proc.returncode != 0:
        raise ChartBedError(f"helm template {chart}: {proc.stderr.strip()[-400:]}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


class ChartRouters:
    """The chart's router container on every node of `bed`, removed again by `stop()`.

    Volumes are laid out under `workdir/<node>` (removed by `stop()`); containers are named
    `<run_id>-<node>` and labelled with `run_id`.
    """

    def __init__(self, bed: Testbed, docs: list[dict[str, Any]], workdir: Path,
                 run_id: str) -> None:
        self.bed = bed
        self.docs = docs
        self.workdir = workdir
        self.run_id = run_id
        self.pod = pod_template(docs)
        self.objects = objects_by_kind(docs)
        self.containers: dict[str, Container] = {}

    def plan(self, node_name: str) -> PodmanRun:
        """The podman run of `node_name`'s router (its volumes laid out under the workdir)."""
        node = self.bed.node(node_name)
        volumes = lay_out_volumes(self.pod, self.objects, self.workdir / node.name)
        return podman_run(self.pod, CONTAINER, Node(node.name, node.underlay_ip,
                                                    str(NETNS_DIR / node.netns)),
                          volumes, name=f"{self.run_id}-{node.name}",
                          objects=self.objects, labels={LABEL: self.run_id})

    def socket_of(self, node: str) -> str:
        """The control socket of `node`'s router, seen from the host."""
        run = self.containers[node].run
        return run.host_path(run.env.get("ROUTER_CONTROL_SOCKET", DEFAULT_CONTROL_SOCKET))

    def start(self, timeout: float = 60.0) -> None:
        """Start every node's container; wait until each is ready and sees its peers."""
        for node in self.bed.nodes:
            container = Container(self.plan(node.name))
            self.containers[node.name] = container
            container.start()
        deadline = time.monotonic() + timeout
        for node in self.bed.nodes:
            self._wait_ready(node.name, deadline)

    def _wait_ready(self, name: str, deadline: float) -> None:
        from .control import query_status

        container = self.containers[name]
        node = self.bed.node(name)
        readiness = container.run.probes.get("readiness")
        last = "not probed yet"
        while True:
            if not container.running():
                raise ChartBedError(f"router container on {name} exited with "
                                    f"{container.exit_code()}: {container.logs()}")
            ready = True
            if readiness is not None:
                ready, last = http_probe(readiness, node.underlay_ip,
                                         str(NETNS_DIR / node.netns))
            if ready:
                try:
                    peers = query_status(self.socket_of(name), timeout=5).get("peers", [])
                    if len(peers) >= len(self.bed.nodes) - 1:
                        return
                    last = f"sees {len(peers)} peer(s)"
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last = str(exc)
            if time.monotonic() > deadline:
                raise ChartBedError(f"router container on {name} not ready: {last}; "
                                    f"{container.logs()}")
            time.sleep(0.2)

    def status(self, node: str) -> dict[str, Any]:
        """`ebpf-router status --json` of `node`'s router, through its control socket."""
        from .control import query_status

        return query_status(self.socket_of(node), timeout=5)

    def bypassed(self) -> int:
        """Connections bypassed so far, counted once (at the client side's router)."""
        return sum(int(self.status(n.name)["counters"].get("bypassed_client", 0))
                   for n in self.bed.nodes)

    def stop(self) -> dict[str, int | None]:
        """Stop (the pod's grace period) and remove every container; exit codes by node."""
        grace = int(self.pod.get("terminationGracePeriodSeconds", 30))
        codes: dict[str, int | None] = {}
        for name, container in self.containers.items():
            try:
                codes[name] = container.stop(grace)
            finally:
                container.remove()
            shutil.rmtree(self.workdir / name, ignore_errors=True)
        self.containers.clear()
        return codes
