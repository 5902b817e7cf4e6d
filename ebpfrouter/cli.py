"""The `ebpf-router` command line: run, status, doctor, testbed, demo, bench."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys

from . import config as config_mod


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the node daemon (env: OVERLAY_IF, HOST_IF, "
                                     "ROUTER_PORT, ROUTER_LOGLEVEL)")
    config_mod.add_arguments(run)
    run.add_argument("--health-port", type=int, help="serve /healthz, /readyz, /metrics here")
    run.add_argument("--pod-cidr", action="append", default=[], metavar="CIDR",
                     help="this node's pod subnet (repeatable; default: from OVERLAY_IF)")
    run.add_argument("--peer", action="append", default=[], metavar="OVERLAY_CIDR=HOST_ADDR",
                     help="static peer map entry (repeatable; default: from the overlay route)")
    run.add_argument("--pod-metadata", metavar="FILE",
                     help="pod labels for label rules (StaticPodMetadata JSON)")
    run.add_argument("--node-name", help="this node's name in peer messages and, with Kubernetes, "
                                         "its Node object (default: env NODE_NAME, else host addr)")
    run.add_argument("--kubeconfig", metavar="PATH",
                     help="use the Kubernetes API of this kubeconfig for pod labels, peers and "
                          "pod CIDRs (default: in a pod, its service account; else $KUBECONFIG)")
    run.add_argument("--no-kubernetes", action="store_true",
                     help="do not use the Kubernetes API, even in a pod or with $KUBECONFIG")
    run.add_argument("--kubernetes-sync-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="how long start-up waits for the first pod and node lists (default 30)")
    run.add_argument("--scope-netns", action="append", default=[], metavar="PATH",
                     help="handle only processes in these network namespaces (repeatable; for "
                          "testbeds that run several nodes on one kernel)")
    run.add_argument("--min-age", type=float, default=0.2, metavar="SECONDS",
                     help="bypass a connection only once it is this old; shorter ones stay on "
                          "the overlay and cost nothing (default 0.2; 0: at once)")
    run.add_argument("--kernel-filter", choices=("on", "off"), default="on",
                     help="on (default): the BPF programs report only connections with other "
                          "nodes' pods, and only once they are --min-age old (same-node, host "
                          "and short connections cost no user-space work); off: every pod "
                          "connection is reported at once and aged in the daemon")
    run.add_argument("--swap-batch", type=int, default=4, metavar="N",
                     help="swaps of one process that may share one freeze (default 4; 1: one "
                          "per freeze; more: fewer, longer stops)")
    run.add_argument("--read-first-wait", type=float, default=None, metavar="SECONDS",
                     help="swap an accepted connection once its app has read from it, or once "
                          "it is this old (at most 8; 0: do not wait for a read; default 0 "
                          "with address virtualization, else 3)")
    run.add_argument("--eager", choices=("auto", "always", "off"), default="auto",
                     help="swap new connections at connect()/accept() return, before their "
                          "first byte: auto (default) for listeners whose connections live "
                          "past --min-age, learned per listener; always; off. Needs address "
                          "virtualization")
    run.add_argument("--eager-wait", type=float, default=0.1, metavar="SECONDS",
                     help="how long an app stopped for the eager swap waits for the other "
                          "side before it runs on over the overlay (default 0.1, at most 2)")
    run.add_argument("--keep-privileges", action="store_true",
                     help="do not drop capabilities once the BPF programs are attached")


def _add_status(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="ask the running daemon for its status")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.add_argument("--control-socket", default=None,
                        help=f"status socket path ({config_mod.DEFAULT_CONTROL_SOCKET})")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="two-node testbed: throughput over the overlay, with "
                                       "bypass and node to node, plus an integrity check")
    demo.add_argument("--json", action="store_true", help="print one JSON object at the end")
    demo.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    demo.add_argument("--rounds", type=int, default=3,
                      help="bypass and node-to-node runs, alternating (default 3; medians)")
    demo.add_argument("--builtin", action="store_true",
                      help="use the built-in stream even if iperf3 is installed")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from .bench import add_bench_parser
    from .doctor import add_doctor_parser
    from .testbed import add_testbed_parser

    parser = argparse.ArgumentParser(prog="ebpf-router", description=__doc__)
    parser.add_argument("--version", action="version", version="ebpf-router 0.1.0")
    sub = parser.add_subparsers(dest="command")
    _add_run(sub)
    _add_status(sub)
    add_doctor_parser(sub)
    add_testbed_parser(sub)
    _add_demo(sub)
    add_bench_parser(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    from . import hostnet
    from .daemon import DaemonOptions, run_daemon
    from .k8s.link import wanted as kubernetes_wanted

    try:
        cfg = config_mod.RouterConfig.from_env(None, args)
        pod_cidrs = [ipaddress.ip_network(c, strict=False) for c in args.pod_cidr]
        peers = dict(hostnet.parse_peer(p) for p in args.peer)
    except (config_mod.ConfigError, ValueError) as exc:
        print(f"ebpf-router run: {exc}", file=sys.stderr)
        return 2
    # a server that keeps saying "not read yet" is given up on after the client's max_waits
    # (about 10 s of waiting), so a longer read-first wait would mean "never"
    for flag, value, most in (("--min-age", args.min_age, 3600.0),
                              ("--read-first-wait", args.read_first_wait, 8.0),
                              ("--eager-wait", args.eager_wait, 2.0)):
        if value is not None and not 0 <= value <= most:
            print(f"ebpf-router run: {flag} {value}: must be 0..{most:g} seconds",
                  file=sys.stderr)
            return 2
    if not 1 <= args.swap_batch <= 64:
        print(f"ebpf-router run: --swap-batch {args.swap_batch}: must be 1..64", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level_number,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kubernetes = kubernetes_wanted(args.kubeconfig, disabled=args.no_kubernetes)
    options = DaemonOptions(cfg, pod_cidrs=pod_cidrs, peers=peers, health_port=args.health_port,
                            pod_metadata=args.pod_metadata,
                            node_name=args.node_name or os.environ.get("NODE_NAME") or None,
                            kubernetes=kubernetes, kubeconfig=args.kubeconfig,
                            kubernetes_sync_timeout=args.kubernetes_sync_timeout,
                            scope_netns=list(args.scope_netns),
                            min_age=args.min_age, kernel_filter=args.kernel_filter == "on",
                            read_first_wait=args.read_first_wait,
                            swap_batch=args.swap_batch, eager=args.eager != "off",
                            eager_mode=args.eager if args.eager != "off" else "auto",
                            eager_wait=args.eager_wait,
                            drop_privileges=not args.keep_privileges)
    return run_daemon(options)


def _cmd_status(args: argparse.Namespace) -> int:
    from .control import ControlError, format_status, query_status

    path = args.control_socket or config_mod.RouterConfig.from_env().control_socket
    try:
        status = query_status(path)
    except ControlError as exc:
        print(f"ebpf-router status: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not 1 <= args.rounds <= 20:
        print(f"ebpf-router demo: --rounds {args.rounds}: must be 1..20", file=sys.stderr)
        return 2
    return run_demo(seconds=args.seconds, as_json=args.json, builtin=args.builtin,
                    rounds=args.rounds)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        return _cmd_run(args)
    if args.command == "status":
        return _cmd_status(args)
    if args.command == "demo":
        return _cmd_demo(args)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
