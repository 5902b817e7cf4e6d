"""A local multi-node cluster in network namespaces: underlay, per-node bridge and pods, VXLAN.

Layout for run id R (names unique per run, all starting with `ebtb`)::

    R-ul                  underlay netns: bridge br0 joining every node's eth0
    R-n<i>  (node<i>)     eth0 192.168.77.<i>/24, cni0 10.244.<i>.1/24, flannel.1 (VXLAN 1,
                          port 8472, MTU 1450) with a route, neighbour and FDB entry per remote
                          node, exactly as flannel's vxlan backend sets them up
    R-n<i>p<j> (n<i>p<j>) pod: eth0 10.244.<i>.<j+2>/24 on the node's cni0, default via cni0

A state file (/run/ebpf-router/testbed-R.json) is written *before* anything is created and
lists every name, so `down` (or `down --all` after a crash) can remove everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

from injector.netns import in_netns, setns_path
from injector.netns import netns_inode as netns_inode_of

from .podmeta import PodInfo, StaticPodMetadata

log = logging.getLogger(__name__)

PREFIX = "ebtb"
STATE_DIR = Path("/run/ebpf-router")
NETNS_DIR = Path("/run/netns")
UNDERLAY_NET = "192.168.77"
POD_NET = "10.244"
VXLAN_ID = 1
VXLAN_PORT = 8472
VXLAN_MTU = 1450
RUN_ID_RE = re.compile(rf"^{PREFIX}[0-9a-f]{{6}}$")


class TestbedError(RuntimeError):
    """Building, finding or tearing down a testbed failed; the message names the object."""

    __test__ = False  # not a pytest class


def netns_context(name: str) -> contextlib.AbstractContextManager[None]:
    """Run the calling *thread* in netns `name` (sockets created inside stay there)."""
    return in_netns(NETNS_DIR / name)


def netns_inode(name: str) -> int:
    """Inode of the named netns (what /proc/PID/ns/net of its processes shows)."""
    return os.stat(NETNS_DIR / name).st_ino


def _write_sysctl(ns: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> inside netns `ns` (in a forked child: /proc/sys/net is per netns)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            setns_path(NETNS_DIR / ns)
            Path("/proc/sys", key.replace(".", "/")).write_text(value)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise TestbedError(f"netns {ns}: cannot set sysctl {key}={value}")


@dataclasses.dataclass
class Node:
    """One node: its netns, underlay address, pod subnet and VTEP MAC."""

    index: int
    name: str
    netns: str
    underlay_ip: str
    pod_cidr: str
    bridge_ip: str
    vtep_mac: str


@dataclasses.dataclass
class Pod:
    """One pod on a node."""

    name: str
    node: str
    netns: str
    ip: str
    labels: dict[str, str]


def _plan(run_id: str, nodes: int, pods_per_node: int) -> tuple[list[Node], list[Pod]]:
    node_list, pod_list = [], []
    for i in range(1, nodes + 1):
        node_list.append(Node(
            index=i, name=f"node{i}", netns=f"{run_id}-n{i}", underlay_ip=f"{UNDERLAY_NET}.{i}",
            pod_cidr=f"{POD_NET}.{i}.0/24", bridge_ip=f"{POD_NET}.{i}.1",
            vtep_mac=f"02:eb:7b:00:{i:02x}:01",
        ))
        for j in range(pods_per_node):
            pod_list.append(Pod(
                name=f"n{i}p{j}", node=f"node{i}", netns=f"{run_id}-n{i}p{j}",
                ip=f"{POD_NET}.{i}.{j + 2}", labels={"app": f"app{j}", "node": f"node{i}"},
            ))
    return node_list, pod_list


class Testbed:
    """A running (or half-built) testbed, described by its state file."""

    __test__ = False  # not a pytest class

    def __init__(self, run_id: str, nodes: list[Node], pods: list[Pod],
                 state_dir: Path = STATE_DIR, owner_pid: int | None = None,
                 complete: bool = False, builder_pid: int | None = None) -> None:
        self.run_id = run_id
        self.builder_pid = builder_pid
        self.nodes = nodes
        self.pods = pods
        self.state_dir = Path(state_dir)
        self.owner_pid = owner_pid
        self.complete = complete

    # -- names and files ---------------------------------------------------------------------

    @property
    def underlay_netns(self) -> str:
        """The netns holding the underlay bridge."""
        return f"{self.run_id}-ul"

    @property
    def state_path(self) -> Path:
        """Where this run is recorded."""
        return self.state_dir / f"testbed-{self.run_id}.json"

    @property
    def metadata_path(self) -> Path:
        """The pod metadata file (`StaticPodMetadata` JSON) for routers on this testbed."""
        return self.state_dir / f"testbed-{self.run_id}-pods.json"

    def all_netns(self) -> list[str]:
        """Every namespace this run creates."""
        return [self.underlay_netns] + [n.netns for n in self.nodes] + [p.netns for p in self.pods]

    def root_links(self) -> list[str]:
        """Temporary link names this run may create in the root netns."""
        count = len(self.nodes) + len(self.pods)
        return [f"{self.run_id}{k}{side}" for k in range(count) for side in "ab"]

    def node(self, name: str) -> Node:
        """A node by name (`node1`) or netns."""
        for node in self.nodes:
            if name in (node.name, node.netns):
                return node
        raise TestbedError(f"testbed {self.run_id}: no node {name!r}")

    def pod(self, name: str) -> Pod:
        """A pod by name (`n1p0`) or netns."""
        for pod in self.pods:
            if name in (pod.name, pod.netns):
                return pod
        raise TestbedError(f"testbed {self.run_id}: no pod {name!r}")

    def netns_of(self, target: str) -> str:
        """The netns of a pod, a node, `underlay`, or a netns name of this run."""
        if target == "underlay":
            return self.underlay_netns
        items: list[Pod | Node] = [*self.pods, *self.nodes]
        for item in items:
            if target in (item.name, item.netns):
                return item.netns
        raise TestbedError(f"testbed {self.run_id}: no pod or node {target!r} "
                           f"(pods: {', '.join(p.name for p in self.pods)}; "
                           f"nodes: {', '.join(n.name for n in self.nodes)})")

    def to_json(self) -> dict[str, Any]:
        """The state file contents."""
        return {
            "id": self.run_id, "owner_pid": self.owner_pid, "complete": self.complete,
            "builder_pid": self.builder_pid,
            "netns": self.all_netns(), "root_links": self.root_links(),
            "nodes": [dataclasses.asdict(n) for n in self.nodes],
            "pods": [dataclasses.asdict(p) for p in self.pods],
            "metadata": str(self.metadata_path),
        }

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, run_id: str, state_dir: Path = STATE_DIR) -> Testbed:
        """Read a run's state file."""
        path = Path(state_dir) / f"testbed-{run_id}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TestbedError(f"testbed {run_id}: cannot read {path}: {exc}") from None
        return cls(data["id"], [Node(**n) for n in data["nodes"]],
                   [Pod(**p) for p in data["pods"]], Path(state_dir), data.get("owner_pid"),
                   bool(data.get("complete")), data.get("builder_pid"))

    # -- up ----------------------------------------------------------------------------------

    @classmethod
    def up(cls, nodes: int = 2, pods_per_node: int = 1, run_id: str | None = None,
           state_dir: Path = STATE_DIR, detached: bool = False) -> Testbed:
        """Build a testbed; on failure everything built so far is removed again.

        `detached` records no owner process (the CLI's `up`): `down --all` may remove it.
        """
        if not 1 <= nodes <= 200 or not 0 <= pods_per_node <= 200:
            raise TestbedError(f"testbed: bad size nodes={nodes} pods_per_node={pods_per_node}")
        run_id = run_id or PREFIX + uuid.uuid4().hex[:6]
        if not RUN_ID_RE.match(run_id):
            raise TestbedError(f"testbed: run id {run_id!r} must look like {PREFIX}xxxxxx")
        node_list, pod_list = _plan(run_id, nodes, pods_per_node)
        bed = cls(run_id, node_list, pod_list, state_dir, None if detached else os.getpid(),
                  builder_pid=os.getpid())
        if bed.state_path.exists():
            raise TestbedError(f"testbed {run_id} already exists ({bed.state_path})")
        bed._save()  # first: so a crash at any later point leaves a record of every name
        try:
            bed._build()
        except BaseException:
            bed.down()
            raise
        bed.complete = True
        bed._save()
        bed.pod_metadata().write(bed.metadata_path)
        return bed

    def _build(self) -> None:
        for name in self.all_netns():
            netns.create(name)
            _write_sysctl(name, "net.ipv6.conf.all.disable_ipv6", "1")
        with contextlib.ExitStack() as stack:
            handles = {n: stack.enter_context(NetNS(n, flags=0)) for n in self.all_netns()}
            root = stack.enter_context(IPRoute())
            for ipr in handles.values():
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ul = handles[self.underlay_netns]
            ul.link("add", ifname="br0", kind="bridge")
            br0 = ul.link_lookup(ifname="br0")[0]
            ul.link("set", index=br0, state="up")
            temps = iter(self.root_links())
            for node in self.nodes:
                ipr = handles[node.netns]
                self._veth(root, next(temps), next(temps), ipr, node.netns, "eth0",
                           ul, self.underlay_netns, f"n{node.index}", master=br0)
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=node.underlay_ip, prefixlen=24)
                ipr.link("add", ifname="cni0", kind="bridge")
                cni0 = ipr.link_lookup(ifname="cni0")[0]
                ipr.link("set", index=cni0, mtu=VXLAN_MTU, state="up")
                ipr.addr("add", index=cni0, address=node.bridge_ip, prefixlen=24)
                _write_sysctl(node.netns, "net.ipv4.ip_forward", "1")
                ipr.link("add", ifname="flannel.1", kind="vxlan", vxlan_id=VXLAN_ID,
                         vxlan_local=node.underlay_ip, vxlan_port=VXLAN_PORT,
                         vxlan_link=eth0, vxlan_learning=0, address=node.vtep_mac)
                vx = ipr.link_lookup(ifname="flannel.1")[0]
                ipr.link("set", index=vx, mtu=VXLAN_MTU, state="up")
                ipr.addr("add", index=vx, address=f"{POD_NET}.{node.index}.0", prefixlen=32)
                for j, pod in enumerate(p for p in self.pods if p.node == node.name):
                    pns = handles[pod.netns]
                    self._veth(root, next(temps), next(temps), pns, pod.netns, "eth0",
                               ipr, node.netns, f"veth{j}", master=cni0, mtu=VXLAN_MTU)
                    peth = pns.link_lookup(ifname="eth0")[0]
                    pns.addr("add", index=peth, address=pod.ip, prefixlen=24)
                    pns.route("add", dst="0.0.0.0/0", gateway=node.bridge_ip)
            for node in self.nodes:  # flannel: route, neighbour and FDB entry per remote node
                ipr = handles[node.netns]
                vx = ipr.link_lookup(ifname="flannel.1")[0]
                for other in self.nodes:
                    if other is node:
                        continue
                    vtep = f"{POD_NET}.{other.index}.0"
                    ipr.neigh("add", ifindex=vx, dst=vtep, lladdr=other.vtep_mac, state=0x80)
                    ipr.fdb("append", ifindex=vx, lladdr=other.vtep_mac, dst=other.underlay_ip)
                    ipr.route("add", dst=other.pod_cidr, gateway=vtep, oif=vx, flags=4)  # onlink

    @staticmethod
    def _veth(root: IPRoute, tmp_a: str, tmp_b: str, ipr_a: Any, ns_a: str, name_a: str,
              ipr_b: Any, ns_b: str, name_b: str, master: int | None = None,
              mtu: int = 1500) -> None:
        """A veth pair: end A named `name_a` in `ns_a`, end B `name_b` in `ns_b` (on `master`)."""
        root.link("add", ifname=tmp_a, kind="veth", peer=tmp_b)
        root.link("set", index=root.link_lookup(ifname=tmp_a)[0], net_ns_fd=ns_a)
        root.link("set", index=root.link_lookup(ifname=tmp_b)[0], net_ns_fd=ns_b)
        for ipr, tmp, name, extra in ((ipr_a, tmp_a, name_a, {}),
                                      (ipr_b, tmp_b, name_b, {"master": master} if master else {})):
            index = ipr.link_lookup(ifname=tmp)[0]
            ipr.link("set", index=index, ifname=name, mtu=mtu, **extra)
            ipr.link("set", index=index, state="up")

    # -- use ---------------------------------------------------------------------------------

    def pod_metadata(self) -> StaticPodMetadata:
        """Pod metadata for routers: pods mapped to their netns inodes."""
        pods = []
        for pod in self.pods:
            try:
                inode: int | None = netns_inode(pod.netns)
            except OSError:
                inode = None
            pods.append(PodInfo(name=pod.name, namespace="default", uid=pod.netns, ip=pod.ip,
                                node=pod.node, labels=dict(pod.labels), netns_inode=inode,
                                container_labels={"io.kubernetes.container.name": pod.name}))
        return StaticPodMetadata(pods)

    def popen(self, target: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside the netns of a pod or node (setns in the child before exec)."""
        path = NETNS_DIR / self.netns_of(target)
        return subprocess.Popen(list(argv), preexec_fn=lambda: setns_path(path), **kwargs)

    def run(self, target: str, argv: Sequence[str], timeout: float = 60,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run `argv` to completion inside a pod or node; output captured as text."""
        path = NETNS_DIR / self.netns_of(target)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(list(argv), preexec_fn=lambda: setns_path(path), timeout=timeout,
                              **kwargs)

    def link_stats(self, target: str, ifname: str) -> dict[str, int]:
        """rx/tx byte and packet counters of `ifname` inside a pod or node."""
        with NetNS(self.netns_of(target), flags=0) as ipr:
            (link,) = ipr.link("get", index=ipr.link_lookup(ifname=ifname)[0])
            stats = link.get("IFLA_STATS64") or link.get("IFLA_STATS")
            return {k: int(stats[k]) for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}

    # -- down --------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Kill processes left in our namespaces, remove namespaces, links and files."""
        removed = _kill_and_remove(self.all_netns(), self.root_links())
        for path in (self.metadata_path, self.state_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return removed

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def _pids_in_netns(inodes: set[int]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if netns_inode_of(entry) in inodes:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_and_remove(names: Sequence[str], links: Sequence[str]) -> list[str]:
    existing = set(netns.listnetns())
    names = [n for n in names if n in existing]
    inodes = set()
    for name in names:
        with contextlib.suppress(OSError):
            inodes.add(netns_inode(name))
    if inodes:
        pids = _pids_in_netns(inodes)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _running(p)]
            time.sleep(0.02)
    removed = []
    for name in names:
        try:
            netns.remove(name)
            removed.append(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("testbed: cannot remove netns %s: %s", name, exc)
    if links:
        with IPRoute() as root:
            for link in links:
                for index in root.link_lookup(ifname=link):
                    with contextlib.suppress(Exception):
                        root.link("del", index=index)
                        removed.append(link)
    return removed


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(state_dir: Path = STATE_DIR) -> list[Testbed]:
    """Every recorded testbed."""
    runs = []
    for path in sorted(Path(state_dir).glob(f"testbed-{PREFIX}*.json")):
        if path.name.endswith("-pods.json"):
            continue
        with contextlib.suppress(TestbedError, KeyError, TypeError):
            runs.append(Testbed.load(path.name[len("testbed-"):-len(".json")], state_dir))
    return runs


def down_all(state_dir: Path = STATE_DIR, include_detached: bool = True) -> list[str]:
    """Remove every testbed not held by a live process, and unrecorded leftovers.

    Spared: runs whose owner (the process that built them in-process: tests, demo) lives, and
    runs still being built. Removed: runs whose owner or builder died (crashed mid-`up`) and,
    with `include_detached`, complete CLI-built runs.
    """
    removed: list[str] = []
    protected: set[str] = set()
    for bed in list_runs(state_dir):
        me = os.getpid()
        owned = _alive(bed.owner_pid) and bed.owner_pid != me
        building = not bed.complete and _alive(bed.builder_pid) and bed.builder_pid != me
        detached_kept = bed.complete and bed.owner_pid is None and not include_detached
        if owned or building or detached_kept:
            protected.update(bed.all_netns())
            continue
        removed += bed.down()
    leftovers = [n for n in netns.listnetns()
                 if n.startswith(PREFIX) and RUN_ID_RE.match(n.split("-")[0])
                 and n not in protected]
    protected_ids = {n.split("-")[0] for n in protected}
    with IPRoute() as root:
        links = [link.get_attr("IFLA_IFNAME") for link in root.get_links()]
    stray_links = [name for name in links if name and name.startswith(PREFIX)
                   and name[: len(PREFIX) + 6] not in protected_ids]
    removed += _kill_and_remove(leftovers, stray_links)
    return removed


# -- command line ----------------------------------------------------------------------------


def add_testbed_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `testbed up|down|exec|list` to the CLI; the handler is `args.func(args) -> int`."""
    parser = subparsers.add_parser("testbed", help="local multi-node VXLAN testbed")
    _fill_parser(parser)
    return parser


def _fill_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="testbed_command", required=True)
    up = sub.add_parser("up", help="build a testbed")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--pods-per-node", type=int, default=1)
    up.add_argument("--id", dest="run_id", help=f"run id ({PREFIX} + 6 hex digits)")
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    down = sub.add_parser("down", help="remove a testbed")
    which = down.add_mutually_exclusive_group()
    which.add_argument("--id", dest="run_id")
    which.add_argument("--all", action="store_true", help="every testbed and leftover")
    ex = sub.add_parser("exec", help="run a command in a pod or node")
    ex.add_argument("--id", dest="run_id")
    ex.add_argument("target", help="pod (n1p0), node (node1) or underlay")
    ex.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("list", help="list testbeds")
    parser.set_defaults(func=run_testbed_command)


def _only_run(run_id: str | None) -> Testbed:
    if run_id:
        return Testbed.load(run_id)
    runs = list_runs()
    if len(runs) != 1:
        raise TestbedError(f"{len(runs)} testbeds exist ({', '.join(r.run_id for r in runs)}); "
                           "pick one with --id")
    return runs[0]


def run_testbed_command(args: argparse.Namespace) -> int:
    """Execute a parsed `testbed` subcommand."""
    try:
        if args.testbed_command == "up":
            bed = Testbed.up(args.nodes, args.pods_per_node, args.run_id, detached=True)
            if args.json:
                print(json.dumps(bed.to_json(), indent=2))
            else:
                print(f"testbed {bed.run_id} up (state {bed.state_path})")
                for node in bed.nodes:
                    print(f"  {node.name:8} underlay {node.underlay_ip:15} pods {node.pod_cidr}")
                for pod in bed.pods:
                    print(f"  {pod.name:8} on {pod.node:8} {pod.ip}")
            return 0
        if args.testbed_command == "down":
            removed = down_all() if args.all else _only_run(args.run_id).down()
            print(f"removed {len(removed)} namespaces/links")
            return 0
        if args.testbed_command == "list":
            for bed in list_runs():
                state = "complete" if bed.complete else "incomplete"
                print(f"{bed.run_id} {len(bed.nodes)} nodes {len(bed.pods)} pods {state}")
            return 0
        if args.testbed_command == "exec":
            argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not argv:
                raise TestbedError("exec: no command given")
            bed = _only_run(args.run_id)
            try:
                return bed.popen(args.target, argv).wait()
            except FileNotFoundError:
                raise TestbedError(f"exec: command not found: {argv[0]}") from None
    except TestbedError as exc:
        print(f"ebpf-router testbed: {exc}", file=sys.stderr)
        return 1
    return 2


def main_testbed(argv: Sequence[str] | None = None) -> int:
    """Entry for `ebpf-router testbed ARGV...` (also `python -m ebpfrouter.testbed ARGV...`)."""
    parser = argparse.ArgumentParser(prog="ebpf-router testbed", description=__doc__.split("\n")[0])
    _fill_parser(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main_testbed())
