"""GGUF files: read, dequantize, and turn into a Hugging Face style folder.

A GGUF is converted once into a folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) in the user cache, keyed by the file's sha256, the
dtype and CONVERSION_VERSION; every later load reads that folder through the ordinary HF loader,
so dequantization is paid once. The same conversion backs `xllm convert --to-hf`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch

from xllm.models.errors import ModelLoadError
from xllm.models.loader.gguf_tokenizer import build_gguf_tokenizer

logger = logging.getLogger(__name__)

# GGUF architecture -> (HF architecture class name, HF model_type)
GGUF_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}

# GGUF tensor name suffix (after "blk.N.") -> HF name suffix (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Token texts llama.cpp ends generation on (llama-vocab.cpp, "end-of-generation" tokens), besides the
# GGUF's own eos/eot/eom ids. Qwen2.5 GGUFs name only <|im_end|> as eos, yet a raw completion ends
# with <|endoftext|> (the original generation_config.json stops on both, and so does llama.cpp).
EOG_TOKEN_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
)
# Bumped whenever the folder written for a GGUF changes, so older cached conversions are not reused.
# 2: generation_config.json lists every end-of-generation token (EOG_TOKEN_TEXTS).
CONVERSION_VERSION = 2

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str):
    """A `gguf.GGUFReader` over the file, or a `ModelLoadError` that says what is wrong with it."""
    from gguf import GGUFReader

    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on bad files
        raise ModelLoadError(f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc})") from exc


def gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_arch(reader) -> str:
    arch = gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    return arch


def gguf_hf_config(reader) -> dict:
    """The HF config.json equivalent of a GGUF's metadata."""
    arch = gguf_arch(reader)
    hf_arch, model_type = GGUF_ARCHS[arch]

    def meta(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    names = {t.name for t in reader.tensors}
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    eot = gguf_field(reader, "tokenizer.ggml.eot_token_id")
    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(meta("vocab_size", len(tokens.data))),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": int(meta("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "hidden_act": "silu",
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
    }
    if eot is not None and eot != eos:
        cfg["eos_token_id"] = [eos, eot]
    return cfg


def gguf_eog_token_ids(reader, tokenizer) -> list[int]:
    """Every token that ends generation: the GGUF's eos, eot and eom ids, then llama.cpp's EOG texts."""
    ids = [gguf_field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    ids += [tokenizer.token_to_id(text) for text in EOG_TOKEN_TEXTS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> HF's rotate-half halves).

    llama.cpp's converter does `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`; this is its inverse.
    """
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
    return None


def iter_gguf_weights(reader, cfg: dict, desc: str = "dequantizing"):
    """Yield (HF name, float32 numpy array) for every tensor, dequantized, q/k un-permuted for Llama."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    permute = cfg["model_type"] == "llama"
    tensors = reader.tensors
    bar = tqdm(tensors, desc=desc, unit="tensor", delay=1.0, disable=not sys.stderr.isatty(), leave=False)
    for t in bar:
        name = hf_tensor_name(t.name)
        if name is None:
            if t.name.startswith("rope_") or t.name.endswith("rope_freqs.weight"):
                continue  # derived data (e.g. precomputed rope factors); we compute our own
            raise ModelLoadError(f"GGUF tensor {t.name!r} has no counterpart in {cfg['architectures'][0]}")
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {t.name} ({t.tensor_type.name}): {exc}") from exc
        expected = tuple(int(d) for d in reversed(t.shape))
        array = array.reshape(expected)
        if permute and name.endswith("q_proj.weight"):
            array = _unpermute_rope(array, cfg["num_attention_heads"])
        elif permute and name.endswith("k_proj.weight"):
            array = _unpermute_rope(array, cfg["num_key_value_heads"])
        yield name, array


def convert_gguf_to_hf(path: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    """Write a Hugging Face folder for the GGUF at `path` into `out_dir` (atomically); return it."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    reader = open_gguf(path)
    cfg = gguf_hf_config(reader)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer, tokenizer_config = build_gguf_tokenizer(reader)

    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights = {}
        for name, array in iter_gguf_weights(reader, cfg, desc=f"dequantizing {os.path.basename(path)}"):
            weights[name] = torch.from_numpy(np.require(array, requirements=["C", "W"])).to(dtype)
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt", "source": "gguf"})
        del weights
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        eog = gguf_eog_token_ids(reader, tokenizer)
        eos = (eog[0] if len(eog) == 1 else eog) if eog else cfg["eos_token_id"]
        generation = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tokenizer_config, f, indent=2)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    logger.info("converted %s to %s (%s) in %.1f s", path, out_dir, cfg["torch_dtype"], elapsed)
    return out_dir
