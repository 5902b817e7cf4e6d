"""The bench harness: quick runs on a real testbed (parsers checked against the tools' real
output captured in the run), the "not bypassed" labelling, reports (CPU per unit of work too),
and the CLI wiring. Timings are never asserted: only that numbers exist, are positive and
carry their units. The CPU meter itself is tested in test_bench_cpu.py."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ebpfrouter.bench import add_bench_parser, parsers, report, run_bench
from ebpfrouter.bench.cli import main as bench_main
from ebpfrouter.bench.harness import BenchError
from ebpfrouter.bench.runner import BenchOptions, classify, make_workloads

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "out"
    code = bench_main([*argv, "--quick", "--out", str(out)])
    return code, json.loads((out / "results.json").read_text())


def _samples(result: dict[str, Any], workload: str, mode: str) -> list[dict[str, Any]]:
    return [s for s in result["samples"] if s["workload"] == workload and s["mode"] == mode]


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


@pytest.mark.root
@pytest.mark.slow
def test_quick_overlay_and_host_iperf3_sockperf(tmp_path: Path) -> None:
    _need("iperf3", "sockperf")
    code, result = _run(tmp_path, "iperf3", "sockperf", "--modes", "overlay,host")
    assert code == 0, [s["failure"] for s in result["samples"]]
    assert result["machine"]["cores"] >= 1 and result["machine"]["kernel"]
    assert result["machine"]["versions"]["iperf3"].startswith("iperf 3")
    units = {m["name"]: m["unit"] for m in result["workloads"]["iperf3"]["metrics"]}
    assert units == {"1 stream": "Gbit/s", "4 streams": "Gbit/s"}
    for mode in ("overlay", "host"):
        (ip,) = _samples(result, "iperf3", mode)
        (sp,) = _samples(result, "sockperf", mode)
        assert ip["errors"] == 0 and sp["errors"] == 0
        assert ip["router"] is None and ip["bypass_state"] is None  # no router in these modes
        # the parsers, on the real output of this very run, give the reported numbers
        for name, streams in (("1 stream", 1), ("4 streams", 4)):
            parsed = parsers.parse_iperf3(ip["raw"][name])
            assert parsed["streams"] == streams
            assert ip["values"][name] == pytest.approx(parsed["bits_per_second"] / 1e9)
            assert 0.01 < ip["values"][name] < 1000  # Gbit/s, not bit/s
        # CPU: the machine worked during the run; iperf3's cost is per GB of what it sent
        sent = sum(parsers.parse_iperf3(ip["raw"][n])["bytes_sent_all"] for n in ip["raw"])
        assert ip["cpu"]["work"] == {"bytes": pytest.approx(sent)} and sent > 1e8
        cost = ip["cpu"]["per_unit"]
        assert cost["unit"] == "s/GB" and cost["total"] > 0 and cost["routers"] == 0
        assert cost["total"] == pytest.approx(ip["cpu"]["machine"]["busy"] * 1e9 / sent,
                                              rel=1e-3)
        assert ip["cpu"]["load"]["total"] > 0  # iperf3 client and server, reaped
        assert sp["cpu"]["machine"]["busy"] > 0 and sp["cpu"]["per_unit"] is None
        parsed = parsers.parse_sockperf(sp["raw"]["sockperf pp"])
        assert parsed["observations"] > 0
        assert 0 < sp["values"]["latency p50"] <= sp["values"]["latency p99"]
        assert sp["values"]["latency p50"] < 100_000  # µs, a ping-pong on one machine
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| iperf3 | 1 stream (Gbit/s, ↑) |" in md
    assert "| sockperf | latency p99 (µs, ↓) |" in md
    assert "## CPU per unit of work" in md and "| iperf3 (s/GB) | overlay |" in md
    assert "| iperf3 (s/GB) | host |" in md and "| sockperf (" not in md
    assert "- iperf3: no bypass comparison (no bypass runs)." in md
    assert result["machine"]["cpu_accounting"]["clk_tck"] > 0
    assert (tmp_path / "out" / "bars.png").read_bytes().startswith(PNG_MAGIC)
    row = next(r for r in result["summary"] if r["metric"] == "1 stream")
    assert row["overlay"]["median"] > 0 and row["host"]["median"] > 0
    assert row["bypass"] is None and row["bypass_host"] is None


@pytest.mark.root
@pytest.mark.slow
def test_quick_host_mode_mpi_memcached_redis_connect(tmp_path: Path) -> None:
    _need("mpirun", "mpicc", "memcached", "memcaslap", "redis-server", "redis-benchmark")
    code, result = _run(tmp_path, "mpilat", "memcached", "redis", "connect", "--modes", "host")
    assert code == 0, [s["failure"] for s in result["samples"]]
    (mpi,) = _samples(result, "mpilat", "host")
    unit, series = parsers.parse_mpi(mpi["raw"]["mpirun"], "mpilat")
    assert unit == "us" and min(series) == 1 and max(series) == 1 << 16
    assert all(v > 0 for v in series.values())
    assert mpi["values"]["64 KiB"] == series[65536]
    (mc,) = _samples(result, "memcached", "host")
    parsed = parsers.parse_memaslap(mc["raw"]["memcaslap"])
    assert mc["values"]["throughput"] == pytest.approx(parsed["ops_per_second"] / 1e3)
    assert mc["values"]["throughput"] > 0
    assert parsed["avg_us"] > 0 and parsed["get_misses"] >= 0
    assert mc["cpu"]["work"] == {"requests": parsed["ops"]}
    assert mc["cpu"]["per_unit"]["unit"] == "ms/1k req" and mc["cpu"]["per_unit"]["total"] > 0
    (rd,) = _samples(result, "redis", "host")
    parsed_redis = parsers.parse_redis_benchmark(rd["raw"]["redis-benchmark"])
    assert set(parsed_redis) >= {"SET", "GET"} and rd["values"]["GET"] > 0
    assert rd["cpu"]["work"] == {"requests": 20000.0 * len(parsed_redis)}  # -n per test
    assert rd["cpu"]["per_unit"]["total"] > 0
    (cn,) = _samples(result, "connect", "host")
    parsed_conn = parsers.parse_connrate(cn["raw"]["connrate"])
    assert parsed_conn["connections"] > 0 and parsed_conn["errors"] == 0
    assert cn["values"]["latency p50"] > 0
    assert cn["cpu"]["work"] == {"connections": float(parsed_conn["connections"])}
    assert cn["cpu"]["per_unit"]["unit"] == "ms/1k conn"
    assert mpi["cpu"]["per_unit"] is None  # no unit of work for MPI
    assert (tmp_path / "out" / "mpilat.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.root
@pytest.mark.slow
def test_bypass_mode_counts_swaps_and_router_cpu(tmp_path: Path) -> None:
    _need("sockperf")
    code, result = _run(tmp_path, "sockperf", "--modes", "bypass,host", "--order", "grouped")
    assert code == 0, [s["failure"] for s in result["samples"]]
    (sample,) = _samples(result, "sockperf", "bypass")
    assert sample["router"]["bypassed"] >= 1, sample["router"]
    assert sample["bypass_state"] in ("bypassed", "partly bypassed")
    assert sample["router_cpu_s"] > 0
    assert sample["cpu"]["routers"]["total"] > 0  # both routers' trees, during the run
    (host,) = _samples(result, "sockperf", "host")
    assert host["cpu"]["routers"]["total"] == 0
    assert set(result["routers"]["sockperf"]) == {"node1", "node2"}  # grouped: per workload
    assert result["order"] == "grouped"
    row = next(r for r in result["summary"] if r["metric"] == "latency p50")
    assert row["bypass_host"] is not None


@pytest.mark.root
@pytest.mark.slow
def test_routers_that_bypass_nothing_are_reported_as_not_bypassed(tmp_path: Path) -> None:
    _need("sockperf")
    rule = tmp_path / "nothing"
    rule.write_text("type=cidr\nfrom=192.0.2.0/24\nto=192.0.2.0/24\n")  # matches no pod
    out = tmp_path / "out"
    code = bench_main(["sockperf", "--quick", "--modes", "overlay,bypass", "--out", str(out),
                       "--rule", str(rule), "--require-bypass"])
    result = json.loads((out / "results.json").read_text())
    (sample,) = _samples(result, "sockperf", "bypass")
    assert sample["router"]["bypassed"] == 0 and sample["bypass_state"] == "not bypassed"
    assert sample["values"]["latency p50"] > 0  # measured, but not claimed as a bypass
    assert code == 1  # --require-bypass
    row = next(r for r in result["summary"] if r["metric"] == "latency p50")
    assert row["bypass_overlay"] is None and row["bypass_state"] == "not bypassed"
    md = (out / "results.md").read_text()
    assert "**not bypassed**" in md and "n/a (not bypassed)" in md
    assert "0 (not bypassed)" in md


# -- without root --------------------------------------------------------------------------


def _sample(mode: str, value: float, bypassed: int | None = None,
            failed: int = 0, cost: float | None = None) -> dict[str, Any]:
    """A sample; with `cost`, a `cpu` dict whose machine total per GB is `cost` (user 40%,
    system 30%, softirq 20%, unsampled 10%; the routers, if any, a tenth)."""
    router = None if bypassed is None else {"bypassed": bypassed, "seen": 2 * bypassed,
                                            "bypassed_either_side": 2 * bypassed,
                                            "failed": failed}
    sample = {"workload": "w", "mode": mode, "repeat": 0, "values": {"m": value}, "errors": 0,
              "failure": None, "router": router, "router_cpu_s": 0.1 if router else None,
              "wall_s": 1.0, "bypass_state": classify(router) if router else None}
    if cost is not None:
        from ebpfrouter.bench.cpu import per_unit

        machine = {"user": 0.4 * cost, "system": 0.3 * cost, "irq": 0.0,
                   "softirq": 0.2 * cost, "unsampled": 0.1 * cost, "busy": cost}
        routers = {"total": cost / 10 if router else 0.0}
        cpu = {"machine": machine, "routers": routers, "work": {"bytes": 1e9}}
        sample["cpu"] = {**cpu, "per_unit": per_unit(cpu)}
    return sample


WORKLOADS = {"w": {"title": "W", "metrics": [{"name": "m", "unit": "Gbit/s", "size": None,
                                              "higher_is_better": True, "in_table": True}]}}


def test_summary_ratios_only_when_bypassed() -> None:
    samples = [_sample("overlay", 5.0), _sample("host", 10.0), _sample("bypass", 9.0, 3),
               _sample("bypass", 9.5, 2)]
    (row,) = report.summarize(WORKLOADS, samples)
    assert row["bypass"]["median"] == pytest.approx(9.25) and row["bypass"]["n"] == 2
    assert row["bypass_host"] == pytest.approx(0.925)
    assert row["bypass_overlay"] == pytest.approx(1.85)
    samples[-2:] = [_sample("bypass", 9.0, 0), _sample("bypass", 9.5, 0)]
    (row,) = report.summarize(WORKLOADS, samples)
    assert row["bypass_state"] == "not bypassed" and row["bypass_host"] is None


def test_partly_bypassed_is_marked() -> None:
    assert classify({"bypassed": 0, "failed": 0}) == "not bypassed"
    assert classify({"bypassed": 2, "failed": 1}) == "partly bypassed"
    assert classify({"bypassed": 2, "failed": 0}) == "bypassed"
    samples = [_sample("host", 10.0), _sample("bypass", 9.0, 2, failed=1)]
    result = {"workloads": WORKLOADS, "samples": samples, "command": "x", "quick": True,
              "repeat": 1, "started": "now", "machine": {"cpu_model": "c", "cores": 1,
                                                         "kernel": "k", "python": "3"}}
    result["summary"] = report.summarize(WORKLOADS, samples)
    md = report.markdown(result)
    assert "| 0.90* |" in md
    assert "CPU per unit" not in md  # samples without `cpu` (older results): no CPU table


def _result(samples: list[dict[str, Any]]) -> dict[str, Any]:
    result = {"workloads": WORKLOADS, "samples": samples, "command": "x", "quick": True,
              "repeat": 1, "started": "now", "machine": {"cpu_model": "c", "cores": 1,
                                                         "kernel": "k", "python": "3"}}
    result["summary"] = report.summarize(WORKLOADS, samples)
    return result


def test_cpu_summary_ratios_split_and_routers_share() -> None:
    samples = [_sample("overlay", 5.0, cost=1.0), _sample("overlay", 5.0, cost=1.2),
               _sample("host", 10.0, cost=0.6), _sample("bypass", 9.0, 3, cost=0.63),
               _sample("bypass", 9.0, 3, cost=0.65), _sample("bypass", 9.0, 3, cost=0.64)]
    samples.append({**_sample("bypass", 9.0, 3, cost=9.0), "failure": "boom"})  # left out
    (row,) = report.cpu_summary(WORKLOADS, samples)
    assert row["unit"] == "s/GB" and row["bypass"]["total"]["n"] == 3
    assert row["bypass"]["total"]["median"] == pytest.approx(0.64)
    assert row["overlay"]["total"]["median"] == pytest.approx(1.1)
    assert row["bypass"]["softirq"]["median"] == pytest.approx(0.2 * 0.64)
    assert row["bypass"]["unsampled"]["median"] == pytest.approx(0.1 * 0.64)
    assert row["bypass"]["routers_share"]["median"] == pytest.approx(0.1)
    assert row["host"]["routers"]["median"] == 0
    assert row["bypass_host"] == pytest.approx(0.64 / 0.6)
    assert row["saving_vs_overlay"] == pytest.approx(1 - 0.64 / 1.1)
    result = _result(samples)
    md = report.markdown(result)
    assert ("| w (s/GB) | bypass | 0.64 (0.63–0.65) | 0.256 | 0.192 | 0.128 | 0.064 | 0.064 "
            "| 10.0% |") in md
    assert "| w (s/GB) | host | 0.6 | 0.24 | 0.18 | 0.12 | 0.06 | - | - |" in md
    assert "- w: bypass uses 1.07× the host's CPU per unit (+7%), 42% less than the " \
        "overlay." in md


def test_cpu_comparison_withheld_when_nothing_was_bypassed() -> None:
    samples = [_sample("overlay", 5.0, cost=1.0), _sample("host", 10.0, cost=0.6),
               _sample("bypass", 9.0, 0, cost=1.0)]
    (row,) = report.cpu_summary(WORKLOADS, samples)
    assert row["bypass_host"] is None and row["saving_vs_overlay"] is None
    md = report.markdown(_result(samples))
    assert "| w (s/GB) | bypass **not bypassed** |" in md
    assert "- w: no bypass comparison (bypass not bypassed)." in md


def test_parsers_reject_garbage_naming_the_tool() -> None:
    for func, name in ((parsers.parse_iperf3, "iperf3"), (parsers.parse_sockperf, "sockperf"),
                       (parsers.parse_redis_benchmark, "redis-benchmark"),
                       (parsers.parse_memaslap, "memcaslap"), (parsers.parse_connrate, "connrate")):
        with pytest.raises(parsers.ParseError, match=name):
            func("connection refused\n")
    with pytest.raises(parsers.ParseError, match="mpibw"):
        parsers.parse_mpi("mpirun: error\n", "mpibw")
    with pytest.raises(parsers.ParseError, match="iperf3: unable to connect"):
        parsers.parse_iperf3(json.dumps({"error": "unable to connect"}))


def test_plan_orders() -> None:
    from ebpfrouter.bench.runner import make_plan

    a, b = make_workloads(BenchOptions(keys=["connect", "iperf3"], quick=True))
    grouped = [(act, w.key if w else None, mode, r) for act, w, mode, r in
               make_plan([a, b], ["overlay", "bypass", "host"], 2, "grouped")]
    assert grouped[:6] == [("measure", "connect", "overlay", 0), ("measure", "connect",
                                                                   "overlay", 1),
                           ("measure", "connect", "host", 0), ("measure", "connect", "host", 1),
                           ("start", "connect", "", 0), ("measure", "connect", "bypass", 0)]
    assert grouped[7] == ("stop", "connect", "", 0) and len(grouped) == 16
    phased = make_plan([a, b], ["overlay", "bypass"], 1, "phased")
    assert [(act, mode) for act, _, mode, _ in phased] == [
        ("measure", "overlay"), ("measure", "overlay"), ("start", ""), ("measure", "bypass"),
        ("measure", "bypass"), ("stop", "")]
    with pytest.raises(BenchError, match="unknown order"):
        make_plan([a], ["overlay"], 1, "random")


def test_unknown_workload_and_mode_are_named() -> None:
    with pytest.raises(BenchError, match="unknown workload nope"):
        make_workloads(BenchOptions(keys=["nope"]))
    with pytest.raises(BenchError, match="unknown mode warp"):
        make_workloads(BenchOptions(keys=["connect"], modes=["warp"]))


def test_cli_wiring() -> None:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "iperf3", "mpilat", "--quick", "--repeat", "2",
                              "--out", "/tmp/x"])
    assert args.keys == ["iperf3", "mpilat"] and args.quick and args.repeat == 2
    assert args.func is run_bench and args.out == Path("/tmp/x")


@pytest.mark.root
@pytest.mark.slow
def test_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    _need("sockperf")
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "ebpfrouter.bench", "sockperf", "--quick",
                             "--out", str(tmp_path / "out")], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env, cwd=str(root))
    assert proc.stderr is not None
    run_id = None
    try:
        for line in proc.stderr:  # wait until the testbed is up, then interrupt
            found = re.search(r"testbed (ebtb[0-9a-f]{6}) up", line)
            if found:
                run_id = found.group(1)
                time.sleep(1.5)  # a sockperf server is running in a pod by now
                proc.send_signal(signal.SIGINT)
                break
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert run_id is not None
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert run_id not in netns
    assert not Path(f"/run/ebpf-router/testbed-{run_id}.json").exists()
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["interrupted"] is True


def test_mpi_agent_maps_addresses_to_namespaces() -> None:
    from ebpfrouter.bench.mpiagent import main as agent_main
    from ebpfrouter.bench.mpiagent import netns_for_host
    from ebpfrouter.testbed import Node, Pod, Testbed, TestbedError

    node = Node(1, "node1", "ebtb000001-n1", "192.168.77.1", "10.244.1.0/24", "10.244.1.1",
                "02:eb:7b:00:01:01")
    pod = Pod("n1p0", "node1", "ebtb000001-n1p0", "10.244.1.2", {})
    bed = Testbed("ebtb000001", [node], [pod])
    assert netns_for_host(bed, "10.244.1.2") == "ebtb000001-n1p0"
    assert netns_for_host(bed, "192.168.77.1") == "ebtb000001-n1"
    with pytest.raises(TestbedError, match="10.9.9.9"):
        netns_for_host(bed, "10.9.9.9")
    assert agent_main(["hostname-only"]) == 255
    assert agent_main(["--id", "ebtb000001", "10.244.1.2"]) == 255  # no command


def test_interrupt_on_raises_in_this_process_and_kills_forked_children() -> None:
    """SIGTERM inside `interrupt_on` is a KeyboardInterrupt here (so clean-up runs), a forked
    child that inherited the handler dies of it, and the old handler comes back."""
    import os
    import signal

    from ebpfrouter.bench.process import interrupt_on

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), interrupt_on(signal.SIGTERM):
        ready_r, ready_w = os.pipe()
        child = os.fork()
        if child == 0:  # the child: say it runs Python code, then wait to be terminated
            os.write(ready_w, b"1")  # (a signal during fork's own clean-up would be lost)
            signal.pause()
            os._exit(0)
        assert os.read(ready_r, 1) == b"1"
        os.close(ready_r)
        os.close(ready_w)
        os.kill(child, signal.SIGTERM)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGTERM
        signal.raise_signal(signal.SIGTERM)  # to this thread (os.kill may pick another one)
        pytest.fail("SIGTERM did not raise KeyboardInterrupt")
    assert signal.getsignal(signal.SIGTERM) == before


def test_usage_of_this_process_and_of_a_gone_one() -> None:
    import os

    from ebpfrouter.bench.process import usage

    mine = usage(os.getpid())
    assert mine["rss_kib"] > 1000 and mine["threads"] >= 1 and mine["fds"] >= 3
    assert usage(2**22 + 12345) == {"rss_kib": 0, "threads": 0, "fds": 0}


def test_results_are_written_without_matplotlib(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh install without the `bench` extra still gets results.json and results.md, and
    is told how to get the plots (the run is never lost to a missing plotting library)."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    samples = [_sample("host", 10.0, cost=0.5), _sample("bypass", 9.0, 2, cost=0.55)]
    result = {"workloads": WORKLOADS, "samples": samples, "command": "x", "quick": True,
              "repeat": 1, "started": "now", "machine": {"cpu_model": "c", "cores": 1,
                                                         "kernel": "k", "python": "3"}}
    paths = report.write(result, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["cpu_summary"][0]["bypass_host"] == pytest.approx(1.1)
    assert "## CPU per unit of work" in (tmp_path / "results.md").read_text()
    assert "matplotlib" in written["plots_skipped"] and "ebpf-router[bench]" in written[
        "plots_skipped"]
    assert set(paths) == {"json", "markdown"} and (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob("*.png"))
