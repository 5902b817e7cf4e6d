"""What the numbers were measured on: CPU, cores, kernel, tool versions."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from .cpu import accounting

VERSION_COMMANDS: dict[str, list[str]] = {
    "iperf3": ["iperf3", "--version"],
    "sockperf": ["sockperf", "--version"],
    "redis-server": ["redis-server", "--version"],
    "redis-benchmark": ["redis-benchmark", "--version"],
    "memcached": ["memcached", "-V"],
    "memcaslap": ["memcaslap", "-V"],
    "openmpi": ["mpirun", "--version"],
    "mpicc": ["mpicc", "--version"],
}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the machine type)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "cpu model", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def tool_version(argv: list[str]) -> str | None:
    """First non-empty line of a tool's version output; None if it is not installed."""
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", res.stdout + "\n" + res.stderr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else None


SOURCE_ROOT = Path(__file__).resolve().parents[2]


def source_info(root: Path = SOURCE_ROOT) -> dict[str, Any]:
    """The git commit of the code that ran, and files that differed from it (routers run
    from the work tree, so uncommitted changes count)."""
    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=10)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return None
        return res.stdout.rstrip() if res.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "ebpfrouter",
                 "injector", "bpf_asm")
    commit = git("rev-parse", "HEAD")
    return {"commit": commit.strip() if commit else None,
            "modified": [line[3:] for line in (status or "").splitlines()]}


def machine_info() -> dict[str, Any]:
    """CPU model, cores, kernel release, how it accounts CPU time, Python and tool
    versions."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_accounting": accounting(),
        "python": platform.python_version(),
        "versions": {name: tool_version(argv) for name, argv in VERSION_COMMANDS.items()},
        "source": source_info(),
    }
