"""The decode attention kernel (`paged_decode_attention`, csrc/attention.cpp) over 30 layers of a
paged cache that does not fit the caches, as one decode step of SmolLM2 reads it.

For each (batch, context) it prints the milliseconds per step and the K/V bandwidth reached, with the
sequences' blocks laid out in order and shuffled. `--against SO` loads another build of the kernels
(a `xllm_cpu_kernels_*.so` from ~/.cache/xllm/kernels) and interleaves the two in this process,
which is how a kernel change is measured here (minimum and median of the rounds): this VM's speed
drifts by 10-20% between runs.

    python benchmarks/attention.py [--threads 2] [--rounds 12] [--against OLD.so]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import torch

from xllm.ops import cpu_kernels

SHAPES = [(64, 150), (16, 300), (4, 500), (1, 1024)]  # (sequences, tokens each)
LAYERS, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, HEADS = 30, 4096, 16, 3, 64, 9  # SmolLM2-135M


def load_so(path: str):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--against", metavar="SO", help="another build of the kernels to interleave with this one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    builds = {"this": cpu_kernels.load()}
    if builds["this"] is None:
        raise SystemExit("the kernels are not built: xllm build-kernels")
    if args.against:
        builds["against"] = load_so(args.against)
    caches = [torch.randn(2, BLOCKS, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(0)
    print(f"{'seqs':>5} {'tokens':>6} {'blocks':>9} " + " ".join(f"{k + ' min/med ms':>22} {'GB/s':>5}" for k in builds))
    for batch, tokens in SHAPES:
        per_seq = -(-tokens // BLOCK)
        lens = torch.full((batch,), tokens)
        q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
        kv_bytes = batch * tokens * KV_HEADS * HEAD_DIM * 2 * 4 * LAYERS
        for layout in ("in order", "shuffled"):
            ids = torch.arange(batch * per_seq) if layout == "in order" else torch.randperm(BLOCKS, generator=g)[: batch * per_seq]
            tables = ids.view(batch, per_seq)
            ref = builds["this"].paged_decode_attention(q, caches[0], tables, lens, 0.125)
            times = {k: [] for k in builds}
            for _ in range(args.rounds):
                for k, module in builds.items():
                    start = time.perf_counter()
                    for cache in caches:
                        module.paged_decode_attention(q, cache, tables, lens, 0.125)
                    times[k].append((time.perf_counter() - start) * 1000)
                    if k != "this":
                        torch.testing.assert_close(module.paged_decode_attention(q, caches[0], tables, lens, 0.125), ref)
            cells = [f"{min(v):>10.2f}/{statistics.median(v):<11.2f} {kv_bytes / min(v) / 1e6:>5.1f}" for v in times.values()]
            print(f"{batch:>5} {tokens:>6} {layout:>9} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
