"""The compiled CPU kernels against their torch reference, and the dispatch around them."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from xllm.ops import cpu_kernels

ROWS = [1, 2, 3, 4, 5, 7, 8, 13, 32, 64]
SHAPES = [(1, 8), (3, 13), (4, 576), (5, 100), (12, 1536), (960, 576), (1001, 17), (97, 64)]  # (N, K)


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load() or cpu_kernels.build()
    assert module is not None
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_torch_over_shapes(kernels, dtype, bias):
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        for m in ROWS:
            x = torch.randn(m, k, generator=g).to(dtype)
            got = cpu_kernels.gemv(x, w, b)
            assert got.dtype == torch.float32 and got.shape == (m, n)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            # float32 accumulation over k terms of size ~1: error grows like sqrt(k) ulps.
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * k**0.5, msg=f"M={m} N={n} K={k}")


def test_gemv_reads_strided_activations(kernels):
    w = torch.randn(40, 24)
    x = torch.randn(24, 6).t()  # [6, 24], not contiguous
    torch.testing.assert_close(cpu_kernels.gemv(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_rejects_bad_input(kernels):
    with pytest.raises(RuntimeError):
        cpu_kernels.gemv(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError):
        cpu_kernels.gemv(torch.randn(2, 8), torch.randn(8, 4).t())  # weight not contiguous
    with pytest.raises(RuntimeError):
        cpu_kernels.gemv(torch.randn(2, 8).half(), torch.randn(4, 8).half())


def test_linear_dispatch(monkeypatch):
    calls = []

    def fake_gemv(x, w, b):
        calls.append(x.shape[0])
        return F.linear(x.float(), w.float(), b)

    monkeypatch.setattr(cpu_kernels, "_module", types.SimpleNamespace(gemv=fake_gemv))
    monkeypatch.setattr(cpu_kernels, "_enabled", True)
    w = torch.randn(16, 8)
    for m in (1, cpu_kernels.GEMV_MAX_ROWS, cpu_kernels.GEMV_MAX_ROWS + 1):
        out = cpu_kernels.linear(torch.randn(m, 8), w)
        assert out.shape == (m, 16) and out.dtype == torch.float32
    assert calls == [1, cpu_kernels.GEMV_MAX_ROWS]  # the large batch went to torch
    out = cpu_kernels.linear(torch.randn(2, 8).bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16 and calls[-1] == 2  # result cast back to the activations' dtype
    cpu_kernels.linear(torch.randn(2, 8).half(), w.half())  # float16 weights: torch
    cpu_kernels.linear(torch.randn(2, 3, 8), w)  # not 2-D: torch
    cpu_kernels.set_enabled(False)
    cpu_kernels.linear(torch.randn(1, 8), w)
    assert calls == [1, cpu_kernels.GEMV_MAX_ROWS, 2]


@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_weights_match_torch_for_middle_batches(bias):
    """oneDNN on the prepacked copy, for the batches between the gemv kernel and torch's GEMM."""
    g = torch.Generator().manual_seed(1)
    for n, k in [(1728, 576), (576, 1536), (97, 64), (1001, 17), (4096, 576)]:
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g) if bias else None
        packed = cpu_kernels.prepack(w)
        assert packed is not None
        for m in (cpu_kernels.GEMV_MAX_ROWS + 1, 48, 64, 100, cpu_kernels.PACKED_MAX_ROWS):
            x = torch.randn(m, k, generator=g)
            torch.testing.assert_close(cpu_kernels.linear(x, w, b, packed), F.linear(x, w, b), atol=1e-3, rtol=1e-4)
        xt = torch.randn(k, 40, generator=g).t()  # strided activations
        torch.testing.assert_close(cpu_kernels.linear(xt, w, b, packed), F.linear(xt, w, b), atol=1e-3, rtol=1e-4)


def test_prepacked_weights_only_serve_middle_batches(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_enabled", False)  # the gemv kernel off: small batches go to torch
    w = torch.randn(16, 8)
    packed = cpu_kernels.prepack(w)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(cpu_kernels, "torch", types.SimpleNamespace(
        float32=torch.float32, bfloat16=torch.bfloat16, ops=types.SimpleNamespace(mkldnn=types.SimpleNamespace(
            _linear_pointwise=lambda x, *a: calls.append(x.shape[0]) or real(x, *a)))))
    for m in (1, 40, cpu_kernels.PACKED_MAX_ROWS, cpu_kernels.PACKED_MAX_ROWS + 1):
        cpu_kernels.linear(torch.randn(m, 8), w, None, packed)
    assert calls == [1, 40, cpu_kernels.PACKED_MAX_ROWS]


@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_weights_get_a_widened_copy_without_native_bfloat16(bias, monkeypatch):
    """Without AVX-512 BF16 or AMX, torch's bfloat16 matmul is ~8x slower than float32: a bfloat16
    weight is packed widened, and every batch past the skinny kernel multiplies in float32 with
    the same weight values (so the result is F.linear's on the widened weights)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 576, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: True)
    assert cpu_kernels.prepack(w) is None  # native bfloat16: torch's own matmul
    monkeypatch.setattr(cpu_kernels, "native_bf16", lambda: False)
    packed = cpu_kernels.prepack(w)
    assert packed is not None and packed.dtype == torch.float32
    for m in (40, 512):
        x = torch.randn(m, 576, generator=g).bfloat16()
        got = cpu_kernels.linear(x, w, b, packed)
        want = F.linear(x.float(), w.float(), b.float() if bias else None).bfloat16()
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)


def test_load_without_a_build_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_module", None)
    assert cpu_kernels.load(str(tmp_path)) is None
    assert not cpu_kernels.active()
    w, x = torch.randn(4, 8), torch.randn(1, 8)
    torch.testing.assert_close(cpu_kernels.linear(x, w), F.linear(x, w))


def test_build_name_tracks_the_cpu(monkeypatch):
    a = cpu_kernels.build_name()
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: "fpu sse2")
    assert cpu_kernels.build_name() != a


@pytest.mark.slow
def test_engine_output_same_with_and_without_kernels(kernels):
    from xllm import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
    runs = {}
    for on in (True, False):
        llm = LLM(dtype="float32", kv_cache_memory_gib=0.1, compiled_kernels=on)
        assert cpu_kernels.active() is on
        runs[on] = llm.generate(prompts, params)
    cpu_kernels.set_enabled(True)
    for a, b in zip(runs[True], runs[False]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for tok, lp in la.items():
                assert abs(lp.logprob - lb[tok].logprob) < 1e-3


def test_silu_mul_matches_torch(kernels):
    g = torch.Generator().manual_seed(2)
    for m, i in [(1, 1536), (3, 7), (64, 1536), (5, 8), (40, 4864), (2, 1)]:
        x = torch.randn(m, 2 * i, generator=g) * 6
        gate, up = x.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_kernels.silu_mul(x), F.silu(gate) * up, atol=1e-6, rtol=1e-5)
    x = torch.tensor([[-200.0, 200.0, 0.0, -0.0, 1.0, 2.0]])  # saturating exponents
    torch.testing.assert_close(cpu_kernels.silu_mul(x), F.silu(x[:, :3]) * x[:, 3:])
    strided = torch.randn(6, 20, generator=g)[:, 2:18]  # non-contiguous input
    torch.testing.assert_close(cpu_kernels.silu_mul(strided), F.silu(strided[:, :8]) * strided[:, 8:], atol=1e-6, rtol=1e-5)


def test_argmax_matches_torch(kernels):
    g = torch.Generator().manual_seed(3)
    for m, v in [(1, 49152), (64, 49152), (3, 7), (5, 8), (2, 1), (9, 151936)]:
        x = torch.randn(m, v, generator=g)
        assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    x = torch.full((4, 19), float("-inf"))
    x[1, 5] = x[1, 11] = 3.0  # ties: the first index
    x[2, :] = 0.0
    x[3, 17] = 1.0
    x[3, 9] = float("nan")  # NaN wins, as in torch
    assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    assert cpu_kernels.argmax(x).tolist() == [0, 5, 0, 9]


# ---- tensors that are not on the CPU: every dispatcher takes the torch path --------------------
class _Refusing:
    """A stand-in for the built module: any kernel call fails the test (meta tensors must never
    reach the C++, which would read their missing host memory)."""

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise AssertionError(f"the C++ kernel {name} was called with non-CPU tensors")

        return call


@pytest.fixture
def refusing(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_module", _Refusing())
    monkeypatch.setattr(cpu_kernels, "_enabled", True)


def meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_every_dispatcher_falls_back_for_tensors_off_the_cpu(refusing):
    assert cpu_kernels.linear(meta(2, 8), meta(16, 8)).device.type == "meta"
    assert cpu_kernels.linear(meta(2, 8), meta(16, 8), meta(16)).device.type == "meta"
    assert cpu_kernels.linear(meta(40, 8), meta(16, 8), None, torch.empty(0)).device.type == "meta"  # packed: not for meta
    assert cpu_kernels.prepack(meta(16, 8)) is None
    assert cpu_kernels.rms_norm(meta(2, 8), None, meta(8), 1e-6) is None
    assert cpu_kernels.rms_norm(meta(2, 8), meta(2, 8), meta(8), 1e-6) is None
    assert cpu_kernels.silu_mul(meta(2, 8)).shape == (2, 4)
    assert cpu_kernels.argmax(meta(2, 8)).device.type == "meta"
    assert cpu_kernels.rope_(meta(3, 2, 8), meta(3, 1, 8), meta(3, 1, 8), meta(3, 1, 8)) is False
    assert cpu_kernels.write_kv(meta(2, 4, 16, 1, 8), meta(3, 1, 8), meta(3, 1, 8), meta(3, dtype=torch.long)) is False
    tables, lens = meta(2, 3, dtype=torch.long), meta(2, dtype=torch.long)
    assert cpu_kernels.paged_decode_attention(meta(2, 4, 8), meta(2, 4, 16, 1, 8), tables, lens, 0.3) is None
    ranges = meta(4, 3, 16, 1, 8)
    assert cpu_kernels.range_decode_attention(meta(2, 4, 8), ranges, ranges, lens, lens, 0.3) is None
    assert not cpu_kernels.decode_layer_ready(meta(2, 8))
    assert not cpu_kernels.on_cpu(torch.zeros(1), meta(1)) and cpu_kernels.on_cpu(torch.zeros(1), None)
    with pytest.raises(ValueError, match="CPU"):
        cpu_kernels.gemv(meta(2, 8), meta(16, 8))


def test_a_cpu_activation_with_a_weight_elsewhere_is_not_sent_to_the_kernel(refusing):
    """Every tensor argument is checked, not only the first."""
    assert cpu_kernels.rms_norm(torch.randn(2, 8), None, meta(8), 1e-6) is None
    assert cpu_kernels.write_kv(torch.zeros(2, 4, 16, 1, 8), meta(3, 1, 8), meta(3, 1, 8), torch.zeros(3, dtype=torch.long)) is False


def test_the_kernels_themselves_refuse_tensors_off_the_cpu(kernels):
    """Behind the dispatchers, each C++ entry point checks the device too (a clear error, not a crash)."""
    calls = {
        "gemv": (meta(2, 8), meta(16, 8), None),
        "rms_norm": (meta(2, 8), None, meta(8), 1e-6),
        "silu_mul": (meta(2, 8),),
        "argmax_rows": (meta(2, 8),),
        "rope_": (meta(3, 2, 8), meta(3, 1, 8), meta(3, 1, 8), meta(3, 1, 8)),
        "write_kv": (meta(2, 4, 16, 1, 8), meta(3, 1, 8), meta(3, 1, 8), meta(3, dtype=torch.long)),
        "paged_decode_attention": (meta(2, 4, 8), meta(2, 4, 16, 1, 8), meta(2, 3, dtype=torch.long),
                                   meta(2, dtype=torch.long), 0.3),
        "decode_layer": (meta(1, 8), None, meta(8), meta(24, 8), None, meta(8, 8), meta(8), meta(32, 8), meta(8, 16),
                         meta(1, 1, 4), meta(1, 1, 4), meta(2, 4, 16, 1, 4), meta(1, 1, dtype=torch.long),
                         meta(1, dtype=torch.long), meta(1, dtype=torch.long), 2, 1, 1e-6, 0.5),
    }
    for name, args in calls.items():
        with pytest.raises(RuntimeError, match="CPU tensors only"):
            getattr(kernels, name)(*args)
