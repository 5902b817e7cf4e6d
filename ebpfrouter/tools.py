"""The Debian tools that commands run: which are missing, and the one line that installs them.

Commands ask before they start (before a testbed is built), so a missing tool costs a
message, never a run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable

#: executable -> the Debian package that carries it
DEBIAN_PACKAGES = {
    "iperf3": "iperf3", "sockperf": "sockperf", "redis-server": "redis-server",
    "redis-benchmark": "redis-tools", "memcached": "memcached",
    "memcaslap": "libmemcached-tools", "mpirun": "openmpi-bin", "mpicc": "libopenmpi-dev",
    "gcc": "gcc", "wrk": "wrk", "nginx": "nginx-light", "setpriv": "util-linux",
    "postgres": "postgresql", "initdb": "postgresql", "pgbench": "postgresql",
    "psql": "postgresql", "prometheus": "prometheus", "promtool": "prometheus",
}


def missing(tools: Iterable[str]) -> list[str]:
    """The tools of `tools` not on PATH, in order, each once."""
    return [t for t in dict.fromkeys(tools) if shutil.which(t) is None]


def install_line(tools: Iterable[str]) -> str:
    """`apt-get install ...` for the packages carrying `tools` (each package once)."""
    packages = dict.fromkeys(DEBIAN_PACKAGES.get(t, t) for t in tools)
    return "apt-get install " + " ".join(packages)


def describe_missing(tools: Iterable[str]) -> str:
    """'wrk (wrk), memcaslap (libmemcached-tools); install them with: apt-get install ...'."""
    tools = list(dict.fromkeys(tools))
    named = ", ".join(f"{t} ({DEBIAN_PACKAGES.get(t, t)})" for t in tools)
    return f"{named}; install {'it' if len(tools) == 1 else 'them'} with: {install_line(tools)}"
