"""`ebpf-router` command line: parsing, status over a live control socket, clear errors."""

from __future__ import annotations

import json

import pytest

from ebpfrouter.cli import build_parser, main
from ebpfrouter.control import ControlServer


def test_run_flags_parse() -> None:
    args = build_parser().parse_args([
        "run", "--overlay-if", "flannel.1", "--host-if", "eth0", "--port", "4321",
        "--rules-dir", "/tmp/r", "--key-file", "/tmp/k", "--control-socket", "/tmp/c.sock",
        "--health-port", "9000", "--pod-cidr", "10.244.1.0/24",
        "--peer", "10.244.2.0/24=192.168.77.2", "--peer", "10.244.3.0/24=192.168.77.3",
    ])
    assert args.command == "run"
    assert (args.overlay_if, args.host_if, args.router_port) == ("flannel.1", "eth0", "4321")
    assert args.peer == ["10.244.2.0/24=192.168.77.2", "10.244.3.0/24=192.168.77.3"]
    assert args.pod_cidr == ["10.244.1.0/24"] and args.health_port == 9000


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_bad_peer_flag_is_one_clear_message(capsys) -> None:
    assert main(["run", "--peer", "10.244.2.0/24"]) == 2
    err = capsys.readouterr().err
    assert "--peer '10.244.2.0/24'" in err and "OVERLAY_CIDR=HOST_ADDR" in err


def test_run_without_overlay_if_says_so(monkeypatch, capsys, tmp_path) -> None:
    for name in ("OVERLAY_IF", "HOST_IF", "ROUTER_KEY", "ROUTER_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    code = main(["run", "--host-if", "lo", "--control-socket", str(tmp_path / "c.sock")])
    out = capsys.readouterr()
    assert code == 1
    assert "OVERLAY_IF is not set" in out.out + out.err
    assert not (tmp_path / "c.sock").exists()


def test_run_bad_env_port(monkeypatch, capsys) -> None:
    monkeypatch.setenv("ROUTER_PORT", "70000")
    assert main(["run"]) == 2
    assert "ROUTER_PORT: 70000 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--min-age", "-1", "--min-age -1.0: must be 0..3600 seconds"),
    ("--min-age", "nan", "--min-age nan: must be 0..3600 seconds"),
    ("--read-first-wait", "9", "--read-first-wait 9.0: must be 0..8 seconds"),
])
def test_run_bad_timing_flags(monkeypatch, capsys, flag: str, value: str, message: str) -> None:
    monkeypatch.delenv("ROUTER_PORT", raising=False)
    assert main(["run", flag, value]) == 2
    assert message in capsys.readouterr().err


def test_run_bad_swap_batch(monkeypatch, capsys) -> None:
    monkeypatch.delenv("ROUTER_PORT", raising=False)
    assert main(["run", "--swap-batch", "0"]) == 2
    assert "--swap-batch 0: must be 1..64" in capsys.readouterr().err


def test_demo_bad_rounds(capsys) -> None:
    assert main(["demo", "--rounds", "0"]) == 2
    assert "--rounds 0: must be 1..20" in capsys.readouterr().err


def test_status_without_daemon_names_the_socket(tmp_path, capsys) -> None:
    path = tmp_path / "none.sock"
    assert main(["status", "--control-socket", str(path)]) == 1
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("as_json", [True, False])
def test_status_from_a_live_control_socket(tmp_path, capsys, as_json) -> None:
    status = {"node": "n1", "uptime_s": 3.0, "peers": ["192.0.2.2"],
              "counters": {"seen": 4, "bypassed": 3, "pending": 1, "failed": 0},
              "connections": [{"state": "swapped", "pid": 42, "fd": 7,
                               "tuple": "10.0.0.1:1->10.0.1.1:2"}]}
    path = str(tmp_path / "c.sock")
    with ControlServer(path, lambda: status):
        code = main(["status", "--control-socket", path] + (["--json"] if as_json else []))
    out = capsys.readouterr().out
    assert code == 0
    if as_json:
        assert json.loads(out) == status
    else:
        assert "bypassed 3" in out and "swapped" in out and "10.0.0.1:1->10.0.1.1:2" in out


def test_testbed_subcommand_is_wired(capsys) -> None:
    args = build_parser().parse_args(["testbed", "exec", "--id", "ebtb000000", "n1p0", "true"])
    assert args.testbed_command == "exec" and args.target == "n1p0"
    assert main(["testbed", "exec", "--id", "ebtb000000", "n1p0", "true"]) == 1
    assert "ebtb000000" in capsys.readouterr().err


def test_demo_flags_parse() -> None:
    args = build_parser().parse_args(["demo", "--json", "--seconds", "2", "--builtin"])
    assert (args.json, args.seconds, args.builtin) == (True, 2.0, True)


def test_bench_subcommand_is_wired(capsys) -> None:
    args = build_parser().parse_args(["bench", "--quick", "iperf3", "sockperf"])
    assert args.command == "bench" and args.quick and args.func is not None
    assert main(["bench", "no-such-workload"]) == 2
    assert "no-such-workload" in capsys.readouterr().err
