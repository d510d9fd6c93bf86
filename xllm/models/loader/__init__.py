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
    from xllm.distributed import TensorParallel
    from xllm.platforms import Platform

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_model", "load_model_info"]


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # None from `load_model_info`
    arch: ArchConfig
    tokenizer: "object | None"  # xllm.engine.tokenizer.Tokenizer, or None for a folder without one
    folder: str
    dtype: torch.dtype
    source: str  # the GGUF file or folder the user named


def load_model_info(config: ModelConfig, platform: "Platform | None" = None) -> LoadedModel:
    """Everything `load_model` gives but the weights (`model` is None): the architecture, the
    dtype, the tokenizer. What an engine whose workers load the weights needs (a GGUF is
    converted here, once, before they start)."""
    from xllm.platforms import get_platform

    platform = platform or get_platform("cpu")
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
    return LoadedModel(None, arch, _load_tokenizer(config, folder), folder, dtype, path)


def _load_tokenizer(config: ModelConfig, folder: str):
    from xllm.engine.tokenizer import Tokenizer

    try:
        return Tokenizer.from_folder(config.tokenizer or folder)
    except ModelLoadError:
        if config.tokenizer:
            raise
        logger.warning("%s has no tokenizer: only token-id prompts can be used", folder)
        return None


def load_model(config: ModelConfig, platform: "Platform | None" = None, tp: "TensorParallel | None" = None) -> LoadedModel:
    """Load the model onto the platform's device (the CPU when none is given), in the dtype the
    platform resolves from the one asked for and the checkpoint's; under tensor parallelism
    (`tp`), this rank's shard of it."""
    from xllm.platforms import get_platform

    platform = platform or get_platform("cpu")
    start = time.perf_counter()
    info = load_model_info(config, platform)
    arch, dtype = info.arch, info.dtype
    with torch.device(platform.device):  # parameters and buffers are created on the device
        cls = get_model_class(arch.architecture)
        model = cls(arch, dtype) if tp is None or tp.size == 1 else cls(arch, dtype, tp=tp)
    model.load_weights(iter_safetensors(info.folder, dtype))
    model.eval()
    info.model = model
    elapsed = time.perf_counter() - start
    shard = f", rank {tp.rank} of {tp.size}" if tp is not None and tp.size > 1 else ""
    logger.info("loaded %s (%s, %s, %s%s) in %.1f s", info.source, arch.architecture, dtype_name(dtype), platform.device,
                shard, elapsed)
    return info
