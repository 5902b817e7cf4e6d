"""What a daemon finds out before it serves, step by step; each failure is a `StartupError`
naming the interface, file or API (the daemon reports it as `DaemonError`).

This node's host address, pod CIDRs and overlay peers (`discover_node`); the rule files and
pod metadata (`load_policy`); the network namespaces of this node's pods (`limit_netns`); the
Kubernetes link (`build_cluster`, `start_cluster`); and the capabilities it keeps
(`drop_privileges`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os

from injector.netns import run_in_thread

from . import hostnet
from .addrvirt import AddressVirtualizer, VirtualizationUnavailable, tcp_socket_cookies
from .k8s.link import ClusterLink, ClusterLinkError
from .podmeta import StaticPodMetadata
from .policy import SwapPolicy
from .rules import RuleError, RuleWatcher
from .scoping import NodeScope

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A start-up step failed; the message names what."""


def no_pod_cidr(overlay_if: str | None) -> StartupError:
    """This node's pod CIDR is nowhere to be found."""
    return StartupError(f"OVERLAY_IF {overlay_if}: cannot find this node's pod CIDR (no bridge "
                        "route holds its address); give --pod-cidr")


def discover_node(scope: NodeScope, host_if: str, overlay_if: str, node_name: str | None,
                  pod_cidrs_later: bool = False) -> None:
    """Host address, pod CIDRs (unless given) and overlay peers from the node's network
    (pyroute2: call it where no event loop runs). `pod_cidrs_later`: the Node object gives
    them (Kubernetes), so finding none is not an error yet."""
    try:
        scope.host_addr = hostnet.interface_ipv4(host_if)
        if not scope.pod_cidrs:
            scope.pod_cidrs = hostnet.local_pod_cidrs(overlay_if)
        scope.peer_map.update_discovered(hostnet.overlay_peers(overlay_if))
    except hostnet.HostNetError as exc:
        raise StartupError(str(exc)) from None
    if not scope.pod_cidrs and not pod_cidrs_later:
        raise no_pod_cidr(overlay_if)
    scope.node = node_name or scope.host_addr


def load_policy(policy: SwapPolicy, scope: NodeScope, rules_dir: str,
                pod_metadata: str | None, counters: collections.Counter[str]) -> None:
    """The rules directory (errors are logged and counted: it is watched) and the pod
    metadata file; with pod metadata, only the netns of this node's pods are in scope."""
    try:
        policy.rules = RuleWatcher(rules_dir, strict=False)
    except RuleError as exc:  # pragma: no cover - strict=False logs instead
        raise StartupError(str(exc)) from None
    if policy.rules.last_error is not None:
        counters["rules_errors"] += 1
    if not pod_metadata:
        return
    try:
        pods = StaticPodMetadata.from_file(pod_metadata)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"pod metadata {pod_metadata}: {exc}") from None
    policy.pods = pods
    scope.local_netns = {p.netns_inode for p in pods.pods
                         if p.netns_inode and hostnet.in_any(p.ip, scope.pod_cidrs)}


def limit_netns(scope: NodeScope, paths: list[str]) -> None:
    """Only pods in the network namespaces at `paths` (`--scope-netns`) are in scope."""
    try:
        inodes = {os.stat(path).st_ino for path in paths}
    except OSError as exc:
        raise StartupError(f"--scope-netns {exc.filename}: {exc.strerror}") from None
    scope.local_netns = inodes if scope.local_netns is None else scope.local_netns & inodes


def build_cluster(scope: NodeScope, policy: SwapPolicy, kubeconfig: str | None,
                  node_name: str | None) -> None:
    """The Kubernetes link (built now, so errors stop start-up; started after the drop)."""
    assert policy.rules is not None
    try:
        scope.cluster = ClusterLink.build([r.kind for r in policy.rules.rules.filters],
                                          kubeconfig, node_name)
    except ClusterLinkError as exc:
        raise StartupError(str(exc)) from None


async def start_cluster(scope: NodeScope, cluster: ClusterLink, timeout: float,
                        pod_cidrs_given: bool, overlay_if: str | None,
                        counters: collections.Counter[str]) -> None:
    """Start the Kubernetes watchers; take this node's podCIDRs from its Node object."""
    await asyncio.get_running_loop().run_in_executor(None, cluster.start, timeout)
    if cluster.error:
        counters["kubernetes_errors"] += 1
    if not pod_cidrs_given and cluster.local_pod_cidrs():
        scope.pod_cidrs = cluster.local_pod_cidrs()
        scope.forget_addresses()
    if not scope.pod_cidrs:
        raise no_pod_cidr(overlay_if)


def drop_privileges(counters: collections.Counter[str]) -> list[str] | None:
    """Keep only what the daemon still uses once its BPF programs are attached; the
    capabilities kept (None: the drop failed and the daemon runs with all of them)."""
    from .privileges import PrivilegeError, daemon_required
    from .privileges import drop_privileges as drop

    try:
        report = drop(daemon_required(tracer_open=True))
    except (PrivilegeError, OSError) as exc:
        log.warning("cannot drop capabilities (running with all of them): %s", exc)
        counters["privileges_kept"] = 1
        return None
    if report.other_threads:
        log.warning("threads %s still hold more capabilities than %s", report.other_threads,
                    ", ".join(report.kept))
    log.info("capabilities kept: %s", ", ".join(report.kept))
    if report.bounding_kept:
        log.info("bounding set keeps %s (no CAP_SETPCAP to drop them; not permitted, and "
                 "no_new_privs stops any exec from gaining them)", ", ".join(report.bounding_kept))
    return list(report.kept)


def open_virtualizer(node: str, pin: str | None,
                     counters: collections.Counter[str]) -> AddressVirtualizer | None:
    """Address virtualization for swapped sockets (`ebpfrouter.addrvirt`), pinned under `pin`
    ("" for the default directory, None: not pinned); None, said once, if the kernel refuses.
    A pinned table left by an earlier daemon is re-opened and pruned to the sockets that
    still exist, so connections it swapped keep their overlay addresses."""
    # (bpffs refuses names with a dot: a node's address is written with underscores)
    pin_dir = pin if pin != "" else f"/sys/fs/bpf/ebpf-router/addrvirt-{node.replace('.', '_')}"
    try:
        virt = AddressVirtualizer.open(pin_dir)
    except VirtualizationUnavailable as exc:
        counters["virtualization_unavailable"] += 1
        log.warning("address virtualization unavailable (%s): after a swap apps see host "
                    "addresses; the server waits for its app's first read", exc.reason)
        return None
    if len(virt):
        pruned = run_in_thread(lambda: virt.prune(tcp_socket_cookies()),  # (pyroute2: no loop)
                               name="prune")
        log.info("address virtualization: %d entries of swapped connections kept, %d pruned",
                 len(virt), pruned)
    return virt
