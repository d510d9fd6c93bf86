"""The platform interface (one subclass per device kind: `cpu.py`, `cuda.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from xllm.config import CacheConfig, dtype_name

GIB = 1 << 30


class Platform:
    """What the engine asks of a device. Subclasses fill in the device-specific parts."""

    name = "base"
    # dtypes the model may run in here (weights, activations and KV cache)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)

    def __init__(self, device: torch.device):
        self.device = device

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device})"

    # ---- dtypes -----------------------------------------------------------------------------
    def auto_dtype(self, checkpoint_dtype: str | None, is_gguf: bool) -> torch.dtype:
        """The dtype for `--dtype auto`, from the checkpoint's own ("float32", "bfloat16", ...)."""
        raise NotImplementedError

    def resolve_dtype(self, requested: torch.dtype | None, checkpoint_dtype: str | None, is_gguf: bool) -> torch.dtype:
        """The dtype to run in: the one asked for (None = auto), refused if this device cannot run it."""
        dtype = requested if requested is not None else self.auto_dtype(checkpoint_dtype, is_gguf)
        if dtype not in self.dtypes:
            allowed = ", ".join(dtype_name(d) for d in self.dtypes)
            raise ValueError(f"dtype {dtype_name(dtype)} is not supported on {self.name} (use one of: {allowed})")
        return dtype

    # the xTensor KV layout's page pool exists here (`new_page_pool`)
    xtensor_pages = False

    def check(self, cache: CacheConfig) -> None:
        """Refuse settings this device cannot run, before anything loads."""
        if cache.kv_layout == "xtensor" and not self.xtensor_pages:
            raise ValueError(f"the xtensor KV layout is not available on {self.name} yet; use --kv-layout paged")

    # ---- start-up ---------------------------------------------------------------------------
    def init(self, num_threads: int | None, compiled_kernels: bool) -> None:
        """Process-level set-up before the model loads: torch's CPU threads and the op table."""
        if num_threads:
            torch.set_num_threads(num_threads)

    def prepare_model(self, model: torch.nn.Module, packed_weights: bool, huge_pages: bool) -> object | None:
        """After loading: device-specific copies or placement of the weights. Returns what must be
        kept alive with the model (the CPU's huge-page arena), or None."""
        return None

    # ---- memory -----------------------------------------------------------------------------
    def kv_cache_bytes(self, cache: CacheConfig, run_largest_step: Callable[[], None]) -> int:
        """Bytes for the KV cache. `run_largest_step()` runs the largest step the engine schedules
        once (over a scratch cache it frees), for a platform that sizes the cache from what is
        free after measuring that step's peak."""
        raise NotImplementedError

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for data that moves to and from the device (the KV host tier)."""
        return torch.empty(shape, dtype=dtype)

    def new_page_pool(self, num_pages: int, page_bytes: int, range_pages: int, dtype: torch.dtype, num_slots: int):
        """The xTensor layout's physical page pool with per-sequence virtual ranges."""
        raise NotImplementedError
