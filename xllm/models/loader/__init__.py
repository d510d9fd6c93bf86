"""Loading a model and its tokenizer from local files (never from the network)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from xllm.config import ModelConfig, dtype_name, parse_dtype
from xllm.models.arch_config import ArchConfig
from xllm.models.loader.errors import ModelLoadError
from xllm.models.loader.hf import iter_safetensors, read_hf_config
from xllm.models.loader.resolve import ensure_gguf_converted, resolve_model_source
from xllm.models.registry import get_model_class

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "resolve_dtype"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ArchConfig
    tokenizer: "object | None"  # xllm.engine.tokenizer.Tokenizer, or None for a folder without one
    folder: str
    dtype: torch.dtype
    source: str  # the GGUF file or folder the user named


def resolve_dtype(requested: str, kind: str, arch: ArchConfig | None) -> torch.dtype:
    dtype = parse_dtype(requested)
    if dtype is not None:
        return dtype
    if kind == "gguf" or arch is None or not arch.torch_dtype:
        return torch.float32
    # A half-precision checkpoint runs in bfloat16 on a CPU (float16 matmuls are slow there).
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.bfloat16}.get(arch.torch_dtype, torch.float32)


def load_model(config: ModelConfig) -> LoadedModel:
    from xllm.engine.tokenizer import Tokenizer

    start = time.perf_counter()
    kind, path = resolve_model_source(config.model)
    if kind == "gguf":
        dtype = resolve_dtype(config.dtype, kind, None)
        folder = ensure_gguf_converted(path, dtype)
    else:
        folder = path
    arch = ArchConfig.from_hf(read_hf_config(folder))
    if kind == "hf":
        dtype = resolve_dtype(config.dtype, kind, arch)
    model = get_model_class(arch.architecture)(arch, dtype)
    model.load_weights(iter_safetensors(folder, dtype))
    model.eval()
    tokenizer_folder = config.tokenizer or folder
    try:
        tokenizer = Tokenizer.from_folder(tokenizer_folder)
    except ModelLoadError:
        if config.tokenizer:
            raise
        logger.warning("%s has no tokenizer: only token-id prompts can be used", folder)
        tokenizer = None
    elapsed = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) in %.1f s", path, arch.architecture, dtype_name(dtype), elapsed)
    return LoadedModel(model, arch, tokenizer, folder, dtype, path)
