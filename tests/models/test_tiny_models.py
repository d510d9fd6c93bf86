"""Random-weight tiny Llama / Qwen2 / Qwen3 against transformers: logits within 1e-4 (float32)."""

import pytest
import torch
from random_weights import save_checkpoint
from tp_ranks import run_plan

from xllm.config import EngineConfig
from xllm.engine.engine import LLMEngine
from xllm.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)

ARCHS = {
    "llama": lambda: (transformers.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=True), transformers.LlamaForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=False), transformers.Qwen2ForCausalLM),
    # Qwen3 with head_dim != hidden/heads, as in the real models.
    "qwen3": lambda: (
        transformers.Qwen3Config(**COMMON, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=False),
        transformers.Qwen3ForCausalLM,
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def tiny(request, tmp_path_factory):
    cfg, cls = ARCHS[request.param]()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp(request.param), 0.5 if request.param == "qwen2" else None)
    engine = LLMEngine(EngineConfig.create(model=folder, dtype="float32", num_blocks=128, block_size=4))
    return request.param, model, engine


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def step_logits(engine, requests: dict[str, list[int]], plan: list[dict[str, int]]):
    """Run the given chunk plan (one dict of request -> new-token count per step); collect logits per request."""
    return run_plan(engine.runner, engine.kv, requests, plan)


def test_engine_config_matches(tiny):
    name, model, engine = tiny
    assert engine.arch.num_hidden_layers == 3
    assert engine.arch.tie_word_embeddings == model.config.tie_word_embeddings
    if name == "qwen3":
        assert engine.arch.head_dim == 24


def test_whole_prompt_logits(tiny):
    _, model, engine = tiny
    tokens = torch.randint(0, 320, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    got = step_logits(engine, {"a": tokens}, [{"a": 37}])["a"]
    torch.testing.assert_close(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_chunked_prefill_and_decode_logits(tiny):
    _, model, engine = tiny
    tokens = torch.randint(0, 320, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    plan = [{"a": 7}, {"a": 7}, {"a": 9}] + [{"a": 1}] * 7
    got = step_logits(engine, {"a": tokens}, plan)["a"]
    torch.testing.assert_close(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_mixed_batch_logits(tiny):
    _, model, engine = tiny
    g = torch.Generator().manual_seed(3)
    reqs = {name: torch.randint(0, 320, (n,), generator=g).tolist() for name, n in [("a", 20), ("b", 13), ("c", 25)]}
    plan = [
        {"a": 12, "b": 13},
        {"a": 8, "b": 0, "c": 5},
        {"a": 0, "b": 0, "c": 20},
    ]
    plan = [{k: v for k, v in step.items() if v} for step in plan]
    got = step_logits(engine, reqs, plan)
    for rid, tokens in reqs.items():
        torch.testing.assert_close(got[rid], hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_decodes_of_several_lengths_batched(tiny):
    _, model, engine = tiny
    g = torch.Generator().manual_seed(4)
    reqs = {name: torch.randint(0, 320, (n,), generator=g).tolist() for name, n in [("a", 9), ("b", 17), ("c", 4)]}
    prompt = {"a": 6, "b": 14, "c": 1}
    plan = [prompt] + [{rid: 1 for rid in reqs}] * 3
    got = step_logits(engine, reqs, plan)
    for rid, tokens in reqs.items():
        n = prompt[rid] + 3
        torch.testing.assert_close(got[rid], hf_logits(model, tokens[:n]), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(tiny):
    _, model, engine = tiny
    prompt = [5, 17, 42, 99, 3]
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                out = o
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(prompt) :].tolist()


def test_fused_decode_layers_match_the_module_path(tiny, monkeypatch):
    """Decode-only steps run each layer in one C++ call (Llama, Qwen2 with its q/k/v biases; not
    Qwen3's per-head norms): the same kernels as the module path, so the same logits, bit for bit."""
    from xllm.ops import cpu_kernels

    name, _, engine = tiny
    assert cpu_kernels.load() is not None
    calls = []
    fused_layer = cpu_kernels.decode_layer
    monkeypatch.setattr(cpu_kernels, "decode_layer", lambda *a: calls.append(1) or fused_layer(*a))
    g = torch.Generator().manual_seed(5)
    reqs = {name: torch.randint(0, 320, (n,), generator=g).tolist() for name, n in [("a", 12), ("b", 30), ("c", 7)]}
    plan = [{"a": 8, "b": 25, "c": 3}] + [{rid: 1 for rid in reqs}] * 4
    fused = step_logits(engine, reqs, plan)
    assert len(calls) == (0 if name == "qwen3" else 4 * 3)  # 4 decode steps x 3 layers; prefill steps never
    monkeypatch.setattr(cpu_kernels, "decode_layer_ready", lambda x: False)
    plain = step_logits(engine, reqs, plan)
    for rid in reqs:
        assert torch.equal(fused[rid], plain[rid])


def test_bfloat16_fused_decode_keeps_float32_activations(tiny, monkeypatch):
    """A bfloat16 model's decode steps run the one-call layers with float32 activations over its
    bfloat16 weights and cache. Against transformers in float32 on the same bfloat16-rounded weights,
    its decode logits are closer than those of the module path, which rounds every activation."""
    from xllm.ops import cpu_kernels

    name, model, engine = tiny
    bf16 = LLMEngine(EngineConfig.create(model=engine.config.model.model, dtype="bfloat16", num_blocks=128, block_size=4))
    ref_model = type(model)(model.config).eval()
    ref_model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    calls = []
    fused_layer = cpu_kernels.decode_layer
    monkeypatch.setattr(cpu_kernels, "decode_layer", lambda *a: calls.append(1) or fused_layer(*a))
    g = torch.Generator().manual_seed(6)
    reqs = {rid: torch.randint(0, 320, (n,), generator=g).tolist() for rid, n in [("a", 14), ("b", 26), ("c", 9)]}
    prompt = {"a": 8, "b": 20, "c": 3}
    plan = [prompt] + [{rid: 1 for rid in reqs}] * 6
    fused = step_logits(bf16, reqs, plan)
    assert len(calls) == (0 if name == "qwen3" else 6 * 3)
    monkeypatch.setattr(cpu_kernels, "decode_layer_ready", lambda x: False)
    plain = step_logits(bf16, reqs, plan)
    fused_err = plain_err = 0.0
    for rid, tokens in reqs.items():
        ref = hf_logits(ref_model, tokens[: prompt[rid] + 6])[prompt[rid] - 1 :]  # the decode steps' logits
        got, mod = fused[rid][prompt[rid] - 1 :].float(), plain[rid][prompt[rid] - 1 :].float()
        assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.1  # logits of size ~1-3
        fused_err += (got - ref).abs().mean().item()
        plain_err += (mod - ref).abs().mean().item()
    if name == "qwen3":  # per-head norms: no fused path, both runs are the module path
        assert fused_err == plain_err
    else:
        assert fused_err < plain_err
