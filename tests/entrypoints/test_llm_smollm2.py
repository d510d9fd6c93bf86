"""The real SmolLM2-135M-Instruct, float32, against transformers reading the same GGUF.

Near-tie rule: where the reference's top-2 logits differ by less than 1e-3, either token is a
correct greedy choice, so comparison stops at that position. Tests report how many cases it hit.
"""

import pytest
import torch
from near_tie import compare, first_near_tie

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "And a vegetable?"},
    ],
]
MIXED_TEXTS = [
    "Hi",
    "List five animals that live in the ocean and describe each one briefly.",
    "The history of the Roman Empire spans many centuries. " * 12,
    "import numpy as np\nx = np.arange(10)\n",
    "Translate to French: I like apples.",
    "A" * 3,
    "In mathematics, a prime number is a natural number greater than 1 that is not a product of two smaller "
    "natural numbers. " * 3,
    "Q: What is 12 times 12?\nA:",
    "The quick brown fox",
    "Explain photosynthesis to a child.",
    "Dear diary, today I",
    "Recipe for pancakes:\n1.",
    "The weather today is " * 10,
    "Once there was a robot who",
    "SELECT * FROM users WHERE",
    "Knock knock.",
]


def test_greedy_matches_transformers_token_for_token(smollm2_llm, hf_smollm2):
    hf_tok, hf_model = hf_smollm2
    tokenizer = smollm2_llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in RAW_PROMPTS]
    prompts += [tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False) for c in CHATS]
    for chat, ids in zip(CHATS, prompts[len(RAW_PROMPTS) :]):
        assert ids == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(temperature=0, max_tokens=32)
    ours = smollm2_llm.generate(prompts, params)
    near_ties = 0
    for ids, out in zip(prompts, ours):
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=2)[0, len(ids) :].tolist()
        stop = first_near_tie(hf_model, ids, ref)
        near_ties += stop < len(ref)
        assert compare(ref, out.outputs[0].token_ids, stop), (hf_tok.decode(ids), ref, out.outputs[0].token_ids)
        assert out.outputs[0].text == hf_tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
    print(f"\n{len(prompts)} prompts x 32 tokens: {near_ties} cut short by a near tie")
    assert near_ties <= 2, "too many near ties: the comparison would prove little"


def test_chat_api_and_finish_reasons(smollm2_llm):
    out = smollm2_llm.chat(CHATS[0], SamplingParams(temperature=0, max_tokens=200))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] == 2  # <|im_end|>, not part of the text
    assert "100°C" in out.outputs[0].text and "<|im_end|>" not in out.outputs[0].text
    out = smollm2_llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 5
    out = smollm2_llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[7042])
    )[0]
    assert out.outputs[0].token_ids == [7042] and out.outputs[0].finish_reason == "stop"  # " Paris"


def test_ignore_eos_runs_to_max_tokens(smollm2_llm):
    hello = [{"role": "user", "content": "Say hello."}]  # answered in ~30 tokens, then <|im_end|>
    out = smollm2_llm.chat(hello, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 60 and out.outputs[0].finish_reason == "length"
    assert 2 in out.outputs[0].token_ids


def _greedy(llm, prompts, n=24):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))]


@pytest.fixture(scope="module")
def mixed_prompts(smollm2_llm):
    tokenizer = smollm2_llm.get_tokenizer()
    return [tokenizer.encode(t) for t in MIXED_TEXTS]


@pytest.fixture(scope="module")
def alone_outputs(smollm2_llm, mixed_prompts):
    return [_greedy(smollm2_llm, [p])[0] for p in mixed_prompts]


def _check_invariance(hf_model, prompts, alone, others, label):
    cut = 0
    for p, a, b in zip(prompts, alone, others):
        stop = first_near_tie(hf_model, p, a)
        cut += stop < len(a)
        assert compare(a, b, stop), (label, p[:10], a, b)
    print(f"\n{label}: {len(prompts)} requests, {cut} cut short by a near tie")


def test_batch_of_16_mixed_lengths_matches_alone(smollm2_llm, mixed_prompts, alone_outputs, hf_smollm2):
    lengths = sorted(len(p) for p in mixed_prompts)
    assert lengths[0] < 5 and lengths[-1] > 100
    batched = _greedy(smollm2_llm, mixed_prompts)
    _check_invariance(hf_smollm2[1], mixed_prompts, alone_outputs, batched, "batch of 16")


def test_chunked_prefill_matches_alone(mixed_prompts, alone_outputs, hf_smollm2):
    llm = LLM(dtype="float32", max_num_batched_tokens=24, kv_cache_memory_gib=0.25)
    steps = []
    original = llm.engine.scheduler.schedule

    def spy():
        out = original()
        steps.append([s.num_tokens for s in out.scheduled])
        return out

    llm.engine.scheduler.schedule = spy
    chunked = _greedy(llm, mixed_prompts)
    assert max(sum(s) for s in steps) <= 24
    assert any(len(s) > 1 and 1 in s and max(s) > 1 for s in steps), "decodes never ran beside a prompt chunk"
    _check_invariance(hf_smollm2[1], mixed_prompts, alone_outputs, chunked, "chunked prefill, budget 24")


def test_preemption_matches_alone(mixed_prompts, alone_outputs, hf_smollm2):
    # 40 blocks of 16 tokens = 640 token slots for ~1,000 tokens of 16 sequences: preemption is forced.
    llm = LLM(dtype="float32", num_blocks=40, block_size=16)
    preempted = _greedy(llm, mixed_prompts)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv.num_free_blocks == 40
    _check_invariance(hf_smollm2[1], mixed_prompts, alone_outputs, preempted, "after preemption")


def test_seeded_sampling_is_reproducible_across_batches(smollm2_llm, mixed_prompts):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = mixed_prompts[1]
    alone = smollm2_llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=20)] * 6 + [SamplingParams(temperature=0.7, seed=7, max_tokens=9)]
    batch = smollm2_llm.generate(mixed_prompts[2:9] + [prompt], others + [seeded])[-1].outputs[0].token_ids
    assert alone == batch
    small_budget = LLM(dtype="float32", max_num_batched_tokens=16, kv_cache_memory_gib=0.25)
    assert small_budget.generate(mixed_prompts[:5] + [prompt], [others[0]] * 5 + [seeded])[-1].outputs[0].token_ids == alone
    different = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=4321, max_tokens=20, ignore_eos=True)
    assert smollm2_llm.generate([prompt], different)[0].outputs[0].token_ids != alone


def test_bad_input_is_refused_and_the_engine_stays_usable(smollm2_llm):
    llm = smollm2_llm
    with pytest.raises(ValueError, match="empty"):
        llm.generate("")
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=rf"prompt has {limit + 5} tokens.*{limit}"):
        llm.generate([[100] * (limit + 5)])
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[1, 2, 10**9]])
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("hi", SamplingParams(temperature=-1))
    # One bad prompt among good ones queues nothing.
    with pytest.raises(ValueError):
        llm.generate(["good prompt", ""])
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=3))[0]
    assert out.outputs[0].text.startswith(" Paris")
