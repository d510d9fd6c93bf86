"""GGUF loading: tokenizer, weight layout, the dequantization cache, and bad files."""

import os
import shutil

import numpy as np
import pytest
import torch
from samples import CONVERSATIONS, TEXTS

from xllm.config import ModelConfig
from xllm.engine.tokenizer import Tokenizer
from xllm.models.loader import ModelLoadError, load_model, resolve
from xllm.models.loader import gguf as gguf_mod
from xllm.models.loader.gguf import _unpermute_rope, open_gguf
from xllm.models.loader.gguf_tokenizer import build_gguf_tokenizer


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    backend, config = build_gguf_tokenizer(open_gguf(smollm2_gguf))
    return Tokenizer(backend, config)


def test_tokenizer_matches_transformers(gguf_tokenizer, hf_smollm2):
    hf_tok, _ = hf_smollm2
    for text in TEXTS:
        ours = gguf_tokenizer.encode(text)
        assert ours == hf_tok(text).input_ids, text
        assert gguf_tokenizer.decode(ours, skip_special_tokens=False) == text
    assert gguf_tokenizer.eos_token_id == hf_tok.eos_token_id == 2


def test_chat_template_renders_like_transformers(gguf_tokenizer, hf_smollm2):
    hf_tok, _ = hf_smollm2
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == theirs


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(w, n_head):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_rope(llama_cpp_permute(w, 3), 3), w)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)


def test_second_load_reuses_the_dequantized_cache(smollm2_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path))
    calls = []
    real = gguf_mod.convert_gguf_to_hf

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(resolve, "convert_gguf_to_hf", counting)
    first = load_model(ModelConfig(model=smollm2_gguf, dtype="bfloat16"))
    second = load_model(ModelConfig(model=smollm2_gguf, dtype="bfloat16"))
    assert len(calls) == 1
    assert first.folder == second.folder and first.folder.startswith(str(tmp_path))
    assert os.path.isfile(os.path.join(first.folder, "model.safetensors"))
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    # The cached folder is a complete HF folder: config, tokenizer, chat template.
    tok = Tokenizer.from_folder(first.folder)
    assert tok.chat_template and tok.eos_token_id == 2


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model(ModelConfig(model=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelLoadError, match="neither a Hugging Face folder"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_corrupt_gguf_is_a_clear_error(tmp_path, smollm2_gguf):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_model(ModelConfig(model=str(garbage)))
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelLoadError, match="not a valid GGUF"):
        load_model(ModelConfig(model=str(truncated)))


def test_hf_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, '
                                          '"intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig(model=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"architectures": ["GPTJForCausalLM"]}')
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_folder_holding_one_gguf_loads_it(smollm2_gguf, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    os.symlink(smollm2_gguf, target / "m.gguf")
    kind, path = resolve.resolve_model_source(str(target))
    assert kind == "gguf" and path.endswith("m.gguf")
    shutil.rmtree(target)
