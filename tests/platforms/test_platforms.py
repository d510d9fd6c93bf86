"""Picking the platform, and what each platform decides (dtype policy, memory, layouts)."""

from __future__ import annotations

import pytest
import torch

from xllm.config import CacheConfig, EngineConfig
from xllm.platforms import get_platform, resolve_device
from xllm.platforms.cpu import CpuPlatform
from xllm.platforms.cuda import CudaPlatform

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def cuda_policy() -> CudaPlatform:
    """The CUDA platform's policy methods, without a GPU (nothing device-bound is touched)."""
    return object.__new__(CudaPlatform)


def test_device_names():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        EngineConfig(device="gpu")
    assert isinstance(get_platform("cpu"), CpuPlatform)


@needs_no_gpu
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    from xllm import LLM

    with pytest.raises(ValueError, match="no CUDA GPU"):
        LLM(device="cuda")


def test_cpu_dtype_policy():
    cpu = CpuPlatform()
    assert cpu.resolve_dtype(None, None, is_gguf=True) is torch.float32
    assert cpu.resolve_dtype(None, "float32", is_gguf=False) is torch.float32
    assert cpu.resolve_dtype(None, "bfloat16", is_gguf=False) is torch.bfloat16
    assert cpu.resolve_dtype(None, "float16", is_gguf=False) is torch.bfloat16  # half matmuls are slow on CPUs
    assert cpu.resolve_dtype(torch.bfloat16, "float32", is_gguf=False) is torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on cpu"):
        cpu.resolve_dtype(torch.float16, None, is_gguf=True)


def test_cuda_dtype_policy():
    cuda = cuda_policy()
    assert cuda.resolve_dtype(torch.float16, None, is_gguf=True) is torch.float16  # allowed on CUDA
    assert cuda.resolve_dtype(None, "float16", is_gguf=False) is torch.float16
    assert cuda.resolve_dtype(None, "bfloat16", is_gguf=False) is torch.bfloat16
    assert cuda.resolve_dtype(None, "float32", is_gguf=False) is torch.bfloat16
    assert cuda.resolve_dtype(torch.float32, "float32", is_gguf=False) is torch.float32


def test_kv_cache_size_and_layouts():
    cpu = CpuPlatform()
    never = lambda: pytest.fail("the CPU does not profile")  # noqa: E731
    assert cpu.kv_cache_bytes(CacheConfig(), never) == 2 << 30
    assert cpu.kv_cache_bytes(CacheConfig(kv_cache_memory_gib=0.5), never) == 1 << 29
    cpu.check(CacheConfig(kv_layout="xtensor"))
    cuda = cuda_policy()
    assert cuda.kv_cache_bytes(CacheConfig(kv_cache_memory_gib=1.0), never) == 1 << 30  # asked for: no profiling
    with pytest.raises(ValueError, match="xtensor KV layout is not available on cuda"):
        cuda.check(CacheConfig(kv_layout="xtensor"))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)


@pytest.mark.slow
def test_the_engine_reports_its_device(smollm2_llm):
    engine = smollm2_llm.engine
    assert engine.platform.device == torch.device("cpu") and engine.runner.kv_caches[0].device.type == "cpu"


def test_cuda_sizes_the_kv_cache_from_what_the_largest_step_leaves(monkeypatch):
    """The budget arithmetic, with torch.cuda's memory counters faked (no GPU here): total x
    utilization, less what is in use, less the profiled step's peak; none left is a clear error."""
    gib = 1 << 30
    state = {"allocated": 3 * gib, "peak": 3 * gib, "free": 70 * gib}

    def run_largest_step():
        state["peak"] = state["allocated"] + 2 * gib  # the step's activations: 2 GiB at their peak

    fake = dict(empty_cache=lambda: None, reset_peak_memory_stats=lambda device=None: None,
                memory_allocated=lambda device=None: state["allocated"],
                max_memory_allocated=lambda device=None: state["peak"],
                mem_get_info=lambda device=None: (state["free"], 80 * gib))
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    cuda = cuda_policy()
    cuda.device = torch.device("cuda", 0)
    budget = cuda.kv_cache_bytes(CacheConfig(gpu_memory_utilization=0.5), run_largest_step)
    assert budget == 40 * gib - 10 * gib - 2 * gib
    state["free"] = 41 * gib  # 39 GiB in use (another process too): 40 - 39 - 2 < 0
    with pytest.raises(ValueError, match="no GPU memory is left for the KV cache"):
        cuda.kv_cache_bytes(CacheConfig(gpu_memory_utilization=0.5), run_largest_step)


def test_cuda_host_memory_is_registered_at_its_exact_size(monkeypatch, caplog):
    """The host tier's memory on CUDA: plain memory registered with cudaHostRegister (pin_memory
    would round it up to a power of two); a driver that refuses leaves it unpinned, with a warning."""
    calls = []

    class Cudart:
        def __init__(self, status):
            self.status = status

        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - CUDA's name
            calls.append((ptr, size, flags))
            return self.status

    cuda = cuda_policy()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart(0))
    buffer = cuda.host_buffer((3, 5), torch.float32)
    assert buffer.shape == (3, 5) and calls == [(buffer.data_ptr(), 60, 0)]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart(2))  # cudaErrorMemoryAllocation
    with caplog.at_level("WARNING"):
        assert cuda.host_buffer((4,), torch.float32).shape == (4,)
    assert "could not page-lock" in caplog.text
    assert CpuPlatform().host_buffer((2, 2), torch.bfloat16).dtype is torch.bfloat16
