"""Loading a model and its tokenizer from local files (never from the network)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xllm.config import ModelConfig, dtype_name, parse_dtype
from xllm.models.arch_config import ArchConfig
from xllm.models.errors import ModelLoadError
from xllm.models.loader.hf import iter_safetensors, read_hf_config
from xllm.models.loader.resolve import ensure_gguf_converted, resolve_model_source
from xllm.models.registry import get_model_class

if TYPE_CHECKING:
    from xllm.platforms import Platform

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_model"]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ArchConfig
    tokenizer: "object | None"  # xllm.engine.tokenizer.Tokenizer, or None for a folder without one
    folder: str
    dtype: torch.dtype
    source: str  # the GGUF file or folder the user named


def load_model(config: ModelConfig, platform: "Platform | None" = None) -> LoadedModel:
    """Load the model onto the platform's device (the CPU when none is given), in the dtype the
    platform resolves from the one asked for and the checkpoint's."""
    from xllm.engine.tokenizer import Tokenizer
    from xllm.platforms import get_platform

    platform = platform or get_platform("cpu")
    start = time.perf_counter()
    requested = parse_dtype(config.dtype)
    kind, path = resolve_model_source(config.model)
    if kind == "gguf":
        dtype = platform.resolve_dtype(requested, None, is_gguf=True)
        folder = ensure_gguf_converted(path, dtype)
    else:
        folder = path
    arch = ArchConfig.from_hf(read_hf_config(folder))
    if kind == "hf":
        dtype = platform.resolve_dtype(requested, arch.torch_dtype, is_gguf=False)
    with torch.device(platform.device):  # parameters and buffers are created on the device
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
    logger.info("loaded %s (%s, %s, %s) in %.1f s", path, arch.architecture, dtype_name(dtype), platform.device, elapsed)
    return LoadedModel(model, arch, tokenizer, folder, dtype, path)
