"""Sampling and output features end to end on SmolLM2 (float32), checked against transformers
or a direct computation."""

import pytest
import torch

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"  # greedy: " Paris.\n\nThe answer is: 2018-01-22 ..."


def test_stop_string_across_tokens(smollm2_llm):
    out = smollm2_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=["s.\n\nT"]))[0].outputs[0]
    assert out.text == " Pari" and out.finish_reason == "stop" and out.stop_reason == "s.\n\nT"
    out = smollm2_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=20, stop=["s.\n\nT"], include_stop_str_in_output=True)
    )[0].outputs[0]
    assert out.text == " Paris.\n\nT"


def test_streaming_pieces_add_up_to_the_final_text(smollm2_llm):
    engine = smollm2_llm.engine
    params = [
        SamplingParams(temperature=1.2, seed=s, max_tokens=40, stop=stop)
        for s, stop in [(1, []), (2, ["the"]), (3, ["\n"])]
    ]
    prompts = ["Write in Japanese: 日本語で", "Emoji story: 🐱", PROMPT]
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    pieces = {rid: [] for rid in ids}
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            pieces[out.request_id].append(out.outputs[0].delta_text)
            if out.finished:
                final[out.request_id] = out.outputs[0].text
    for rid in ids:
        assert "".join(pieces[rid]) == final[rid]
        if "\ufffd" not in final[rid]:
            assert all("\ufffd" not in p for p in pieces[rid])
    assert any(ord(c) > 127 for text in final.values() for c in text)  # multi-byte text really occurred


def test_n_samples_share_prompt_blocks_and_match_independent_runs(smollm2_llm):
    engine = smollm2_llm.engine
    shared = []
    original = engine.kv.share_prefix

    def spy(src, dst, n):
        covered = original(src, dst, n)
        shared.append(covered)
        return covered

    engine.kv.share_prefix = spy
    try:
        prompt = "Here is a long shared prompt about the history of bread. " * 8
        n_params = SamplingParams(n=4, temperature=1.0, seed=100, max_tokens=12, ignore_eos=True)
        group = smollm2_llm.generate(prompt, n_params)[0]
    finally:
        engine.kv.share_prefix = original
    prompt_len = len(group.prompt_token_ids)
    assert len(shared) == 3 and all(c >= prompt_len - 16 and c > 0 for c in shared)
    assert [o.index for o in group.outputs] == [0, 1, 2, 3]
    texts = [o.token_ids for o in group.outputs]
    assert len({tuple(t) for t in texts}) > 1
    # Sample i is exactly the n=1 request with seed 100 + i, computed without any sharing.
    for i, tokens in enumerate(texts):
        alone = smollm2_llm.generate(prompt, SamplingParams(temperature=1.0, seed=100 + i, max_tokens=12, ignore_eos=True))
        assert alone[0].outputs[0].token_ids == tokens
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_logprobs_match_transformers(smollm2_llm, hf_smollm2):
    _, hf_model = hf_smollm2
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=10, logprobs=3, prompt_logprobs=2)
    out = smollm2_llm.generate(PROMPT, params)[0]
    ids, gen = out.prompt_token_ids, out.outputs[0].token_ids
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids + gen])).logits[0].float().log_softmax(-1)
    # Prompt logprobs: token i scored by position i - 1; the first has none.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for i in range(1, len(ids)):
        entry = out.prompt_logprobs[i]
        assert abs(entry[ids[i]].logprob - float(ref[i - 1, ids[i]])) < 1e-4
        assert len(entry) <= 3  # the actual token plus the top 2 (fewer if it is among them)
        top = ref[i - 1].topk(2).indices.tolist()
        assert all(t in entry for t in top)
    # Generated tokens: the sampled one plus the top 3, with ranks.
    assert len(out.outputs[0].logprobs) == len(gen)
    for j, (tok, entry) in enumerate(zip(gen, out.outputs[0].logprobs)):
        row = ref[len(ids) - 1 + j]
        assert abs(entry[tok].logprob - float(row[tok])) < 1e-4
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert entry[tok].decoded_token == smollm2_llm.get_tokenizer().decode([tok], skip_special_tokens=False)


def test_prompt_logprobs_survive_chunked_prefill(hf_smollm2):
    _, hf_model = hf_smollm2
    llm = LLM(dtype="float32", max_num_batched_tokens=16, kv_cache_memory_gib=0.25)
    text = "Prompt logprobs are what loglikelihood evaluations need, token by token, " * 3
    out = llm.generate(text, SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ids = out.prompt_token_ids
    assert len(ids) > 40
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    got = torch.tensor([out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    want = torch.tensor([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_repetition_penalty_matches_transformers(smollm2_llm, hf_smollm2):
    _, hf_model = hf_smollm2
    prompt = "List the days of the week: Monday, Tuesday,"
    out = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3))[0]
    ids = out.prompt_token_ids
    ref = hf_model.generate(
        torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3, pad_token_id=2
    )[0, len(ids) :].tolist()
    plain = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0].token_ids
    assert out.outputs[0].token_ids == ref
    assert plain != ref  # the penalty mattered


def test_min_tokens_suppresses_early_eos(smollm2_llm):
    chat = [{"role": "user", "content": "Say hello."}]
    free = smollm2_llm.chat(chat, SamplingParams(temperature=0, max_tokens=100))[0].outputs[0]
    forced = smollm2_llm.chat(chat, SamplingParams(temperature=0, max_tokens=100, min_tokens=len(free.token_ids) + 10))[0].outputs[0]
    assert free.finish_reason == "stop"
    assert len(forced.token_ids) >= len(free.token_ids) + 10
    assert 2 not in forced.token_ids[: len(free.token_ids) + 9]


def test_presence_and_frequency_penalties_reduce_repetition(smollm2_llm):
    prompt = "Repeat after me: cat cat cat cat cat cat"
    base = smollm2_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].token_ids
    pen = smollm2_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=1.5, presence_penalty=1.0)
    )[0].outputs[0].token_ids
    assert len(set(pen)) > len(set(base))


def test_logit_bias_forces_a_token(smollm2_llm):
    out = smollm2_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, logit_bias={7042: -100.0}))[0]
    assert 7042 not in out.outputs[0].token_ids  # " Paris" banned
    out = smollm2_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, logit_bias={30: 100.0}))[0]
    assert out.outputs[0].token_ids == [30, 30, 30]
