"""Compiled CPU kernels (C++ under `csrc/`), built once at install time, with torch as fallback.

`build()` compiles `csrc/*.cpp` with torch's extension tooling (a C++ compiler and ninja) into
the cache folder, keyed by the sources, the torch version and the CPU's instruction-set flags
(the code is built with `-march=native`). `scripts/setup.sh` runs it (`xllm build-kernels`).
At run time `load()` only imports what was built; it never compiles, so a machine without a
compiler, or a build that failed, runs the pure-torch path, which is also the tests' reference.

`linear(x, w, bias, packed)` is the one entry the model uses for every projection and the LM head:
for a skinny batch (up to `GEMV_MAX_ROWS` rows, i.e. decode) of float32/bfloat16 weights it
streams each weight once through `gemv`; for a middle batch (up to `PACKED_MAX_ROWS`) with a
`prepack`ed float32 weight it runs oneDNN's matmul on the blocked copy; otherwise, or without the
kernels, it is `F.linear`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from xllm.config import default_cache_dir
from xllm.sysinfo import cpuinfo_field

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = ("gemv.cpp", "attention.cpp", "norm.cpp", "rope.cpp", "activation.cpp", "kv_write.cpp", "decode_layer.cpp", "bindings.cpp")
_HEADERS = ("common.h", "ops.h")
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
GEMV_MAX_ROWS = 32  # up to here the kernel beats torch's GEMM; at 64 they tie (benchmarks/gemv.py)
# Up to here (decode batches) oneDNN on prepacked weights beats torch's MKL matmul (1.1-2x at 33-128
# rows); for prefill-sized batches it does not, so they stay on F.linear.
PACKED_MAX_ROWS = 128

_module = None  # the loaded extension, or None (torch path)
_enabled = True


def _cpu_flags() -> str:
    return cpuinfo_field("flags") or platform.processor()


def build_name() -> str:
    """Extension name: changes with the sources, the compile flags, torch and the CPU."""
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        with open(os.path.join(_CSRC, name), "rb") as f:
            h.update(f.read())
    h.update(" ".join(_CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_flags().encode())
    return f"xllm_cpu_kernels_{h.hexdigest()[:16]}"


def build_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "kernels", build_name())


def _library_path(cache_dir: str | None = None) -> str:
    return os.path.join(build_dir(cache_dir), build_name() + ".so")


def build(cache_dir: str | None = None, verbose: bool = False):
    """Compile the kernels (about a minute on 2 cores) unless already built; returns the module."""
    global _module
    from torch.utils import cpp_extension

    folder = build_dir(cache_dir)
    os.makedirs(folder, exist_ok=True)
    start = time.perf_counter()
    _module = cpp_extension.load(
        build_name(),
        [os.path.join(_CSRC, s) for s in _SOURCES],
        extra_cflags=_CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=folder,
        verbose=verbose,
    )
    logger.info("CPU kernels ready in %s (%.1f s)", folder, time.perf_counter() - start)
    return _module


def load(cache_dir: str | None = None):
    """Import the built kernels if present (never compiles); returns the module or None."""
    global _module
    if _module is not None:
        return _module
    path = _library_path(cache_dir)
    if not os.path.exists(path):
        logger.info("compiled CPU kernels are not built (run `xllm build-kernels`); using torch")
        return None
    try:
        spec = importlib.util.spec_from_file_location(build_name(), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        logger.warning("could not load the CPU kernels from %s (%s); using torch", path, e)
        return None
    _module = module
    return module


def set_enabled(enabled: bool) -> None:
    """Turn the compiled path on or off process-wide (off = pure torch, the reference)."""
    global _enabled
    _enabled = enabled


def active() -> bool:
    return _enabled and _module is not None


def on_cpu(*tensors: torch.Tensor | None) -> bool:
    """Whether every tensor given lives on the CPU: the kernels dereference host pointers, so any
    other device (CUDA, meta) takes the torch path."""
    return all(t is None or t.is_cpu for t in tensors)


def _ready(*tensors: torch.Tensor | None) -> bool:
    """The compiled kernels are on, and every tensor is one they can read."""
    return _enabled and _module is not None and on_cpu(*tensors)


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The compiled kernel itself: [M, K] x [N, K] -> [M, N] float32. Requires `load()`/`build()`."""
    if _module is None:
        raise RuntimeError("CPU kernels not loaded")
    if not on_cpu(x, w, bias):
        raise ValueError("gemv: the CPU kernel needs CPU tensors")
    return _module.gemv(x, w, bias)


def native_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without it torch's
    bfloat16 matmul runs about 8x slower than float32 here (19 against 150 GFLOP/s on AVX2)."""
    flags = (cpuinfo_field("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def prepack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked float32 copy of a weight [N, K] for `linear`'s batches past the skinny
    kernel, or None when torch has no oneDNN or the weight does not need one. A float32 weight
    gets it for middle batches (33-128 rows). A bfloat16 weight on a CPU without native bfloat16
    gets it for every batch past the skinny kernel: the copy holds the same values widened, so the
    product is the bfloat16 weights' with float32 arithmetic, at float32 speed."""
    if not on_cpu(w) or not torch.backends.mkldnn.is_available():
        return None
    if w.dtype == torch.bfloat16 and not native_bf16():
        w = w.float()
    elif w.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), batch_size=64)
    except (AttributeError, RuntimeError) as exc:  # an internal op: absent or refusing in some builds
        logger.info("no prepacked weights (%s); torch's matmul runs every batch", exc)
        return None


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, bias)`: up to `GEMV_MAX_ROWS` rows on the compiled kernel when available;
    with a `prepack`ed weight, float32 up to `PACKED_MAX_ROWS` rows and bfloat16 (widened copy) at
    any size on oneDNN; else torch's matmul."""
    if (
        _ready(x, w, bias)
        and x.dim() == 2
        and 0 < x.shape[0] <= GEMV_MAX_ROWS
        and w.dtype in (torch.float32, torch.bfloat16)
        and x.dtype == w.dtype
        and w.is_contiguous()
    ):
        return _module.gemv(x, w, bias).to(x.dtype)
    if packed is not None and x.dim() == 2 and on_cpu(x, bias):
        if x.dtype == torch.float32 and x.shape[0] <= PACKED_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
        if x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16:  # the widened copy (`prepack`)
            b = bias.float() if bias is not None else None
            return torch.ops.mkldnn._linear_pointwise(x.float().contiguous(), packed, b, "none", [], "").to(x.dtype)
    return F.linear(x, w, bias)


def paged_decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Decode attention read in place from the paged cache ([B, H, D] in q's dtype), or None when the
    kernels are off or the cache dtype is not theirs (the caller then runs the torch reference)."""
    if not (_ready(q, kv_cache, block_tables, seq_lens) and kv_cache.dtype in (torch.float32, torch.bfloat16)):
        return None
    return _module.paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale).to(q.dtype)


def range_decode_attention(
    q: torch.Tensor, k_ranges: torch.Tensor, v_ranges: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """Decode attention read in place from xtensor ranges (`k_ranges`/`v_ranges` [slots, pages, block_size,
    Hkv, D] strided views; sequence i reads `seq_lens[i]` tokens of range `slots[i]`), or None for the torch path."""
    if not (_ready(q, k_ranges, v_ranges, slots, seq_lens) and k_ranges.dtype in (torch.float32, torch.bfloat16)):
        return None
    return _module.range_decode_attention(q, k_ranges, v_ranges, slots, seq_lens, scale).to(q.dtype)


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Fused (x + residual) -> RMSNorm, float32 only; None when the torch path must run."""
    if not (_ready(x, residual, weight) and x.dtype == torch.float32 and weight.dtype == torch.float32):
        return None
    return _module.rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for the merged [M, 2I] gate|up projection output, in one pass (float32
    kernel), else torch."""
    if _ready(gate_up) and gate_up.dim() == 2 and gate_up.dtype == torch.float32:
        return _module.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax of float32 logits [N, V] (torch's is a slow serial scan here), else torch."""
    if _ready(logits) and logits.dim() == 2 and logits.dtype == torch.float32 and logits.shape[1] > 0:
        return _module.argmax_rows(logits)
    return logits.argmax(dim=-1)


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """New K/V rows into one layer's cache (paged, or the xtensor pool's view) in one call; False
    when the torch path must run (kernels off, or rows whose values are not contiguous)."""
    if not (_ready(kv_cache, k, v, slot_mapping) and k.dtype == kv_cache.dtype and v.dtype == kv_cache.dtype):
        return False
    if (k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1 or kv_cache.stride(3) != kv_cache.shape[4]
            or k.stride(1) != k.shape[2] or v.stride(1) != v.shape[2]):
        return False
    _module.write_kv(kv_cache, k, v, slot_mapping)
    return True


def decode_layer_ready(x: torch.Tensor) -> bool:
    """Whether `decode_layer` can run a decode batch of these hidden states (float32 or bfloat16,
    kernel-sized; bfloat16 states run through it in float32)."""
    return (
        _ready(x) and hasattr(_module, "decode_layer")
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS
    )


def decode_layer(x: torch.Tensor, residual: torch.Tensor | None, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer of a decode-only batch in one C++ call (csrc/decode_layer.cpp); the caller
    checks `decode_layer_ready` and that the layer's weights and cache qualify (on the CPU
    included: once per model for the weights, once per step for the cache, not per call; the
    C++ entry point refuses other devices too)."""
    return _module.decode_layer(x, residual, *args)


def decode_layer_split_ready() -> bool:
    """Whether the built kernels have the two halves of `decode_layer` (for tensor parallelism)."""
    return _module is not None and hasattr(_module, "decode_attn")


def decode_attn(x: torch.Tensor, residual: torch.Tensor | None, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_layer`'s attention half, up to o_proj: (o, residual); o is this rank's partial sum
    under tensor parallelism (all-reduced before `decode_mlp`). Same checks as `decode_layer`."""
    return _module.decode_attn(x, residual, *args)


def decode_mlp(o: torch.Tensor, residual: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_layer`'s MLP half: (out, residual), out a partial sum under tensor parallelism."""
    return _module.decode_mlp(o, residual, *args)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotary embedding in place on float32 q/k views; False when the torch path must run."""
    if not (_ready(q, k, cos, sin) and q.dtype == torch.float32 and k.dtype == torch.float32):
        return False
    _module.rope_(q, k, cos, sin)
    return True
