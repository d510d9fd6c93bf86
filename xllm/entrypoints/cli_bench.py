"""`xllm bench ...`: the benchmark subcommands, `offline` (the engine in-process) and `serve` (over HTTP)."""

from __future__ import annotations

import argparse


def _cmd_offline(args: argparse.Namespace) -> int:
    """Run `xllm bench offline` (the benchmark's modules load only when it runs)."""
    from xllm.bench.offline import cmd_offline

    return cmd_offline(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Run `xllm bench serve` (the load generator's modules load only when it runs)."""
    from xllm.bench.serve import cmd_serve

    return cmd_serve(args)


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` with its own subcommands to the `xllm` subparsers; return the `bench` parser."""
    from xllm.bench.offline import __doc__ as offline_doc
    from xllm.bench.offline import add_offline_args
    from xllm.bench.serve import __doc__ as serve_doc
    from xllm.bench.serve import add_serve_args

    bench = subparsers.add_parser(
        "bench",
        help="benchmark the engine against its peers on this machine",
        description="Benchmarks: each prints a table and writes a JSON file of every run.",
    )
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    offline = kinds.add_parser(
        "offline",
        help="batched offline throughput and batch-1 decode, against transformers, with rooflines",
        description=offline_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_offline_args(offline)
    offline.set_defaults(func=_cmd_offline)
    serve = kinds.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (ours, vLLM, llama-server): latency, throughput, goodput",
        description=serve_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_args(serve)
    serve.set_defaults(func=_cmd_serve)
    return bench
