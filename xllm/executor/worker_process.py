"""One rank in a process of its own: connect to the engine, join the process group, load this
rank's shard of the model, size and allocate its KV cache, then run the steps the engine sends.

Started as `python -m xllm.executor.worker_process RANK LOCAL_RANK RANKS_ON_NODE HOST:PORT
PARENT_PID LOG_LEVEL` with the authkey in $XLLM_WORKER_AUTHKEY (hex). Every message is a pickled
tuple over a `multiprocessing.connection` (TCP, with the authkey):
  engine -> rank: ("config", EngineConfig, process-group host:port), ("blocks", n), ("step",
                  SchedulerOutput), ("shutdown",)
  rank -> engine: ("hello", rank, pid), ("sized", num_blocks), ("ready",), ("out", RunnerOutput),
                  ("error", traceback text)
Rank 0 sends its whole `RunnerOutput` each step; the others only their statistics (`stats`), the
small channel every rank has back to the engine. A rank whose launcher (the engine, or `xllm
serve --node-rank N`) dies exits too: it would otherwise wait in a collective.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

from xllm.scheduler.output import RunnerOutput

logger = logging.getLogger(__name__)


def dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)


def run_rank(rank: int, local_rank: int, ranks_on_node: int, control_addr: tuple[str, int], authkey: bytes,
             parent_pid: int, log_level: int = logging.INFO) -> None:
    """The process's main function."""
    xllm_logger = logging.getLogger("xllm")  # configured when xllm is imported (xllm/logger.py)
    xllm_logger.setLevel(log_level)
    for handler in xllm_logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(levelname)s %(asctime)s rank{rank} %(name)s: %(message)s", "%H:%M:%S"))
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True, name="xllm-parent-watch").start()
    conn = _connect(control_addr, authkey)
    conn.send_bytes(dumps(("hello", rank, os.getpid())))
    try:
        kind, config, dist_addr = pickle.loads(conn.recv_bytes())
        assert kind == "config", kind
        worker = _start(rank, local_rank, ranks_on_node, config, dist_addr, conn)
    except BaseException:  # noqa: BLE001 - reported to the engine, which fails its start
        conn.send_bytes(dumps(("error", traceback.format_exc())))
        raise SystemExit(1) from None
    _serve(worker, conn, rank)


def _connect(address: tuple[str, int], authkey: bytes, timeout: float = 300.0):
    """The engine's control channel; a rank of another node may start before the engine listens."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(address, authkey=authkey)
        except (ConnectionRefusedError, ConnectionResetError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _start(rank: int, local_rank: int, ranks_on_node: int, config, dist_addr: str, conn):
    import torch

    from xllm.distributed import TensorParallel
    from xllm.models.loader import load_model
    from xllm.platforms import get_platform
    from xllm.worker.model_runner import ModelRunner
    from xllm.worker.worker import Worker

    par = config.parallel
    world = par.tensor_parallel_size
    platform = get_platform(config.device)
    if platform.name == "cuda":
        torch.cuda.set_device(local_rank)
        platform = get_platform(config.device)
    # the host's cores, shared by its ranks
    threads = max(1, (config.num_threads or os.cpu_count() or 1) // ranks_on_node)
    platform.init(threads, config.compiled_kernels)
    tp = TensorParallel()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "nccl" if platform.name == "cuda" else "gloo", init_method=f"tcp://{dist_addr}", rank=rank,
            world_size=world, timeout=timedelta(seconds=par.dist_timeout_s),
        )
        tp = TensorParallel(rank, world)
    loaded = load_model(config.model, platform, tp)
    arena = platform.prepare_model(loaded.model, config.packed_weights, config.huge_pages)
    limit = loaded.arch.max_position_embeddings
    runner = ModelRunner(
        loaded.model, loaded.arch, config.cache, loaded.dtype, seed=config.seed,
        max_model_len=config.model.max_model_len or limit, max_num_seqs=config.scheduler.max_num_seqs,
        platform=platform, max_num_batched_tokens=config.scheduler.max_num_batched_tokens, allocate=False,
    )
    runner.weights_arena = arena  # kept alive with the runner
    conn.send_bytes(dumps(("sized", runner.num_blocks)))
    kind, num_blocks = pickle.loads(conn.recv_bytes())
    assert kind == "blocks", kind
    runner.allocate(num_blocks)
    conn.send_bytes(dumps(("ready",)))
    return Worker(runner, rank)


def _serve(worker, conn, rank: int) -> None:
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the engine is gone
        message = pickle.loads(data)
        received = time.perf_counter()  # the step is here, decoded
        if message[0] == "shutdown":
            return
        try:
            out = worker.execute(message[1])
        except BaseException:  # noqa: BLE001 - the engine fails the step and stops
            conn.send_bytes(dumps(("error", traceback.format_exc())))
            return
        stats = out.stats[rank]
        stats["received_t"] = received
        reply = out if rank == 0 else RunnerOutput(stats=out.stats)
        stats["sent_t"] = time.perf_counter()
        conn.send_bytes(dumps(("out", reply)))


def main(argv: list[str]) -> None:
    rank, local_rank, per_node, control, parent_pid, log_level = argv
    host, _, port = control.rpartition(":")
    authkey = bytes.fromhex(os.environ.pop("XLLM_WORKER_AUTHKEY"))
    run_rank(int(rank), int(local_rank), int(per_node), (host, int(port)), authkey, int(parent_pid), int(log_level))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
