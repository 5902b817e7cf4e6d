"""Missing Debian tools are named, with the apt-get line, before a command starts its run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfrouter import tools
from ebpfrouter.bench.cli import main as bench_main
from ebpfrouter.bench.harness import BenchError
from ebpfrouter.bench.runner import BenchOptions, make_workloads
from ebpfrouter.demo import PACKAGE_ROOT, child_env


def path_without(tmp_path: Path, *absent: str) -> str:
    """A PATH (one directory) holding every tool of `tools.DEBIAN_PACKAGES` found on this
    machine except `absent`: a machine where exactly those are not installed."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in tools.DEBIAN_PACKAGES:
        found = shutil.which(tool)
        if found and tool not in absent:
            (bindir / tool).symlink_to(found)
    return str(bindir)


def test_missing_and_install_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", path_without(tmp_path, "wrk", "memcaslap", "redis-benchmark"))
    assert tools.missing(["wrk", "memcaslap", "wrk", "redis-benchmark"]) == [
        "wrk", "memcaslap", "redis-benchmark"]
    assert tools.describe_missing(["memcaslap", "redis-benchmark"]) == (
        "memcaslap (libmemcached-tools), redis-benchmark (redis-tools); install them with: "
        "apt-get install libmemcached-tools redis-tools")
    assert tools.install_line(["postgres", "pgbench"]) == "apt-get install postgresql"
    assert tools.describe_missing(["wrk"]).endswith("install it with: apt-get install wrk")


def test_bench_names_every_missing_tool_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PATH", path_without(tmp_path, "memcaslap", "mpicc", "sockperf"))
    with pytest.raises(BenchError) as err:
        make_workloads(BenchOptions(keys=["iperf3", "sockperf", "memcached", "mpilat",
                                          "mpibw"]))
    assert str(err.value) == (
        "missing tools (sockperf: sockperf; memcaslap: memcached; mpicc: mpilat, mpibw): "
        "sockperf (sockperf), memcaslap (libmemcached-tools), mpicc (libopenmpi-dev); "
        "install them with: apt-get install sockperf libmemcached-tools libopenmpi-dev; "
        "or leave those workloads out (ebpf-router bench KEY...)")
    out = tmp_path / "out"
    assert bench_main(["memcached", "--quick", "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "apt-get install libmemcached-tools" in stderr
    assert "[bench] 1/" not in stderr and not out.exists()  # nothing ran, nothing written


@pytest.mark.root
def test_demo_says_iperf3_is_missing_before_it_builds_anything(tmp_path: Path) -> None:
    env = {**child_env(), "PATH": path_without(tmp_path, "iperf3")}
    proc = subprocess.Popen([sys.executable, "-m", "ebpfrouter.cli", "demo", "--seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(PACKAGE_ROOT))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        second = proc.stderr.readline()
        os.kill(proc.pid, signal.SIGINT)  # the demo removes what it built
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first == ("[demo] iperf3 is not installed: measuring with the built-in stream "
                     "instead (for iperf3 figures: iperf3 (iperf3); install it with: "
                     "apt-get install iperf3)\n")
    assert second.startswith("[demo] building a 2-node testbed")
    assert proc.returncode == 130, rest
