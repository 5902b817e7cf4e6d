"""The `ebpf-router` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand module adds itself here."""
    parser = argparse.ArgumentParser(prog="ebpf-router", description=__doc__)
    parser.add_argument("--version", action="version", version="ebpf-router 0.1.0")
    parser.add_subparsers(dest="command")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
