"""Frozen configuration, one dataclass per area, composed into `EngineConfig`.

Each component receives only its own part. `EngineConfig.create(**kwargs)` is the one place where
user-facing keyword arguments (from `LLM(...)` or the CLI) become configuration.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | None:
    """`None` means "auto": the model's own dtype (float32 for a quantized GGUF)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: unknown value {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelConfig:
    """What the user asked for: which model, in which precision, how long a context."""

    model: str | None = None  # path to a GGUF file or HF folder; None = the default model
    dtype: str = "auto"
    max_model_len: int | None = None  # None = the model's own context length
    tokenizer: str | None = None  # override; by default the model's own


KV_LAYOUTS = ("paged", "xtensor")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Memory for the KV cache, in GiB; ignored when num_blocks is given. None: the platform's
    # default (2 GiB on the CPU; on CUDA what gpu_memory_utilization leaves once the model is loaded).
    kv_cache_memory_gib: float | None = None
    # CUDA: the fraction of the GPU's memory this engine may use (weights, activations, KV cache).
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None
    enable_prefix_caching: bool = True  # reuse KV blocks of equal prompt prefixes across requests
    # Lower prefix-cache tiers (kv/tiers.py): evicted cached blocks go to host memory, then to disk.
    kv_host_memory_gib: float = 0.0  # 0 = no host tier
    kv_disk_dir: str | None = None  # None = no disk tier
    kv_disk_gib: float = 4.0  # bound of the disk tier's folder
    # "paged": per-layer block tensors read through block tables; "xtensor": a physical page pool
    # with one contiguous virtual range per sequence (kv/xtensor.py)
    kv_layout: str = "paged"

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {self.kv_layout!r}")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")


SCHEDULING_POLICIES = ("chunked", "prefill-first", "decode-first")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # the per-step token budget
    max_num_seqs: int = 64  # bound on running sequences
    enable_chunked_prefill: bool = True
    # chunked: decodes first, prefill chunks fill the rest of the budget; prefill-first: waiting
    # prompts run whole in steps of their own, ahead of decodes; decode-first: decode-only steps
    # while requests run, new prompts admitted when few run or one waited too long.
    scheduling_policy: str = "chunked"
    max_prefill_chunk: int | None = None  # tokens of one prompt per step (None = the whole budget)
    decode_first_min_running: int = 4  # decode-first: admit new prompts while fewer than this run
    decode_first_max_wait_steps: int = 32  # decode-first: ...or once the first waiting one waited this many steps
    priority_aging_steps: int = 256  # a waiting request's priority improves by 1 every this many steps (0 = never)

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, got {self.scheduling_policy!r}")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError("max_prefill_chunk must be >= 1")
        if self.decode_first_min_running < 1 or self.decode_first_max_wait_steps < 0 or self.priority_aging_steps < 0:
            raise ValueError("decode_first_min_running must be >= 1; the step counts >= 0")


EXECUTOR_BACKENDS = ("uni", "mp")


@dataclass(frozen=True)
class ParallelConfig:
    """Worker ranks: how many, in which processes, on which hosts."""

    tensor_parallel_size: int = 1
    # "uni": the one rank in the engine's process; "mp": a process per rank. None: uni for one
    # rank, mp for more.
    distributed_executor_backend: str | None = None
    nnodes: int = 1  # hosts the ranks run on (tensor_parallel_size / nnodes ranks each)
    node_rank: int = 0  # this host's index; 0 runs the engine, the others only their ranks
    # host:port where the ranks meet (torch.distributed's store; the engine's control channel
    # listens on port + 1). None on one host: 127.0.0.1 and free ports.
    dist_init_addr: str | None = None
    # a collective that waits longer than this fails (a backstop: the engine's watchdog sees a
    # dead rank at once)
    dist_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_executor_backend not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError("the uni executor runs one rank; tensor_parallel_size > 1 needs worker processes (mp)")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got node_rank {self.node_rank} of nnodes {self.nnodes}")
        if self.tensor_parallel_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} does not split over {self.nnodes} nodes")
        if self.nnodes > 1 and not self.dist_init_addr:
            raise ValueError("ranks on several nodes need --dist-init-addr host:port")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ValueError(f"dist_init_addr must be host:port, got {self.dist_init_addr!r}")
        if not self.dist_timeout_s > 0:
            raise ValueError("dist_timeout_s must be > 0")

    @property
    def backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.tensor_parallel_size > 1 or self.nnodes > 1 else "uni"

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # "cpu", "cuda" or "auto" (CUDA when torch sees a GPU); picks the platform (xllm/platforms/)
    device: str = "auto"
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None = torch's default
    # CPU platform: use the built C++ kernels (xllm/ops/cpu_kernels.py) when present
    compiled_kernels: bool = True
    # CPU platform, float32: keep oneDNN-blocked copies of the weights for decode batches of 33-128 rows (more memory)
    packed_weights: bool = True
    # CPU platform: copy the weights onto transparent huge pages after loading (where THP is enabled or madvise).
    huge_pages: bool = True
    # Pipelining: schedule the next step and process the last one in a helper thread while a step computes.
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def create(cls, **kwargs) -> "EngineConfig":
        """Build from flat keyword arguments, each routed to the dataclass that owns it."""
        parts = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}
        grouped: dict[str, dict] = {name: {} for name in parts}
        top: dict = {}
        owner = {f.name: name for name, klass in parts.items() for f in dataclasses.fields(klass)}
        top_fields = {f.name for f in dataclasses.fields(cls)} - set(parts)
        for key, value in kwargs.items():
            if key in owner:
                grouped[owner[key]][key] = value
            elif key in top_fields:
                top[key] = value
            else:
                raise TypeError(f"unknown engine argument {key!r}")
        return cls(**{name: parts[name](**grouped[name]) for name in parts}, **top)


def default_cache_dir() -> str:
    """Where converted weights are kept: $XLLM_CACHE_DIR, else $XDG_CACHE_HOME/xllm, else ~/.cache/xllm."""
    if os.environ.get("XLLM_CACHE_DIR"):
        return os.environ["XLLM_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xllm")
