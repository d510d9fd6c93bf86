"""Architecture name (as in config.json's "architectures") -> model class, imported lazily."""

from __future__ import annotations

import importlib

from xllm.models.errors import ModelLoadError

_MODELS = {
    "LlamaForCausalLM": ("xllm.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("xllm.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("xllm.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str):
    try:
        module, name = _MODELS[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported (supported: {', '.join(supported_architectures())})"
        ) from None
    return getattr(importlib.import_module(module), name)
