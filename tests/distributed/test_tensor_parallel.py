"""Tensor parallelism on random-weight Llama / Qwen2 / Qwen3: the ranks' logits (gathered on rank
0) against transformers within 1e-4, float32, for prompts, chunked prefill, mixed batches and
decode-only steps (the fused decode layer split at its all-reduces); uneven shards of the KV
heads, the MLP and the vocabulary. The sharding arithmetic is tested on its own."""

import pytest
import torch
from random_weights import save_checkpoint
from tp_ranks import tp_logits

from xllm.distributed import TensorParallel, split_counts

transformers = pytest.importorskip("transformers")


def test_split_counts_and_head_shards():
    assert split_counts(3, 2) == [2, 1] and split_counts(320, 3) == [107, 107, 106] and split_counts(4, 4) == [1] * 4
    # SmolLM2: 9 query heads over 3 KV heads; 2 ranks get 2 and 1 KV-head groups
    assert TensorParallel(0, 2).head_shard(9, 3) == ((0, 6), (0, 2))
    assert TensorParallel(1, 2).head_shard(9, 3) == ((6, 3), (2, 1))
    # Qwen2.5-0.5B: 14 heads, 2 KV heads: an even split
    assert TensorParallel(1, 2).head_shard(14, 2) == ((7, 7), (1, 1))
    with pytest.raises(ValueError, match="KV heads"):
        TensorParallel(0, 3).head_shard(4, 2)


COMMON = dict(vocab_size=320, hidden_size=72, intermediate_size=112, num_hidden_layers=2, max_position_embeddings=512,
              rms_norm_eps=1e-6, initializer_range=0.1)

# (config, model class, ranks): uneven KV heads (3 over 2), 3 ranks (uneven MLP and vocabulary)
CASES = {
    "llama-tp2": (lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=6, num_key_value_heads=3,
                                                   tie_word_embeddings=True), "LlamaForCausalLM", 2),
    "llama-tp3": (lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=6, num_key_value_heads=3,
                                                   tie_word_embeddings=True), "LlamaForCausalLM", 3),
    "qwen2-tp2": (lambda: transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2,
                                                   rope_theta=1e6, tie_word_embeddings=False), "Qwen2ForCausalLM", 2),
    "qwen3-tp2": (lambda: transformers.Qwen3Config(**COMMON, num_attention_heads=6, num_key_value_heads=3, head_dim=24,
                                                   rope_theta=1e6, tie_word_embeddings=False), "Qwen3ForCausalLM", 2),
}


def _plans():
    g = torch.Generator().manual_seed(3)
    reqs = {name: torch.randint(0, 320, (n,), generator=g).tolist() for name, n in [("a", 20), ("b", 13), ("c", 25)]}
    mixed = [{"a": 12, "b": 13}, {"a": 8, "c": 5}, {"c": 20}]
    chunked = [{"a": 7}, {"a": 7}, {"a": 6}]
    decodes_reqs = {name: torch.randint(0, 320, (n,), generator=g).tolist() for name, n in [("d", 9), ("e", 17), ("f", 4)]}
    decodes = [{"d": 6, "e": 14, "f": 1}] + [{"d": 1, "e": 1, "f": 1}] * 3  # decode-only steps: the fused layer
    return [(reqs, mixed), ({"a": reqs["a"]}, chunked), (decodes_reqs, decodes)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_parallel_logits_match_transformers(case, tmp_path):
    make_config, arch, ranks = CASES[case]
    cfg = make_config()
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg).eval()
    folder = save_checkpoint(model, tmp_path / "ckpt", 0.5 if arch == "Qwen2ForCausalLM" else None)
    plans = _plans()
    *got, fused_calls = tp_logits(folder, ranks, plans, str(tmp_path / "logits.pt"))
    # the 3 decode-only steps ran the fused layer in halves, every layer (not Qwen3: per-head norms)
    assert fused_calls == (0 if arch == "Qwen3ForCausalLM" else 3 * cfg.num_hidden_layers)
    for (requests, plan), logits in zip(plans, got):
        for rid, tokens in requests.items():
            n = sum(step.get(rid, 0) for step in plan)
            with torch.no_grad():
                ref = model(torch.tensor([tokens[:n]])).logits[0].float()
            torch.testing.assert_close(logits[rid], ref, atol=1e-4, rtol=0)
