"""The engine on each device against transformers on the same device: random-weight Llama and
Qwen2 models of a small real shape, built here. The CUDA cases carry the `cuda` marker and are
skipped without a GPU (`benchmarks/gpu/check.sh` runs them on a lent one); the CPU cases run the
same checks through the CPU platform.

- greedy float32: our tokens are transformers' argmax at every position, teacher-forced, up to
  the first near tie (top-2 gap < 1e-3), alone, batched, with chunked prefill and prefix hits;
- bfloat16: teacher-forced top-1 agreement with the float32 reference >= 99% over the positions
  whose float32 top-2 gap exceeds BF16_GAP (bfloat16 rounds logits by more than small gaps);
- the server answers on the device, seeded sampling does not depend on the batch, and a host
  tier moves blocks between the device and (pinned) host memory.
"""

from __future__ import annotations

import gc

import pytest
import torch
from random_weights import save_checkpoint

from xllm import LLM, SamplingParams
from xllm.worker.state import RunBatch, RunItem

transformers = pytest.importorskip("transformers")

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
NEAR_TIE = 1e-3
BF16_GAP = 0.1  # positions whose float32 top-2 logit gap is over this count for the bfloat16 check

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.08)
ARCHS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, rope_theta=10000.0, tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE, rope_theta=1000000.0, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def checkpoint(request, tmp_path_factory):
    """(arch, folder) of a random-weight model saved as safetensors (float32)."""
    torch.manual_seed(0)
    model = ARCHS[request.param]().eval()
    bias_std = 0.3 if request.param == "qwen2" else None
    return request.param, save_checkpoint(model, tmp_path_factory.mktemp(request.param), bias_std)


def reference(folder: str, device: str, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def prompts(n: int, lengths=(5, 17, 40, 77), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, SHAPE["vocab_size"], (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


def check_greedy(hf, prompt: list[int], ours: list[int]) -> int:
    """Teacher-forced: each of our tokens is the reference's argmax given the same prefix, up to
    the first near tie. Returns how many positions were checked."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours], device=hf.device)).logits[0, len(prompt) - 1 : -1].float()
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    stop = next((i for i, gap in enumerate(gaps) if gap < NEAR_TIE), len(ours))
    assert logits[:stop].argmax(dim=-1).tolist() == ours[:stop]
    return stop


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_float32_matches_transformers(checkpoint, device):
    arch, folder = checkpoint
    hf = reference(folder, device)
    batch = prompts(6)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(folder, device=device, dtype="float32", kv_cache_memory_gib=0.25, block_size=8, max_num_batched_tokens=48)
    assert llm.engine.runner.kv_caches[0].device.type == device
    together = [o.outputs[0].token_ids for o in llm.generate(batch, greedy)]  # batched, the long ones chunked
    alone = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in batch[:2]]  # and again: prefix hits
    assert alone == together[:2]
    assert llm.engine.kv.prefix_cache_hits > 0
    checked = sum(check_greedy(hf, p, ours) for p, ours in zip(batch, together))
    assert checked >= 0.5 * len(batch) * 24, f"{arch}: near ties cut the comparison short ({checked} positions)"


def teacher_forced_logits(llm: LLM, tokens: list[list[int]]) -> list[torch.Tensor]:
    """Our logits [len, vocab] for each sequence, computed in one step (no sampling)."""
    engine = llm.engine
    items = []
    for i, seq in enumerate(tokens):
        rid = f"tf-{i}"
        assert engine.kv.allocate_slots(rid, len(seq))
        items.append(RunItem(rid, seq, 0, engine.kv.block_ids(rid), False, None))
    logits = engine.runner.execute_logits(RunBatch(items)).float()
    for i in range(len(tokens)):
        engine.kv.free(f"tf-{i}")
    return list(logits.split([len(s) for s in tokens]))


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_top1_agrees_with_float32(checkpoint, device):
    arch, folder = checkpoint
    hf = reference(folder, device)
    seqs = prompts(8, lengths=(64,), seed=2)
    with torch.no_grad():
        ref = hf(torch.tensor(seqs, device=device)).logits.float()  # [8, 64, vocab]
    llm = LLM(folder, device=device, dtype="bfloat16", kv_cache_memory_gib=0.25)
    ours = teacher_forced_logits(llm, seqs)
    agree = total = 0
    for r, o in zip(ref, ours):
        top2 = r.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > BF16_GAP
        total += int(clear.sum())
        agree += int((r.argmax(-1) == o.to(r.device).argmax(-1))[clear].sum())
    assert total >= 0.5 * 8 * 64, f"{arch}: too few positions with a clear top-1 ({total})"
    assert agree / total >= 0.99, f"{arch}: bfloat16 top-1 agreement {agree}/{total}"


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_sampling_ignores_the_batch_and_a_host_tier_round_trips(checkpoint, device):
    _, folder = checkpoint
    llm = LLM(folder, device=device, dtype="float32", num_blocks=24, block_size=8, kv_host_memory_gib=0.05)
    batch = prompts(4, lengths=(60,), seed=3)
    sampled = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    alone = llm.generate(batch[0], sampled)[0].outputs[0].token_ids
    together = llm.generate(batch, sampled)  # evicts batch[0]'s cached blocks to the host tier
    assert together[0].outputs[0].token_ids == alone
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate(batch[1], greedy)[0].outputs[0].token_ids
    llm.generate(batch[2:], greedy)
    again = llm.generate(batch[1], greedy)[0]
    assert llm.engine.kv.connector.hits["host"] > 0 and again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == first
    llm.engine.kv.check_invariants()


@pytest.mark.cuda
def test_the_kv_cache_is_sized_from_free_gpu_memory(checkpoint):
    _, folder = checkpoint
    total = torch.cuda.mem_get_info()[1]
    llm = LLM(folder, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.2)
    used = total - torch.cuda.mem_get_info()[0]
    assert llm.engine.runner.num_blocks > 1000
    assert used <= 0.2 * total * 1.02  # weights + cache + the CUDA context within the share asked for
    out = llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    del llm, out  # its cache is most of the GPU: give it back before the next test sizes one
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.cuda
def test_the_server_runs_on_cuda(checkpoint):
    from fastapi.testclient import TestClient

    from xllm.config import EngineConfig
    from xllm.engine.async_llm import AsyncLLM
    from xllm.entrypoints.openai.server import ServerSettings, build_app

    _, folder = checkpoint
    llm = AsyncLLM.from_config(EngineConfig.create(model=folder, device="cuda", dtype="bfloat16", kv_cache_memory_gib=0.5), "tiny")
    with TestClient(build_app(llm, ServerSettings(model_name="tiny"))) as http:
        body = {"prompt": prompts(1)[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/completions", json=stream) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"completion_tokens":8' in events[-2]
        assert http.get("/health").status_code == 200


def test_the_profiled_steps_run_when_the_cache_is_sized_from_free_memory(checkpoint, monkeypatch):
    """What CUDA runs once to measure activations before it sizes the KV cache, run here through
    the CPU platform made to size the same way: the largest prefill (in sequences no longer than
    the context), a chunk over the longest context and a batch of decodes there, over a scratch
    cache; the real cache is allocated and bound after."""
    from xllm.platforms.cpu import CpuPlatform

    ran = []

    def kv_cache_bytes(self, cache, run_largest_steps):
        run_largest_steps()
        ran.append(True)
        return 1 << 22

    monkeypatch.setattr(CpuPlatform, "kv_cache_bytes", kv_cache_bytes)
    _, folder = checkpoint
    llm = LLM(folder, device="cpu", dtype="float32", max_model_len=300, max_num_batched_tokens=700, max_num_seqs=8)
    runner = llm.engine.runner
    assert ran and runner.num_blocks == (1 << 22) // (2 * SHAPE["num_hidden_layers"] * 16 * 2 * 64 * 4)
    assert all(layer.kv_cache is cache for layer, cache in zip(runner.model.attention_layers(), runner.kv_caches))
    out = llm.generate(prompts(2), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)
