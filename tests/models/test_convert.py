"""`xllm convert GGUF --to-hf DIR` writes a folder transformers loads like the GGUF itself."""

import json
import os

import pytest
import torch
from samples import CONVERSATIONS, TEXTS

from xllm.entrypoints.cli import main

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "smollm2-hf"
    assert main(["convert", smollm2_gguf, "--to-hf", str(out), "--log-level", "warning"]) == 0
    return out


def test_convert_writes_a_complete_hf_folder(converted):
    names = set(os.listdir(converted))
    assert names >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    assert not any(n.startswith(".") or "tmp" in n for n in names)
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert "<|im_start|>" in json.loads((converted / "tokenizer_config.json").read_text())["chat_template"]
    # <|im_end|> (the GGUF's eos) first, then <|endoftext|>, which llama.cpp also ends generation on.
    assert json.loads((converted / "generation_config.json").read_text())["eos_token_id"] == [2, 0]


def test_transformers_loads_the_folder_like_the_gguf(converted, hf_smollm2):
    transformers = pytest.importorskip("transformers")
    ref_tok, ref_model = hf_smollm2
    tok = transformers.AutoTokenizer.from_pretrained(str(converted))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    for text in TEXTS:
        assert tok(text).input_ids == ref_tok(text).input_ids, text
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = torch.tensor([ref_tok(TEXTS[0] + " " + TEXTS[5]).input_ids])
    with torch.no_grad():
        ours, ref = model(ids).logits, ref_model(ids).logits
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_convert_from_a_catalog_name_and_to_bfloat16(converted, smollm2_gguf, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert main(["convert", "SmolLM2-135M-Instruct", "--to-hf", str(out), "--dtype", "bfloat16", "--log-level", "warning"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
