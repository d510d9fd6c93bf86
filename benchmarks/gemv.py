"""The compiled skinny-matmul kernel (`xllm.ops.cpu_kernels.gemv`) against `F.linear`.

For each weight shape of SmolLM2-135M and each batch (rows) 1..8, time both on weights that do
not fit the caches (a rotating set of copies, ~600 MB, as in a real decode step that streams the
whole model) and print microseconds and the weight bandwidth each reaches. This is where the
`GEMV_MAX_ROWS` crossover comes from.

    python benchmarks/gemv.py [--dtype float32|bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from xllm.ops import cpu_kernels

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def measure(n: int, k: int, m: int, ws: list[torch.Tensor]) -> tuple[float, float]:
    """Seconds per product for F.linear and the kernel, cycling through the weight copies."""
    x = torch.randn(m, k).to(ws[0].dtype)
    cycle = itertools.cycle(ws)
    iters = max(5, int(2e8 // ws[0].nbytes))
    return timed(lambda: F.linear(x, next(cycle)), iters), timed(lambda: cpu_kernels.gemv(x, next(cycle)), iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if cpu_kernels.load() is None:
        raise SystemExit("kernels not built: run `xllm build-kernels`")
    print(f"{'shape':>8} {'N x K':>12} {'rows':>4} {'torch us':>9} {'kernel us':>9} {'torch GB/s':>10} {'kernel GB/s':>11} {'speedup':>7}")
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * dtype.itemsize
        ws = [torch.randn(n, k).to(dtype) for _ in range(max(1, int(600e6 // nbytes)))]
        for m in args.rows:
            a, b = measure(n, k, m, ws)
            print(f"{name:>8} {f'{n}x{k}':>12} {m:>4} {a * 1e6:>9.0f} {b * 1e6:>9.0f} {nbytes / a / 1e9:>10.1f} {nbytes / b / 1e9:>11.1f} {a / b:>6.2f}x")


if __name__ == "__main__":
    main()
