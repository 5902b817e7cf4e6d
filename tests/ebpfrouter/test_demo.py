"""`ebpf-router demo --json` for real on a fresh testbed (root)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ebpfrouter.demo import PACKAGE_ROOT, child_env
from ebpfrouter.testbed import list_runs


def run_demo(*flags: str) -> dict:
    before = {bed.run_id for bed in list_runs()}
    res = subprocess.run([sys.executable, "-m", "ebpfrouter.cli", "demo", "--json", *flags],
                         capture_output=True, text=True, timeout=150, env=child_env(),
                         cwd=str(PACKAGE_ROOT))
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout + res.stderr  # one JSON object, progress on stderr
    result = json.loads(lines[0])
    assert "[demo]" in res.stderr
    assert res.returncode == 0, (result, res.stderr)
    assert result["testbed"] not in {bed.run_id for bed in list_runs()} - before  # removed
    return result


def check(result: dict) -> None:
    for key in ("overlay_bps", "bypass_bps", "host_bps"):
        assert isinstance(result[key], float) and result[key] > 1e6, (key, result)
    assert result["bypassed_connections"] >= 1
    assert result["integrity_ok"] is True
    integrity = result["integrity"]
    assert integrity["sent_bytes"] == integrity["received_bytes"] > 0
    assert integrity["sent_sha256"] == integrity["received_sha256"]
    assert integrity["bypassed"] == 1
    assert result["bypass_effective"] is True
    assert result["bypass_run"]["bypassed_connections"] >= 1
    assert 0 <= result["bypass_run"]["overlay_fraction"] < 0.5
    assert result["bypass_host_ratio"] == pytest.approx(result["bypass_bps"] / result["host_bps"])
    assert result["router_exit_codes"] == {"node1": 0, "node2": 0}


@pytest.mark.root
def test_demo_json_iperf3() -> None:
    result = run_demo("--seconds", "2")
    assert result["tool"] == "iperf3"
    check(result)
    # three alternating bypass / node-to-node runs, medians reported
    assert len(result["bypass_runs_bps"]) == len(result["host_runs_bps"]) == 3
    assert sorted(result["bypass_runs_bps"])[1] == result["bypass_bps"]
    assert result["bypassed_connections"] >= 2  # iperf3 control + data connections, + stream


@pytest.mark.root
def test_demo_json_builtin_stream() -> None:
    result = run_demo("--seconds", "2", "--builtin", "--rounds", "1")
    assert result["tool"] == "built-in stream"
    check(result)
