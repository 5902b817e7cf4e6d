"""The launch agent Open MPI uses to start its daemons inside testbed pods (`plm_rsh_agent`).

mpirun calls it like ssh: ``AGENT [OPTIONS] HOST COMMAND...``. HOST is the address of a pod or
node of the testbed; the agent enters that netns and runs COMMAND with ``/bin/sh -c`` (ssh
semantics: the words are joined and parsed by the remote shell).

    python3 -m ebpfrouter.bench.mpiagent --id RUN_ID HOST COMMAND...
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..testbed import NETNS_DIR, Testbed, TestbedError, setns_path


def netns_for_host(bed: Testbed, host: str) -> str:
    """The netns of the pod or node whose address (or name) is `host`."""
    for pod in bed.pods:
        if host in (pod.ip, pod.name):
            return pod.netns
    for node in bed.nodes:
        if host in (node.underlay_ip, node.name):
            return node.netns
    raise TestbedError(f"testbed {bed.run_id}: no pod or node has address {host!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Enter the netns of HOST and exec the command; exit code 255 like ssh on failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--id":
        print("usage: mpiagent --id RUN_ID [OPTIONS] HOST COMMAND...", file=sys.stderr)
        return 255
    run_id, args = args[1], args[2:]
    while args and args[0].startswith("-"):  # ssh-style options mpirun may add
        args = args[1:]
    if len(args) < 2:
        print("mpiagent: no host or command given", file=sys.stderr)
        return 255
    host, command = args[0], " ".join(args[1:])
    try:
        setns_path(NETNS_DIR / netns_for_host(Testbed.load(run_id), host))
    except (TestbedError, OSError) as exc:
        print(f"mpiagent: {exc}", file=sys.stderr)
        return 255
    os.execv("/bin/sh", ["/bin/sh", "-c", command])
    return 255  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
