"""Qwen2.5-Coder-0.5B-Instruct (catalog model, Q4_K_M GGUF), float32, against transformers.

The module fixture runs the explicit install (`xllm models install qwen2.5-coder-0.5b`; a verified
copy already in the cache is kept), then our engine and transformers read the same GGUF. Greedy
output must match token for token, under the near-tie rule (tests/near_tie.py): 2 raw prompts and
2 chats x 32 tokens.
"""

import json
import os
import time

import pytest
import torch
from near_tie import NEAR_TIE, teacher_forced

from xllm.entrypoints.cli import main
from xllm.models.catalog import CATALOG, installed_path

pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b"
MAX_TOKENS = 32
RAW_PROMPTS = ["def is_palindrome(s):", "The three laws of thermodynamics are"]
CHATS = [
    [{"role": "user", "content": "Write a function to reverse a string in Python."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is a closure?"},
        {"role": "assistant", "content": "A function with captured variables."},
        {"role": "user", "content": "Example?"},
    ],
]
TEXTS = [
    "def f(x):\n    return x**2  # square\n",
    "héllo wörld — 日本語のテキスト 🤖🚀 naïve café 2024-01-22 3.14159",
    "  leading spaces,\ttabs\n\n\nand blank lines  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "it's we'll I'M you'd THEY'RE x=1_000_000;y=3e-10",
]


def eog_token_ids(gguf_path: str) -> list[int]:
    """The end-of-generation ids our conversion wrote (generation_config.json)."""
    from xllm.models.loader.resolve import gguf_cache_folder

    with open(os.path.join(gguf_cache_folder(gguf_path, torch.float32), "generation_config.json")) as f:
        eos = json.load(f)["eos_token_id"]
    return eos if isinstance(eos, list) else [eos]


@pytest.fixture(scope="module")
def qwen_gguf():
    start = time.perf_counter()
    was_installed = installed_path(CATALOG[MODEL]) is not None
    assert main(["models", "install", MODEL, "--log-level", "warning"]) == 0
    what = "verified the installed copy" if was_installed else "installed"
    print(f"\n`xllm models install {MODEL}`: {what} in {time.perf_counter() - start:.1f} s")
    path = installed_path(CATALOG[MODEL])
    assert path is not None
    return path


@pytest.fixture(scope="module")
def hf_qwen(qwen_gguf):
    """transformers' own reading of the same GGUF: (tokenizer, float32 model)."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(qwen_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def qwen_llm(qwen_gguf):
    from xllm import LLM

    return LLM("Qwen2.5-Coder-0.5B-Instruct", dtype="float32", kv_cache_memory_gib=0.25)


def test_gguf_config_tokenizer_and_template(qwen_gguf, qwen_llm, hf_qwen):
    from xllm.models.loader.resolve import gguf_cache_folder

    hf_tok, hf_model = hf_qwen
    with open(os.path.join(gguf_cache_folder(qwen_gguf, torch.float32), "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["attention_bias"] is True
    # The GGUF has its own (Q8_0) output.weight, so the head is not tied to the (Q5_0) embedding.
    assert cfg["tie_word_embeddings"] is False and hf_model.config.tie_word_embeddings is False
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (24, 14, 2)
    tokenizer = qwen_llm.get_tokenizer()
    assert tokenizer.eos_token_id == hf_tok.eos_token_id == cfg["eos_token_id"] == 151645  # <|im_end|>
    # Generation also ends on <|endoftext|> (as in llama.cpp and Qwen's own generation_config.json).
    assert eog_token_ids(qwen_gguf) == [151645, 151643]
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tok(text).input_ids, text
    for messages in CHATS:
        for gen in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_greedy_matches_transformers_token_for_token(qwen_gguf, qwen_llm, hf_qwen):
    """Each of our greedy tokens is transformers' argmax given the same prefix (teacher forcing), up to a near tie.

    That is the same as transformers' own greedy decoding producing our tokens, checked with one
    forward pass per prompt instead of one per generated token (transformers' generate loop took
    over a minute here on 2 cores; the forward passes take seconds).
    """
    from xllm import SamplingParams

    hf_tok, hf_model = hf_qwen
    tokenizer = qwen_llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in RAW_PROMPTS]
    prompts += [tokenizer.encode(tokenizer.apply_chat_template(c), add_special_tokens=False) for c in CHATS]
    for chat, ids in zip(CHATS, prompts[len(RAW_PROMPTS) :]):
        assert ids == hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    start = time.perf_counter()
    ours = qwen_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    ours_s = time.perf_counter() - start
    eog = set(eog_token_ids(qwen_gguf))
    near_ties = 0
    start = time.perf_counter()
    for ids, out in zip(prompts, ours):
        tokens = out.outputs[0].token_ids
        # Our run ends at max_tokens, or at its first end-of-generation token.
        assert len(tokens) == MAX_TOKENS or tokens[-1] in eog, tokens
        assert not eog & set(tokens[:-1]), tokens
        stop, mismatch = teacher_forced(hf_model, ids, tokens)
        near_ties += stop < len(tokens)
        assert mismatch is None, (hf_tok.decode(ids), tokens, mismatch, hf_tok.decode(tokens[: mismatch + 1]))
        assert out.outputs[0].text == hf_tok.decode(tokens, skip_special_tokens=True)
    print(
        f"\n{len(prompts)} prompts x {MAX_TOKENS} tokens: {near_ties} cut short by a near tie (gap < {NEAR_TIE}); "
        f"ours {ours_s:.1f} s batched, transformers {time.perf_counter() - start:.1f} s (teacher-forced)"
    )
    assert near_ties <= 1, "too many near ties: the comparison would prove little"
    code = ours[2].outputs[0].text
    assert "def " in code and "reverse" in code.lower()


def test_tensor_parallel_2_equals_one_rank_and_transformers(qwen_gguf, qwen_llm, hf_qwen):
    """TP = 2 (14 query heads and 2 KV heads: an even split, 7 + 1 per rank) in worker processes:
    the same greedy tokens as one rank, each transformers' argmax up to a near tie."""
    from xllm import LLM, SamplingParams

    _, hf_model = hf_qwen
    tokenizer = qwen_llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in RAW_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    one = [o.outputs[0].token_ids for o in qwen_llm.generate(prompts, params)]
    tp2 = LLM("Qwen2.5-Coder-0.5B-Instruct", dtype="float32", kv_cache_memory_gib=0.25, tensor_parallel_size=2)
    try:
        two = [o.outputs[0].token_ids for o in tp2.generate(prompts, params)]
    finally:
        tp2.shutdown()
    for ids, a, b in zip(prompts, one, two):
        stop, mismatch = teacher_forced(hf_model, ids, b)
        assert mismatch is None and a[:stop] == b[:stop]
