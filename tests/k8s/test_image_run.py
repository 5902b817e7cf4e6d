"""The image, built here, run as the chart's DaemonSet runs it, on each testbed node (root).

`scripts/build-image` builds the image once for this module (base from Debian when no
registry answers); the chart is rendered with helm and its pod spec run with podman through
`ebpfrouter.chartbed` (the translation is unit-tested in test_podspec.py). Checked here: each
router container has exactly the chart's capabilities, the node's network namespace, the
host's pid namespace and a read-only root; its probes pass; the routers bypass a pod-to-pod
connection and a checksummed stream arrives byte-exact; SIGTERM stops them cleanly.
Everything made is removed: containers, the image and base tags, the testbed, temp dirs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ebpfrouter.chartbed import ChartRouters, render_chart
from ebpfrouter.demo import measure_stream
from ebpfrouter.k8s.podman import http_probe, podman
from ebpfrouter.privileges import CAP_NUMBERS, chart_capabilities, daemon_required
from ebpfrouter.testbed import NETNS_DIR, Testbed, netns_inode

pytestmark = [pytest.mark.root, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}


def _mask(names: set[str]) -> int:
    return sum(1 << CAP_NUMBERS[n] for n in names)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image built by scripts/build-image under a unique tag (removed afterwards)."""
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        reason = f"apt-get install {' '.join(missing)} (.ci/system-deps installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    run = uuid.uuid4().hex[:8]
    tag, base = f"localhost/ebpf-router-test-{run}:t", f"localhost/ebpf-router-test-base-{run}:t"
    # EBPF_ROUTER_TEST_BASE: reuse a base made earlier (kept), instead of a debootstrap per run
    given_base = os.environ.get("EBPF_ROUTER_TEST_BASE")
    args = ["--base-tag", given_base] if given_base else ["--base-tag", base, "--rebuild-base"]
    started = time.monotonic()
    try:
        proc = subprocess.run([str(ROOT / "scripts" / "build-image"), "--tag", tag,
                               "--no-layer-cache", *args],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(f"\nimage built in {time.monotonic() - started:.0f} s:\n"
              + "\n".join(line for line in proc.stderr.splitlines()
                          if line.startswith("build-image:")))
        yield tag
    finally:
        podman("rmi", "--force", tag, check=False)
        if not given_base:
            podman("rmi", "--force", base, check=False)


@pytest.fixture(scope="module")
def docs(helm: str, chart: Path, image: str) -> list[dict[str, Any]]:
    """The chart rendered with its defaults, but for the image built above."""
    repository, tag = image.rsplit(":", 1)
    return render_chart(helm, chart, "--set", f"image.repository={repository}",
                        "--set", f"image.tag={tag}")


@pytest.fixture(scope="module")
def bed() -> Iterator[Testbed]:
    with Testbed.up(2, 1) as testbed:
        yield testbed


@pytest.fixture(scope="module")
def routers(bed: Testbed, docs: list[dict[str, Any]]) -> Iterator[ChartRouters]:
    workdir = Path(tempfile.mkdtemp(prefix="ebpf-router-chartbed-"))
    routers = ChartRouters(bed, docs, workdir, f"ebpf-router-test-{bed.run_id}")
    try:
        routers.start(timeout=90)
        yield routers
    finally:
        routers.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_image_records_version_commit_and_source(image: str) -> None:
    labels = yaml.safe_load(podman("image", "inspect", "--format", "{{json .Labels}}",
                                   image).stdout)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((ROOT / "charts" / "ebpf-router" / "Chart.yaml").read_text())
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.source"] == chart["sources"][0]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert labels["org.opencontainers.image.revision"].removesuffix("-dirty") == \
            head.stdout.strip()
    assert labels["io.github.ebpf-router.crictl"]  # a version, or none if unreachable


def test_each_router_runs_with_exactly_the_charts_settings(bed: Testbed,
                                                          routers: ChartRouters) -> None:
    chart_caps = {f"CAP_{c}" for c in chart_capabilities()}
    for node in bed.nodes:
        container = routers.containers[node.name]
        pid = container.pid()
        assert pid > 0, container.logs()
        status = proc_status(pid)
        # only the chart's capabilities were given (the bounding set), and after start-up the
        # router holds only what it keeps
        assert int(status["CapBnd"], 16) & ~_mask(chart_caps) == 0, status["CapBnd"]
        kept = daemon_required(tracer_open=True)
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == _mask(kept), status
        assert status["NoNewPrivs"] == "1"
        assert routers.status(node.name)["capabilities"] == sorted(
            kept, key=CAP_NUMBERS.__getitem__)
        assert status["Uid"].split()[:2] == ["0", "0"]
        # hostNetwork: the node's network namespace; hostPID: the host's pid namespace
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_inode(node.netns)
        assert os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino
        # a read-only root filesystem, read-only rules and key, writable run dir and /tmp
        probe = ("for p in / /etc/rules /etc/ebpf-router/key /run/ebpf-router /tmp; do "
                 "touch $p/.w 2>/dev/null && echo $p rw && rm $p/.w || echo $p ro; done")
        out = podman("exec", container.name, "sh", "-c", probe).stdout.split("\n")
        assert out[:5] == ["/ ro", "/etc/rules ro", "/etc/ebpf-router/key ro",
                           "/run/ebpf-router rw", "/tmp rw"], out


def test_probes_pass_from_the_node(bed: Testbed, routers: ChartRouters) -> None:
    for node in bed.nodes:
        probes = routers.containers[node.name].run.probes
        assert set(probes) == {"liveness", "readiness"}
        for probe in probes.values():
            ok, what = http_probe(probe, node.underlay_ip, str(NETNS_DIR / node.netns))
            assert ok, f"{node.name}: {what}"


def test_containerised_routers_bypass_pods_byte_exact(bed: Testbed,
                                                      routers: ChartRouters) -> None:
    server, client = bed.pods[0], bed.pods[1]
    client_node = bed.node(client.node)
    before = routers.bypassed()
    vx_before = bed.link_stats(client_node.name, "flannel.1")["tx_bytes"]
    stream = measure_stream(bed, server.name, client.name, server.ip, 2.0,
                            until=lambda: routers.bypassed() > before)
    overlay_bytes = bed.link_stats(client_node.name, "flannel.1")["tx_bytes"] - vx_before
    assert stream["ok"], stream
    assert stream["sent_bytes"] == stream["received_bytes"] > 0
    assert routers.bypassed() - before == 1
    server_status = routers.status(server.node)
    assert server_status["counters"]["bypassed_server"] >= 1
    # the stream's bytes left the overlay once swapped
    assert overlay_bytes < stream["sent_bytes"] / 2, (overlay_bytes, stream["sent_bytes"])


def test_sigterm_stops_the_routers_cleanly(routers: ChartRouters) -> None:
    assert routers.stop() == {"node1": 0, "node2": 0}
