"""What this machine can do, measured with torch: matmul rate per dtype and memory read bandwidth.

These are the denominators of the rooflines: a benchmark measures them in the same run as the
engines, on the same threads, because these machines vary by 5-20% from run to run.
"""

from __future__ import annotations

import datetime
import mmap
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from xllm.config import dtype_name
from xllm.models.huge_pages import thp_mode
from xllm.sysinfo import cpu_model, cpuinfo_field

# Instruction sets that decide torch's matmul speed per dtype (bf16 is slow without the last ones).
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of FLAGS_OF_INTEREST the CPU reports in /proc/cpuinfo (empty where unknown)."""
    flags = (cpuinfo_field("flags") or "").split()
    return [flag for flag in FLAGS_OF_INTEREST if flag in flags]


def machine_info(threads: int) -> dict:
    """Who ran the benchmark where: CPU, cores, threads, library versions, date."""
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers_version,
        "python": platform.python_version(),
        "thp_mode": thp_mode(),
    }


def _timed_runs(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall seconds of `reps` calls of `fn`, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> dict:
    """GFLOP/s of an n×n×n matmul in `dtype`, best and median over `reps` runs.

    It is taken in nn.Linear's layout, x @ W.T (`F.linear`), the call every model layer makes: on
    CPUs without native bf16 a plain `a @ b` in bfloat16 is an order of magnitude slower.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=gen).to(dtype)
    w = torch.randn(n, n, generator=gen).to(dtype)
    rates = [2 * n**3 / t / 1e9 for t in _timed_runs(lambda: torch.nn.functional.linear(x, w), reps)]
    return {"n": n, "layout": "x @ W.T", "best": max(rates), "median": statistics.median(rates), "runs": rates}


def _huge_page_tensor(numel: int) -> tuple[torch.Tensor, mmap.mmap] | None:
    """A float32 tensor on anonymous memory advised MADV_HUGEPAGE (2 MiB pages where THP allows).

    Returns the tensor and the mapping that owns its memory (keep both alive), or None where
    madvise is unavailable.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE") or thp_mode() not in ("always", "madvise"):
        return None
    mapping = mmap.mmap(-1, numel * 4, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(mapping, dtype=torch.float32, count=numel), mapping


def _read_bandwidth(x: torch.Tensor, reps: int) -> dict:
    """GB/s of `x.sum()` (one read pass over x): median and best over `reps` runs."""
    x.fill_(1.0)  # touch every page (allocates them, huge where advised) before timing
    rates = [x.numel() * x.element_size() / t / 1e9 for t in _timed_runs(x.sum, reps)]
    return {"median": statistics.median(rates), "best": max(rates), "runs": rates}


def memory_bandwidth(gib: float = 1.0, reps: int = 10) -> dict:
    """Memory read bandwidth in GB/s, with ordinary 4 KiB pages and with 2 MiB huge pages.

    Huge pages change the figure by 30-45% on these KVM guests (nested paging), so both are
    reported; `roofline` is the better median, the rate an engine whose weights and KV cache sit
    on huge pages can reach.
    """
    numel = int(gib * (1 << 30)) // 4
    result = {"gib": gib, "plain": _read_bandwidth(torch.empty(numel, dtype=torch.float32), reps)}
    huge = _huge_page_tensor(numel)
    if huge is not None:
        result["huge_pages"] = _read_bandwidth(huge[0], reps)
        del huge
    result["roofline"] = max(v["median"] for k, v in result.items() if isinstance(v, dict))
    return result


def measure_machine(dtypes: list[torch.dtype], threads: int, quick: bool = False) -> dict:
    """Everything above for these dtypes on `threads` threads (smaller and fewer runs when quick)."""
    size, reps, gib = (512, 3, 0.25) if quick else (2048, 7, 1.0)
    info = machine_info(threads)
    info["matmul_gflops"] = {dtype_name(d): matmul_gflops(d, size, reps) for d in dtypes}
    info["bandwidth_gbs"] = memory_bandwidth(gib, reps)
    return info
