"""What differs per device: the CPU and CUDA platforms, chosen by `EngineConfig.device`.

A `Platform` owns the device and its dtype policy, the op table (the C++ kernels belong to the
CPU platform; every op keeps its torch fallback, which is what CUDA runs until it has kernels of
its own), how the model is prepared after loading (the CPU extras: prepacked weights, huge
pages), how big the KV cache is, and the page allocator of the xTensor layout. Nothing outside
this package asks which device it runs on; it asks the platform.
"""

from __future__ import annotations

import torch

from xllm.config import DEVICES
from xllm.platforms.base import Platform

__all__ = ["DEVICES", "Platform", "get_platform", "resolve_device"]


def resolve_device(device: str) -> str:
    """"cpu" or "cuda" for a `--device` value; "auto" is CUDA when torch sees a GPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU (a CPU build of torch, or no driver)")
    return device


def get_platform(device: str = "auto") -> Platform:
    name = resolve_device(device)
    if name == "cuda":
        from xllm.platforms.cuda import CudaPlatform

        return CudaPlatform()
    from xllm.platforms.cpu import CpuPlatform

    return CpuPlatform()
