"""gloo all-reduce latency between two 1-thread processes on this host, for the hidden size of
SmolLM2 (576) and 1, 8 and 64 rows: what each of a tensor-parallel step's all-reduces costs.

    python benchmarks/allreduce.py
"""

import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank(r, world, addr, rows, q):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=r, world_size=world)
    x = torch.randn(rows, 576)
    for _ in range(50): dist.all_reduce(x)
    ts = []
    for _ in range(300):
        t = time.perf_counter(); dist.all_reduce(x); ts.append(time.perf_counter() - t)
    if r == 0: q.put(statistics.median(ts) * 1e6)
    dist.destroy_process_group()

if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for rows in (1, 8, 64):
        s = socket.socket(); s.bind(("127.0.0.1", 0)); addr = f"127.0.0.1:{s.getsockname()[1]}"; s.close()
        q = ctx.Queue()
        ps = [ctx.Process(target=rank, args=(r, 2, addr, rows, q)) for r in range(2)]
        [p.start() for p in ps]; [p.join() for p in ps]
        print(f"gloo all_reduce [{rows}, 576] float32, 2 ranks: median {q.get():.0f} us")
