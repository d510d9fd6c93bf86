"""Tensor-parallel ranks started by a test itself (spawned processes, gloo on 127.0.0.1): each
loads its shard of a checkpoint and runs a plan of steps through its own model runner; rank 0
saves the logits. Only xllm is imported here, so the ranks start fast."""

from __future__ import annotations

import multiprocessing as mp
import socket

import torch


def run_plan(runner, kv, requests: dict[str, list[int]], plan: list[dict[str, int]]) -> dict[str, torch.Tensor]:
    """Run the chunk plan (one dict of request -> new-token count per step) through a model runner;
    the float32 logits of every computed position, per request."""
    from xllm.sampling_params import SamplingParams
    from xllm.worker.state import RunBatch, RunItem

    pos = {rid: 0 for rid in requests}
    got = {rid: [] for rid in requests}
    for step in plan:
        items = []
        for rid, n in step.items():
            assert kv.allocate_slots(rid, pos[rid] + n)
            toks = requests[rid][pos[rid] : pos[rid] + n]
            items.append(RunItem(rid, toks, pos[rid], kv.block_ids(rid), True, SamplingParams()))
        logits = runner.execute_logits(RunBatch(items))
        row = 0
        for item in items:
            got[item.request_id].append(logits[row : row + len(item.token_ids)])
            row += len(item.token_ids)
            pos[item.request_id] += len(item.token_ids)
    for rid in requests:
        kv.free(rid)
    return {rid: torch.cat(chunks) for rid, chunks in got.items()}


def _rank(rank: int, world: int, addr: str, folder: str, cases, out_path: str) -> None:
    import torch.distributed as dist

    from xllm.config import CacheConfig, ModelConfig
    from xllm.distributed import TensorParallel
    from xllm.kv.manager import KVCacheManager
    from xllm.models.loader import load_model
    from xllm.platforms import get_platform
    from xllm.worker.model_runner import ModelRunner

    dist.init_process_group("gloo", init_method=f"tcp://{addr}", rank=rank, world_size=world)
    platform = get_platform("cpu")
    platform.init(1, True)
    loaded = load_model(ModelConfig(model=folder, dtype="float32"), platform, TensorParallel(rank, world))
    runner = ModelRunner(loaded.model, loaded.arch, CacheConfig(num_blocks=128, block_size=4), torch.float32,
                         platform=platform)
    from xllm.ops import cpu_kernels

    calls = []
    split = cpu_kernels.decode_attn
    cpu_kernels.decode_attn = lambda *a: calls.append(1) or split(*a)  # count the fused layer's halves
    results = [run_plan(runner, KVCacheManager(128, 4), requests, plan) for requests, plan in cases]
    results.append(len(calls))
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def tp_logits(folder: str, world: int, cases, out_path: str):
    """Run `cases` ([(requests, plan)]) on `world` ranks; the logits rank 0 computed, per case,
    then how many times rank 0 ran the fused decode layer's attention half."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, addr, folder, cases, out_path)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert codes == [0] * world, f"rank exit codes {codes}"
    return torch.load(out_path)
