"""The CUDA platform: torch ops on one GPU, the KV cache sized from free device memory.

Every op runs its torch reference here (the C++ kernels are the CPU's; the dispatchers send
CUDA tensors to torch), with SDPA over the paged cache. float16 is allowed. The KV cache takes
what `--gpu-memory-utilization` leaves of the GPU once the weights are loaded and the largest
step has been run once to measure its activations, as vLLM sizes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from xllm.config import CacheConfig
from xllm.platforms.base import GIB, Platform

logger = logging.getLogger(__name__)


class CudaPlatform(Platform):
    name = "cuda"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self, index: int | None = None):
        index = torch.cuda.current_device() if index is None else index
        super().__init__(torch.device("cuda", index))
        torch.cuda.set_device(self.device)

    def auto_dtype(self, checkpoint_dtype: str | None, is_gguf: bool) -> torch.dtype:
        # The checkpoint's half precision; float32 checkpoints and (dequantized) GGUFs run in
        # bfloat16, as vLLM runs float32 models in half precision on a GPU.
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16

    def kv_cache_bytes(self, cache: CacheConfig, run_largest_step: Callable[[], None]) -> int:
        if cache.kv_cache_memory_gib is not None:
            return int(cache.kv_cache_memory_gib * GIB)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        run_largest_step()
        # its activations at their peak (and its small scratch cache: a slight over-estimate)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free  # weights, the CUDA context, other processes
        budget = int(total * cache.gpu_memory_utilization) - used - peak
        logger.info(
            "GPU memory: %.1f GiB in all, %.2f GiB in use, %.2f GiB peak activations; KV cache %.2f GiB "
            "(--gpu-memory-utilization %.2f)", total / GIB, used / GIB, peak / GIB, max(budget, 0) / GIB,
            cache.gpu_memory_utilization,
        )
        if budget <= 0:
            raise ValueError(
                f"no GPU memory is left for the KV cache: {used / GIB:.2f} GiB are in use and the largest step needs "
                f"{peak / GIB:.2f} GiB more, of {total / GIB:.1f} GiB x --gpu-memory-utilization "
                f"{cache.gpu_memory_utilization}; raise it, or lower --max-num-batched-tokens"
            )
        return budget

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Page-locked host memory of exactly this size: allocated, then registered with CUDA
        (`pin_memory=True` would round the allocation up to a power of two: a 40 GiB host tier
        would lock 64 GiB). Registered for the process's life; unpinned if the driver refuses."""
        buffer = torch.empty(shape, dtype=dtype)
        nbytes = buffer.numel() * buffer.element_size()
        if nbytes:
            try:
                status = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))  # 0: cudaSuccess
            except Exception as exc:  # noqa: BLE001 - no cudart binding: plain memory still works
                status = exc
            if status != 0:
                logger.warning("could not page-lock %.2f GiB of host memory for the KV tiers (%s); copies are synchronous",
                               nbytes / GIB, status)
        return buffer
