"""Host time per engine step, with the output processing overlapped with the next step or not.

The engine (in process, SmolLM2 by default) runs `--batch` requests of `--input-len` random
prompt tokens and `--output-len` generated tokens each (greedy, EOS ignored, detokenized, with a
stop string that never matches so the stop-string scan runs), once with `overlap=False` and once
with `overlap=True`, interleaved, `--repeats` times. Per step, from the engine's and the runner's
own timers (medians over repeats):

- `wall`: one turn of `LLMEngine.step`;
- `compute`: the forward pass and sampling (the runner's `execute` minus its input layout);
- `host`: what is left, `wall - compute`: what the engine thread does around the forward pass
  (serial: scheduling, input layout, recording tokens, detokenization and outputs; overlapped:
  recording tokens, filling placeholders, xtensor mapping, joining the helper);
- `on critical path`: the part of the runner's input work done in `execute` (serial: the whole
  layout; overlapped: the binding of placeholders and ranges only);
- `scheduled`: scheduling and input layout, in the helper thread while the step before computes
  when overlapped;
- `processed`: detokenization, stop strings and outputs, in the helper thread when overlapped;
- `exposed`: the host share of the step, `host / wall`.

    python benchmarks/overlap.py [--batch 16] [--input-len 128] [--output-len 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys

import torch

from xllm import LLM, SamplingParams
from xllm.bench.machine import machine_info
from xllm.bench.report import table
from xllm.bench.results import command_line, write_summary
from xllm.engine.pipeline import StepTiming


def run_once(llm: LLM, prompts: list[list[int]], output_len: int) -> dict:
    engine = llm.engine
    runner = engine.runner
    engine.timing = StepTiming()
    runner.execute_s = runner.prepare_s = 0.0
    engine.timing.schedule_s = 0.0
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, stop=["never-appears-here"])
    llm.generate(prompts, params)
    t = engine.timing
    steps = t.steps
    compute = (runner.execute_s - runner.prepare_s) / steps
    wall = t.wall_s / steps
    return {
        "steps": steps,
        "wall_ms": wall * 1e3,
        "compute_ms": compute * 1e3,
        "host_ms": (wall - compute) * 1e3,
        "prepare_ms": runner.prepare_s / steps * 1e3,
        "processed_ms": t.process_s / steps * 1e3,
        "scheduled_ms": t.schedule_s / steps * 1e3,
        "exposed_pct": 100 * (wall - compute) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = command_line(None if argv is None else [sys.argv[0], *argv])
    rng = random.Random(0)
    llms = {
        overlap: LLM(model=args.model, dtype=args.dtype, num_threads=args.threads, overlap=overlap,
                     enable_prefix_caching=False, kv_cache_memory_gib=0.5)
        for overlap in (False, True)
    }
    vocab = llms[False].engine.arch.vocab_size
    for llm in llms.values():  # warm-up
        llm.generate([[rng.randrange(vocab) for _ in range(16)]], SamplingParams(max_tokens=4))
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeats):
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
        for overlap, llm in llms.items():
            runs[overlap].append(run_once(llm, prompts, args.output_len))
    keys = ("wall_ms", "compute_ms", "host_ms", "prepare_ms", "scheduled_ms", "processed_ms", "exposed_pct")
    med = {overlap: {k: statistics.median(r[k] for r in rs) for k in keys} for overlap, rs in runs.items()}
    rows = [["overlap", "wall ms/step", "compute ms", "host ms", "of which input work", "scheduled ms", "processed ms",
             "host exposed"]]
    for overlap, m in med.items():
        where = ", in the helper" if overlap else ""
        rows.append(["on" if overlap else "off", f"{m['wall_ms']:.2f}", f"{m['compute_ms']:.2f}", f"{m['host_ms']:.2f}",
                     f"{m['prepare_ms']:.2f}", f"{m['scheduled_ms']:.2f}{where}", f"{m['processed_ms']:.2f}{where}",
                     f"{m['exposed_pct']:.1f}%"])
    info = machine_info(torch.get_num_threads())
    print(f"engine host time per step, batch {args.batch}, {args.input_len} in / {args.output_len} out, {args.dtype}; "
          f"{info['cpu']}, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved repeats")
    print(table(rows))
    hidden = med[False]["host_ms"] - med[True]["host_ms"]
    print(f"hidden by overlap: {hidden:.2f} ms of {med[False]['host_ms']:.2f} ms host time per step")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"overlap-{datetime.datetime.now():%Y-%m-%d-%H%M%S}.json")
    write_summary(out, {"command": command, "machine": info, "args": vars(args),
                        "runs": {str(k): v for k, v in runs.items()}, "medians": {str(k): v for k, v in med.items()}})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
