"""Hugging Face folders: config.json, *.safetensors, tokenizer files."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Iterator

import torch

from xllm.models.errors import ModelLoadError


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{folder} is not a model folder: it has no config.json")
    cfg = read_json(path)
    gen = read_json(os.path.join(folder, "generation_config.json"))
    if gen.get("eos_token_id") is not None:
        # generation_config's eos list (e.g. Qwen's <|im_end|> and <|endoftext|>) is what generate() stops on.
        cfg = {**cfg, "eos_token_id": gen["eos_token_id"]}
    return cfg


def safetensors_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weight files")
    return files


def iter_safetensors(folder: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor in `dtype`) for every weight in the folder, with a progress bar on a terminal."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(folder)
    names = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.extend((path, n) for n in f.keys())
    bar = tqdm(total=len(names), desc="loading weights", unit="tensor", delay=1.0, disable=not sys.stderr.isatty(), leave=False)
    try:
        for path in files:
            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"cannot read weights {path}: {exc}") from exc
            with handle as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
                    bar.update(1)
    finally:
        bar.close()
