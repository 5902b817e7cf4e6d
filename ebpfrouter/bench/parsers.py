"""Parsers for the output of each benchmark tool: text in, numbers (with units) out.

Every parser raises `ParseError` naming the tool when the output is not what it expects, so a
broken run is never reported as a number.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ParseError(ValueError):
    """A tool's output could not be understood; the message names the tool."""


def strip_ansi(text: str) -> str:
    """Remove terminal colour and cursor escapes."""
    return ANSI_RE.sub("", text)


def parse_iperf3(text: str) -> dict[str, float]:
    """`iperf3 -J` client output: received throughput (bit/s), retransmits, streams, bytes.

    `bytes_received` is what the server got in the timed part (the throughput's bytes);
    `bytes_sent_all` is every byte the client sent, the `-O` warm-up included (the sum of its
    intervals, omitted ones too): the bytes the whole run moved, which is what its CPU time
    is divided by (`cpu.per_unit`). Without intervals it falls back to the sender's total."""
    try:
        report = json.loads(text)
    except ValueError:
        raise ParseError(f"iperf3: output is not JSON: {text.strip()[:200]!r}") from None
    if "error" in report:
        raise ParseError(f"iperf3: {report['error']}")
    try:
        end = report["end"]
        received = float(end["sum_received"]["bits_per_second"])
        retrans = float(end.get("sum_sent", {}).get("retransmits", 0) or 0)
        streams = len(report["start"]["connected"])
        bytes_received = float(end["sum_received"].get("bytes", 0) or 0)
        intervals = [float(i["sum"]["bytes"]) for i in report.get("intervals", [])]
        sent_all = (sum(intervals) if intervals
                    else float(end.get("sum_sent", {}).get("bytes", 0) or 0))
    except (KeyError, TypeError) as exc:
        raise ParseError(f"iperf3: JSON lacks {exc}") from None
    return {"bits_per_second": received, "retransmits": retrans, "streams": float(streams),
            "bytes_received": bytes_received, "bytes_sent_all": sent_all}


_SOCKPERF_PCT = re.compile(r"percentile\s+([0-9.]+)\s*=\s*([0-9.]+)")
_SOCKPERF_AVG = re.compile(r"avg-(?:latency|rtt)=([0-9.]+)")
_SOCKPERF_LOST = re.compile(r"# dropped messages = (\d+); # duplicated messages = (\d+); "
                            r"# out-of-order messages = (\d+)")
_SOCKPERF_OBS = re.compile(r"Total (\d+) observations")


def parse_sockperf(text: str) -> dict[str, float]:
    """`sockperf pp` client output: avg, p50, p99 latency (µs), observations, lost messages."""
    text = strip_ansi(text)
    pcts = {float(p): float(v) for p, v in _SOCKPERF_PCT.findall(text)}
    avg = _SOCKPERF_AVG.search(text)
    obs = _SOCKPERF_OBS.search(text)
    if avg is None or 50.0 not in pcts or 99.0 not in pcts or obs is None:
        raise ParseError(f"sockperf: no latency summary in output: {text.strip()[-300:]!r}")
    lost = _SOCKPERF_LOST.search(text)
    bad = sum(int(g) for g in lost.groups()) if lost else 0
    return {"avg_us": float(avg.group(1)), "p50_us": pcts[50.0], "p99_us": pcts[99.0],
            "observations": float(obs.group(1)), "bad_messages": float(bad)}


def parse_redis_benchmark(text: str) -> dict[str, dict[str, float]]:
    """`redis-benchmark --csv` output: per test (SET, GET...) rps and latencies (ms)."""
    rows = [r for r in csv.reader(io.StringIO(text.strip())) if r]
    if not rows or rows[0][:2] != ["test", "rps"]:
        raise ParseError(f"redis-benchmark: no CSV header in output: {text.strip()[:200]!r}")
    header, out = rows[0], {}
    for row in rows[1:]:
        if len(row) != len(header):
            raise ParseError(f"redis-benchmark: bad CSV row {row!r}")
        try:
            out[row[0]] = {k: float(v) for k, v in zip(header[1:], row[1:], strict=True)}
        except ValueError:
            raise ParseError(f"redis-benchmark: non-numeric CSV row {row!r}") from None
    if not out:
        raise ParseError("redis-benchmark: CSV has no result rows")
    return out


_MEMASLAP_RUN = re.compile(r"Run time: ([0-9.]+)s Ops: (\d+) TPS: (\d+) Net_rate: ([0-9.]+)M/s")
_MEMASLAP_TOTAL = re.compile(r"Total Statistics \((\d+) events\)\s+Min:\s+(\d+)\s+Max:\s+(\d+)"
                             r"\s+Avg:\s+(\d+)")
_MEMASLAP_MISS = re.compile(r"get_misses: (\d+)")


def parse_memaslap(text: str) -> dict[str, float]:
    """`memcaslap -S` output: ops/s, average/min/max latency (µs), get misses."""
    text = strip_ansi(text)
    run = _MEMASLAP_RUN.search(text)
    if run is None:
        raise ParseError(f"memcaslap: no 'Run time' summary in output: {text.strip()[-300:]!r}")
    out = {"seconds": float(run.group(1)), "ops": float(run.group(2)),
           "ops_per_second": float(run.group(3)), "net_mb_per_second": float(run.group(4))}
    total = _MEMASLAP_TOTAL.search(text)
    if total is None:
        raise ParseError("memcaslap: no 'Total Statistics' latency block (run with -S)")
    out.update(events=float(total.group(1)), min_us=float(total.group(2)),
               max_us=float(total.group(3)), avg_us=float(total.group(4)))
    miss = _MEMASLAP_MISS.search(text)
    out["get_misses"] = float(miss.group(1)) if miss else 0.0
    return out


def parse_mpi(text: str, name: str) -> tuple[str, dict[int, float]]:
    """Output of the project's MPI programs: `# NAME UNIT` then `BYTES VALUE` lines."""
    unit, series = None, {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "#" and fields[1] == name:
            unit = fields[2]
        elif unit is not None and len(fields) == 2:
            try:
                series[int(fields[0])] = float(fields[1])
            except ValueError:
                continue
    if unit is None or not series:
        raise ParseError(f"{name}: no results in output: {text.strip()[-300:]!r}")
    return unit, series


def parse_connrate(text: str) -> dict[str, Any]:
    """The JSON line of the project's connection-rate client (`ebpfrouter.bench.connrate`)."""
    for line in reversed(text.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "connections" in data:
            return data
    raise ParseError(f"connrate: no JSON result in output: {text.strip()[-200:]!r}")
