"""The executor's cost and tensor parallelism on this machine.

Offline, float32 SmolLM2-135M, 64 prompts of 128 random tokens, 128 output tokens each (ignore_eos),
each configuration in a process of its own, interleaved, `--repeats` times:
- `uni`: the one rank in the engine's process (the default);
- `mp-tp1`: one rank in a worker process (the step crosses a process boundary as a value);
- `mp-tp2`: two tensor-parallel ranks, 1 thread each (gloo all-reduces).
Per configuration: output tok/s, and for the worker processes the hand-off per step at batch 64
(the decode steps with all 64 sequences: from serializing the step to every rank having decoded
it, plus from rank 0 serializing its output to the engine having decoded it), the whole step,
their ratio, and the bytes per step both ways. Writes a JSON summary.

    python benchmarks/executor.py --repeats 3 --output benchmarks/results/executor-<date>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "uni": dict(),
    "mp-tp1": dict(distributed_executor_backend="mp"),
    "mp-tp2": dict(tensor_parallel_size=2),
}


def run_one(name: str, batch: int, prompt_len: int, output_len: int, threads: int) -> dict:
    import random

    from xllm import LLM, SamplingParams

    llm = LLM(dtype="float32", kv_cache_memory_gib=1.0, num_threads=threads, **CONFIGS[name])
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    handoff = llm.engine.executor.handoff
    handoff.record = True
    handoff.per_step.clear()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {"config": name, "output_tok_s": tokens / wall, "wall_s": wall}
    full = [s for s in handoff.per_step if s[0] == batch]  # decode steps of the whole batch
    if full:
        result.update(
            decode_steps=len(full),
            handoff_ms=statistics.median(s[1] for s in full) * 1e3,
            step_ms=statistics.median(s[2] for s in full) * 1e3,
            handoff_share=statistics.median(s[1] / s[2] for s in full),
            bytes_per_step=statistics.median(s[3] for s in full),
        )
    llm.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--output", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.prompt_len, args.output_len, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {name: [] for name in args.configs.split(",")}
    for i in range(args.repeats):
        for name in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--batch", str(args.batch), "--prompt-len",
                   str(args.prompt_len), "--output-len", str(args.output_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            print(f"repeat {i + 1} {name}: {json.dumps(result)}", flush=True)
    summary = {
        "what": f"offline, float32 SmolLM2-135M, {args.batch} x {args.prompt_len}/{args.output_len} random tokens, "
                f"{args.threads} threads in all, {args.repeats} interleaved repeats (medians)",
        "command": "python " + " ".join(sys.argv),
        "configs": {},
    }
    for name, results in runs.items():
        keys = [k for k in results[0] if isinstance(results[0][k], (int, float))]
        summary["configs"][name] = {k: statistics.median(r[k] for r in results) for k in keys}
        summary["configs"][name]["output_tok_s_runs"] = [r["output_tok_s"] for r in results]
    base = summary["configs"].get("uni", {}).get("output_tok_s")
    if base:
        for name, c in summary["configs"].items():
            c["vs_uni"] = c["output_tok_s"] / base
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
