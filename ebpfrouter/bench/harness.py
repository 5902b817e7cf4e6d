"""The bench's hands on the testbed: where each mode runs, servers in pods, client runs,
and the routers (started with the demo's `Routers`, one `ebpf-router run` per node)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from injector.netns import netns_inode as pid_netns_inode

from ..demo import Routers
from ..testbed import Testbed, netns_inode
from .cpu import process_times

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
MODES = ("overlay", "bypass", "host")


class BenchError(RuntimeError):
    """A benchmark step failed; the message names the tool, pod or step."""


@dataclasses.dataclass
class Place:
    """One rank/endpoint: a testbed target (pod or node name) and its address."""

    target: str
    address: str


@dataclasses.dataclass
class Endpoints:
    """Where a mode runs: server on the first node, client on the second."""

    mode: str
    server: Place
    client: Place


def python_env() -> dict[str, str]:
    """The environment for this package's helpers run inside pods."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + (os.pathsep + env["PYTHONPATH"]
                                             if env.get("PYTHONPATH") else "")
    return env


def python_module(module: str, *args: str) -> list[str]:
    """argv running `python -m module args` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Harness:
    """Runs things in a testbed's pods and nodes; `endpoints(mode)` says which."""

    def __init__(self, bed: Testbed, workdir: Path, quick: bool) -> None:
        self.bed = bed
        self.workdir = workdir
        self.quick = quick

    def endpoints(self, mode: str) -> Endpoints:
        """Server on node 1, client on node 2: pods for overlay/bypass, nodes for host."""
        first, second = self.bed.nodes[0], self.bed.nodes[1]
        if mode == "host":
            return Endpoints(mode, Place(first.name, first.underlay_ip),
                             Place(second.name, second.underlay_ip))
        server = next(p for p in self.bed.pods if p.node == first.name)
        client = next(p for p in self.bed.pods if p.node == second.name)
        return Endpoints(mode, Place(server.name, server.ip), Place(client.name, client.ip))

    def run(self, target: str, argv: Sequence[str], timeout: float,
            what: str) -> subprocess.CompletedProcess[str]:
        """Run a client to completion in `target`; output captured; timeouts name the step."""
        try:
            return self.bed.run(target, argv, timeout=timeout, env=python_env(),
                                cwd=str(PACKAGE_ROOT))
        except subprocess.TimeoutExpired:
            raise BenchError(f"{what} in {target}: no result after {timeout:.0f}s") from None
        except FileNotFoundError:
            raise BenchError(f"{what} in {target}: {argv[0]} not found") from None

    @contextlib.contextmanager
    def server(self, target: str, argv: Sequence[str], port: int,
               what: str) -> Iterator[subprocess.Popen[str]]:
        """Start a server in `target`, wait until `port` listens there, stop it afterwards."""
        log = open(self.workdir / f"{what.split()[0]}-{target}.log", "w")  # noqa: SIM115
        try:
            proc = self.bed.popen(target, argv, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, env=python_env(),
                                  cwd=str(PACKAGE_ROOT))
        except FileNotFoundError:
            log.close()
            raise BenchError(f"{what} in {target}: {argv[0]} not found") from None
        try:
            self.wait_listen(target, port, proc, what)
            yield proc
        finally:
            stop_process(proc)
            log.close()

    def wait_listen(self, target: str, port: int, proc: subprocess.Popen[Any] | None,
                    what: str, timeout: float = 15.0) -> None:
        """Wait until something in `target` is in LISTEN on `port` (no probe connection)."""
        want = f":{port:04X}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"{what} in {target} exited with {proc.returncode} "
                                 f"(log in {self.workdir})")
            out = self.bed.run(target, ["cat", "/proc/net/tcp"]).stdout
            for line in out.splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":
                    return
            time.sleep(0.05)
        raise BenchError(f"{what} in {target}: nothing listens on port {port} after {timeout}s")


def kill_in_testbed(bed: Testbed, names: set[str]) -> list[int]:
    """SIGKILL processes named `names` (comm) inside the testbed's namespaces: what a hung
    or timed-out client (mpirun's daemons and ranks) left behind. Returns their pids."""
    inodes = set()
    for ns in bed.all_netns():
        with contextlib.suppress(OSError):
            inodes.add(netns_inode(ns))
    killed = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
            if comm in names and pid_netns_inode(entry) in inodes:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
        except OSError:
            continue
    return killed


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), seconds; None once it is gone."""
    times = process_times(pid)
    return None if times is None else times.user + times.system


class RouterSet:
    """The routers of one bench run (the demo's `Routers`), with counters and CPU time."""

    COUNTERS = ("seen", "bypassed", "bypassed_client", "failed", "pending")

    def __init__(self, bed: Testbed, workdir: Path, rule_files: Sequence[Path] = (),
                 loglevel: str = "WARNING") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.routers = Routers(bed, workdir, loglevel=loglevel)
        self.bed = bed
        self.group = ""
        rules = workdir / "rules"
        rules.mkdir(exist_ok=True)
        for path in rule_files:
            shutil.copy(path, rules / Path(path).name)

    def start(self) -> None:
        """Start one router per node; a router that fails names its node and log."""
        try:
            self.routers.start(timeout=30)
        except Exception as exc:  # the demo raises DemoError naming the node
            raise BenchError(f"routers: {exc}") from None

    def pids(self) -> list[int]:
        """The router processes' pids (their threads and guardians are found under them)."""
        return [p.pid for p in self.routers.procs.values() if p.poll() is None]

    def alive(self) -> list[str]:
        """Nodes whose router has exited."""
        return [n for n, p in self.routers.procs.items() if p.poll() is not None]

    def snapshot(self) -> dict[str, Any]:
        """Summed counters and CPU seconds of every router right now."""
        counters = dict.fromkeys(self.COUNTERS, 0)
        cpu = 0.0
        errors = []
        for node in self.bed.nodes:
            proc = self.routers.procs.get(node.name)
            if proc is None:
                continue
            try:
                status = self.routers.status(node.name)
                for key in self.COUNTERS:
                    counters[key] += int(status.get("counters", {}).get(key, 0) or 0)
            except Exception as exc:  # noqa: BLE001 - reported in the sample
                errors.append(f"{node.name}: status failed: {exc}")
            cpu += cpu_seconds(proc.pid) or 0.0
        return {"counters": counters, "cpu_s": cpu, "errors": errors}

    def statuses(self) -> dict[str, Any]:
        """Full status of every router (for the JSON)."""
        out = {}
        for node in self.bed.nodes:
            try:
                out[node.name] = self.routers.status(node.name)
            except Exception as exc:  # noqa: BLE001
                out[node.name] = {"error": str(exc)}
        return out

    def stop(self) -> dict[str, int | None]:
        """Stop every router (SIGTERM, kill after 10 s)."""
        return self.routers.stop()
