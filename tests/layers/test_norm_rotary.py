"""RMSNorm and rotary embedding: the compiled kernels against the torch code they replace."""

from __future__ import annotations

import pytest
import torch

from xllm.layers.norm import RMSNorm
from xllm.layers.rotary import RotaryEmbedding
from xllm.ops import cpu_kernels


def torch_path(fn):
    """Run fn with the compiled kernels switched off (the reference)."""
    was = cpu_kernels._enabled
    cpu_kernels.set_enabled(False)
    try:
        return fn()
    finally:
        cpu_kernels.set_enabled(was)


@pytest.fixture(autouse=True)
def built():
    assert cpu_kernels.load() is not None
    cpu_kernels.set_enabled(True)


@pytest.mark.parametrize("rows,hidden", [(1, 576), (3, 64), (17, 1000), (300, 576), (2, 13)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_torch(rows, hidden, with_residual):
    g = torch.Generator().manual_seed(rows * hidden)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.randn(hidden, generator=g)
    x = torch.randn(rows, hidden, generator=g) * 3
    res = torch.randn(rows, hidden, generator=g) if with_residual else None
    got = norm(x, res)
    ref = torch_path(lambda: norm(x, res))
    if with_residual:
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)  # the sum is exact
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_bfloat16_uses_torch():
    norm = RMSNorm(8)
    assert cpu_kernels.rms_norm(torch.randn(2, 8).bfloat16(), None, norm.weight, 1e-6) is None


@pytest.mark.parametrize("tokens,heads,kv_heads,d", [(1, 9, 3, 64), (5, 4, 4, 16), (130, 16, 2, 128), (3, 2, 1, 6)])
def test_rope_kernel_matches_torch_on_strided_views(tokens, heads, kv_heads, d):
    """q and k as the model has them: views into one fused q/k/v projection output."""
    rope = RotaryEmbedding(d, 4096, 10000.0)
    g = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    cos, sin = rope.cos_sin(positions, torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)
    ref_q, ref_k = torch_path(
        lambda: RotaryEmbedding.apply(
            qkv[:, : heads * d].view(tokens, heads, d).clone(),
            qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d).clone(),
            cos,
            sin,
        )
    )
    q = qkv[:, : heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d : (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v_before = qkv[:, (heads + kv_heads) * d :].clone()
    got_q, got_k = RotaryEmbedding.apply(q, k, cos, sin)
    torch.testing.assert_close(got_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * d :], v_before)  # v untouched


def test_rope_rejects_a_non_contiguous_head():
    q = torch.randn(2, 4, 16)[:, :, ::2]  # head values strided
    k = torch.randn(2, 1, 8)
    cos, sin = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError):
        cpu_kernels.rope_(q, k, cos, sin)
