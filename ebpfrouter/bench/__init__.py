"""Benchmarks on the local testbed: every workload over the overlay, with bypass, and
node to node (the limit); JSON, Markdown table and plots. See `cli.run_bench`."""

from .cli import add_bench_parser, run_bench

__all__ = ["add_bench_parser", "run_bench"]
