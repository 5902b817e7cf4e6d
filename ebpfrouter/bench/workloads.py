"""The benchmark workloads: what runs where, for how long, and which numbers come out.

Each workload runs one measurement for one mode (`Endpoints`) and returns an `Outcome`:
metric values, the client's error count and the raw tool output (kept in the JSON).
Every workload pauses about a second between opening its connections and timing them
(iperf3 `-O`, sockperf `--pre-warmup-wait`, the MPI programs' settle time), in every mode,
so a router has the chance to move long-lived connections before the clock starts.

An `Outcome` may also say how much work the run did (`work`: bytes moved, requests or
connections completed), so that the CPU time measured around it (`cpu.CpuMeter`) becomes a
cost per GB or per 1,000 requests.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import tempfile
from pathlib import Path

from . import parsers
from .harness import (
    BenchError,
    Endpoints,
    Harness,
    Place,
    kill_in_testbed,
    python_env,
    python_module,
)

MPI_SRC = Path(__file__).resolve().parent / "mpi"


@dataclasses.dataclass(frozen=True)
class Metric:
    """One number a workload reports: name, unit, whether higher is better, message size."""

    name: str
    unit: str
    higher_is_better: bool
    size: int | None = None
    in_table: bool = True


@dataclasses.dataclass
class Outcome:
    """One measurement: metric values by name, client-reported errors, raw outputs, and the
    work done over the whole run (one of `bytes`, `requests`, `connections`; see
    `cpu.UNITS`), empty where no count fits (latency runs, MPI)."""

    values: dict[str, float]
    errors: int = 0
    error_text: str = ""
    raw: dict[str, str] = dataclasses.field(default_factory=dict)
    work: dict[str, float] = dataclasses.field(default_factory=dict)


def _tail(text: str, limit: int = 20000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _raw(name: str, res: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """A client's stdout (and stderr, if any) for the JSON."""
    raw = {name: _tail(res.stdout)}
    if res.stderr.strip():
        raw[f"{name} stderr"] = _tail(res.stderr)
    return raw


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if any(w in line.lower() for w in ("error", "fail", "refused", "reset"))]


class Workload:
    """Base: `key`, `title`, `metrics()`, `tools()` (executables), `prepare()`, `run()`."""

    key = ""
    title = ""
    pods_per_node = 1

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.seconds = 2 if quick else 10

    def params(self) -> dict[str, int | float | str | bool]:
        """The settings of this workload (recorded in the JSON)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, int | float | str | bool)}

    def metrics(self) -> list[Metric]:
        """Every metric this workload reports."""
        raise NotImplementedError

    def tools(self) -> list[str]:
        """Executables it needs."""
        return []

    def prepare(self, h: Harness) -> None:
        """One-time setup before the first run (compile, ...)."""

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        """One measurement in one mode."""
        raise NotImplementedError


class Iperf3(Workload):
    """Throughput with 1 stream and with 4 parallel streams.

    Work: the bytes the clients of both runs sent, warm-up included (`bytes_sent_all`): the
    measured CPU covers both runs from the server's start to its stop."""

    key, title = "iperf3", "iperf3 throughput"
    PORT = 5201

    def metrics(self) -> list[Metric]:
        return [Metric("1 stream", "Gbit/s", True), Metric("4 streams", "Gbit/s", True)]

    def tools(self) -> list[str]:
        return ["iperf3"]

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        seconds = self.seconds
        out = Outcome({})
        with h.server(ep.server.target, ["iperf3", "-s", "-p", str(self.PORT), "-B",
                                         ep.server.address], self.PORT, "iperf3 -s"):
            for name, streams in (("1 stream", 1), ("4 streams", 4)):
                res = h.run(ep.client.target, ["iperf3", "-c", ep.server.address, "-p",
                                               str(self.PORT), "-t", str(seconds), "-O", "1",
                                               "-P", str(streams), "-J"],
                            seconds + 60, "iperf3 -c")
                out.raw[name] = _tail(res.stdout)
                try:
                    parsed = parsers.parse_iperf3(res.stdout)
                except parsers.ParseError as exc:
                    out.errors += 1
                    out.error_text = str(exc)
                    continue
                out.values[name] = parsed["bits_per_second"] / 1e9
                out.work["bytes"] = out.work.get("bytes", 0.0) + parsed["bytes_sent_all"]
        return out


class Sockperf(Workload):
    """TCP ping-pong latency (sockperf reports half the round trip) p50 and p99."""

    key, title = "sockperf", "sockperf TCP ping-pong"
    PORT = 11111

    def metrics(self) -> list[Metric]:
        return [Metric("latency p50", "µs", False), Metric("latency p99", "µs", False)]

    def tools(self) -> list[str]:
        return ["sockperf"]

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        seconds = self.seconds
        addr = ["--tcp", "-i", ep.server.address, "-p", str(self.PORT)]
        with h.server(ep.server.target, ["sockperf", "sr", *addr], self.PORT, "sockperf sr"):
            res = h.run(ep.client.target, ["sockperf", "pp", *addr, "-t", str(seconds),
                                           "--pre-warmup-wait", "1"], seconds + 60,
                        "sockperf pp")
        text = res.stdout + res.stderr
        out = Outcome({}, raw={"sockperf pp": _tail(text)})
        try:
            parsed = parsers.parse_sockperf(text)
        except parsers.ParseError as exc:
            return dataclasses.replace(out, errors=1, error_text=str(exc))
        out.values = {"latency p50": parsed["p50_us"], "latency p99": parsed["p99_us"]}
        out.errors = int(parsed["bad_messages"]) + (res.returncode != 0)
        return out


class Memcached(Workload):
    """memcached driven by memcaslap (libmemcached-tools): ops/s and average latency.

    Work: memcaslap's total operations (gets and sets) as requests."""

    key, title = "memcached", "memcached (memcaslap)"
    PORT = 11211

    def metrics(self) -> list[Metric]:
        return [Metric("throughput", "kops/s", True), Metric("latency avg", "µs", False)]

    def tools(self) -> list[str]:
        return ["memcached", "memcaslap"]

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        seconds = self.seconds
        with h.server(ep.server.target, ["memcached", "-u", "root", "-p", str(self.PORT), "-l",
                                         ep.server.address, "-t", "2", "-c", "1024"],
                      self.PORT, "memcached"):
            res = h.run(ep.client.target, ["memcaslap", "-s",
                                           f"{ep.server.address}:{self.PORT}", "-t",
                                           f"{seconds}s", "-S", f"{seconds}s", "-T", "2",
                                           "-c", "32"], seconds + 60, "memcaslap")
        out = Outcome({}, raw=_raw("memcaslap", res))
        try:
            parsed = parsers.parse_memaslap(res.stdout)
        except parsers.ParseError as exc:
            return dataclasses.replace(out, errors=1, error_text=str(exc))
        out.values = {"throughput": parsed["ops_per_second"] / 1e3,
                      "latency avg": parsed["avg_us"]}
        out.work = {"requests": parsed["ops"]}
        bad = _error_lines(res.stderr)
        out.errors = len(bad) + (res.returncode != 0)
        out.error_text = "; ".join(bad[:3])
        return out


class Redis(Workload):
    """redis-server driven by redis-benchmark with 50 connections: SET and GET requests/s.

    Work: `-n` requests per test that reported (redis-benchmark completes exactly -n)."""

    key, title = "redis", "redis (redis-benchmark, 50 connections)"
    PORT = 6379

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.requests = 20000 if quick else 200000

    def metrics(self) -> list[Metric]:
        return [Metric("SET", "kreq/s", True), Metric("GET", "kreq/s", True),
                Metric("GET latency p50", "ms", False)]

    def tools(self) -> list[str]:
        return ["redis-server", "redis-benchmark"]

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        requests = self.requests
        srv = ["redis-server", "--port", str(self.PORT), "--bind", ep.server.address,
               "--protected-mode", "no", "--save", "", "--appendonly", "no"]
        with h.server(ep.server.target, srv, self.PORT, "redis-server"):
            # keep-alive connections: open, pause for the router, then the timed requests
            res = h.run(ep.client.target, ["redis-benchmark", "-h", ep.server.address, "-p",
                                           str(self.PORT), "-c", "50", "-n", str(requests),
                                           "-t", "set,get", "--csv"], 300, "redis-benchmark")
        out = Outcome({}, raw=_raw("redis-benchmark", res))
        try:
            parsed = parsers.parse_redis_benchmark(res.stdout)
            out.values = {"SET": parsed["SET"]["rps"] / 1e3, "GET": parsed["GET"]["rps"] / 1e3,
                          "GET latency p50": parsed["GET"]["p50_latency_ms"]}
            out.work = {"requests": float(requests * len(parsed))}
        except (parsers.ParseError, KeyError) as exc:
            return dataclasses.replace(out, errors=1, error_text=f"redis-benchmark: {exc}")
        bad = _error_lines(res.stderr)
        out.errors = len(bad) + (res.returncode != 0)
        out.error_text = "; ".join(bad[:3])
        return out


class Connect(Workload):
    """Short connections (this project's `connrate` generator): setup rate and latency.

    Work: the connections completed."""

    key, title = "connect", "connection setup (short connections)"
    PORT = 7100

    def metrics(self) -> list[Metric]:
        return [Metric("rate", "conn/s", True), Metric("latency p50", "µs", False),
                Metric("latency p99", "µs", False)]

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        seconds = self.seconds
        mod = "ebpfrouter.bench.connrate"
        with h.server(ep.server.target, python_module(mod, "serve", str(self.PORT)),
                      self.PORT, "connrate serve"):
            res = h.run(ep.client.target, python_module(mod, "client", ep.server.address,
                                                         str(self.PORT), str(seconds)),
                        seconds + 60, "connrate client")
        out = Outcome({}, raw={"connrate": _tail(res.stdout + res.stderr)})
        try:
            parsed = parsers.parse_connrate(res.stdout)
        except parsers.ParseError as exc:
            return dataclasses.replace(out, errors=1, error_text=str(exc))
        out.values = {"rate": parsed["per_second"], "latency p50": parsed["p50_us"],
                      "latency p99": parsed["p99_us"]}
        out.errors = int(parsed["errors"])
        out.error_text = parsed.get("first_error", "")
        out.work = {"connections": float(parsed["connections"])}
        return out


class Mpi(Workload):
    """OSU-style MPI programs of this project (bench/mpi/*.c), Open MPI over TCP, ranks in pods.

    mpirun runs inside the first place (pod or node) and starts its daemons in the others
    through `ebpfrouter.bench.mpiagent` (`plm_rsh_agent`), which enters the target netns.
    """

    program = ""
    unit = ""
    higher = False
    iteration_divisor = 1  # mpibw sends a window of 64 messages per iteration

    def __init__(self, quick: bool) -> None:
        super().__init__(quick)
        self.max_bytes = (1 << 16) if quick else (1 << 20)
        self.iterations = (100 if quick else 1000) // self.iteration_divisor
        self.bindir: Path | None = None

    def sizes(self) -> list[int]:
        """Message sizes measured: powers of two up to the maximum."""
        return [1 << i for i in range(self.max_bytes.bit_length())]

    def metrics(self) -> list[Metric]:
        shown = {1, 8, 1024, 65536, 1 << 20}
        return [Metric(f"{_size(s)}", self.unit, self.higher, size=s, in_table=s in shown)
                for s in self.sizes()]

    def tools(self) -> list[str]:
        return ["mpirun", "mpicc", "gcc"]  # mpicc wraps gcc, which libopenmpi-dev lacks

    def prepare(self, h: Harness) -> None:
        self.bindir = Path(tempfile.mkdtemp(prefix="mpi-", dir=h.workdir))
        res = _run_local(["mpicc", "-O2", "-o", str(self.bindir / self.program),
                          str(MPI_SRC / f"{self.program}.c")])
        if res.returncode != 0:
            raise BenchError(f"{self.key}: mpicc failed: {res.stderr.strip()[-400:]}")
        agent = h.workdir / "mpiagent.sh"
        if not agent.exists():
            cmd = shlex.join(python_module("ebpfrouter.bench.mpiagent", "--id", h.bed.run_id))
            agent.write_text(f"#!/bin/sh\nexport PYTHONPATH={shlex.quote(_pythonpath())}\n"
                             f"exec {cmd} \"$@\"\n")
            agent.chmod(0o755)

    def run(self, h: Harness, ep: Endpoints) -> Outcome:
        assert self.bindir is not None, "prepare() first"
        if ep.mode == "host":
            places = [Place(n.name, n.underlay_ip) for n in h.bed.nodes[:2]]
            slots = self.pods_per_node
        else:
            places, slots = [], 1
            for node in h.bed.nodes[:2]:
                pods = [p for p in h.bed.pods if p.node == node.name][: self.pods_per_node]
                if len(pods) < self.pods_per_node:
                    raise BenchError(f"{self.key}: {node.name} has {len(pods)} pods, "
                                     f"needs {self.pods_per_node}")
                places += [Place(p.name, p.ip) for p in pods]
        # mpirun (and rank 0) in the first place; ranks fill places in hostfile order
        hostfile = h.workdir / f"hosts-{self.key}-{ep.mode}"
        hostfile.write_text("".join(f"{p.address} slots={slots}\n" for p in places))
        nranks = len(places) * slots
        argv = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nranks),
                "--hostfile", str(hostfile), "--mca", "plm_rsh_agent",
                str(h.workdir / "mpiagent.sh"), "--mca", "btl", "tcp,self",
                "--mca", "btl_tcp_if_include", "eth0", "--mca", "oob_tcp_if_include", "eth0",
                "--mca", "mpi_yield_when_idle", "1",
                str(self.bindir / self.program), str(self.max_bytes), str(self.iterations), "1"]
        try:
            res = h.run(places[0].target, argv, 30 if self.quick else 180,
                        f"mpirun {self.program}")
        finally:  # a hung or killed run leaves orted and ranks behind in the other pods
            kill_in_testbed(h.bed, {"mpirun", "orted", self.program})
        out = Outcome({}, raw={"mpirun": _tail(res.stdout + res.stderr)})
        try:
            _, series = parsers.parse_mpi(res.stdout, self.program)
        except parsers.ParseError as exc:
            return dataclasses.replace(out, errors=1, error_text=f"{exc} {res.stderr[-300:]}")
        out.values = {_size(s): v for s, v in series.items()}
        out.errors = int(res.returncode != 0)
        if res.returncode != 0:
            out.error_text = f"mpirun exited with {res.returncode}: {res.stderr.strip()[-300:]}"
        return out


class MpiLat(Mpi):
    """MPI point-to-point latency over message sizes (2 ranks, one per node)."""

    key, title, program, unit, higher = "mpilat", "MPI p2p latency", "mpilat", "µs", False


class MpiBw(Mpi):
    """MPI point-to-point bandwidth over message sizes (2 ranks, one per node)."""

    key, title, program, unit, higher = "mpibw", "MPI p2p bandwidth", "mpibw", "MB/s", True
    iteration_divisor = 10


class MpiAll(Mpi):
    """MPI all-to-all latency over message sizes (4 ranks, two per node)."""

    key, title, program, unit, higher = "mpiall", "MPI all-to-all latency", "mpiall", "µs", False
    pods_per_node = 2


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def _pythonpath() -> str:
    return python_env()["PYTHONPATH"]


def _run_local(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise BenchError(f"{argv[0]} is not installed") from None


WORKLOADS: dict[str, type[Workload]] = {
    w.key: w for w in (Iperf3, Sockperf, MpiLat, MpiBw, MpiAll, Memcached, Redis, Connect)
}
