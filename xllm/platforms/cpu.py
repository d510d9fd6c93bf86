"""The CPU platform: the C++ kernels as the op table, prepacked weights, huge pages, memfd pages.

Host memory is the device memory here. float16 is refused: CPUs without native half-precision
matmul run it far slower than float32 (a float16 checkpoint runs in bfloat16 under `auto`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from xllm.config import CacheConfig
from xllm.platforms.base import GIB, Platform

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_GIB = 2.0


class CpuPlatform(Platform):
    name = "cpu"
    dtypes = (torch.float32, torch.bfloat16)
    xtensor_pages = True  # a memfd pool mapped into per-sequence ranges (kv/xtensor.py)

    def __init__(self):
        super().__init__(torch.device("cpu"))

    def auto_dtype(self, checkpoint_dtype: str | None, is_gguf: bool) -> torch.dtype:
        if is_gguf or checkpoint_dtype in (None, "float32"):
            return torch.float32  # a GGUF is dequantized to float32
        return torch.bfloat16 if checkpoint_dtype in ("bfloat16", "float16") else torch.float32

    def init(self, num_threads: int | None, compiled_kernels: bool) -> None:
        """The op table: the C++ kernels when they are built and wanted, else torch (process-wide)."""
        from xllm.ops import cpu_kernels

        super().init(num_threads, compiled_kernels)
        cpu_kernels.set_enabled(compiled_kernels)
        if compiled_kernels:
            cpu_kernels.load()

    def prepare_model(self, model: torch.nn.Module, packed_weights: bool, huge_pages: bool) -> object | None:
        from xllm.models.huge_pages import huge_page_kib, to_huge_pages

        if packed_weights and hasattr(model, "prepack_weights"):
            extra = model.prepack_weights()
            if extra:
                logger.info("prepacked float32 weight copies for batches past the skinny kernel: %.0f MiB more", extra / 2**20)
        arena = to_huge_pages(model) if huge_pages else None
        if arena is not None:
            logger.info("weights on transparent huge pages: %.0f MiB, %.0f MiB granted so far",
                        arena.nbytes / 2**20, huge_page_kib(arena) / 1024)
        return arena

    def kv_cache_bytes(self, cache: CacheConfig, run_largest_step: Callable[[], None]) -> int:
        gib = cache.kv_cache_memory_gib if cache.kv_cache_memory_gib is not None else DEFAULT_KV_CACHE_GIB
        return int(gib * GIB)

    def new_page_pool(self, num_pages: int, page_bytes: int, range_pages: int, dtype: torch.dtype, num_slots: int):
        from xllm.kv.xtensor import XTensorPool

        return XTensorPool(num_pages, page_bytes, range_pages, dtype, num_slots=num_slots)
