"""The architecture description a model is built from, read from a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.models.errors import ModelLoadError
from xllm.models.registry import get_model_class


@dataclass(frozen=True)
class ArchConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    hidden_act: str = "silu"
    rope_scaling: tuple | None = None  # sorted items of the rope_scaling dict, if any
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        if not archs:
            raise ModelLoadError("config.json names no architecture ('architectures' is missing)")
        get_model_class(archs[0])  # fail on an unsupported architecture before reading its fields
        try:
            return cls._from_hf(cfg, archs[0])
        except KeyError as exc:
            raise ModelLoadError(f"config.json lacks {exc.args[0]!r}, needed for {archs[0]}") from None

    @classmethod
    def _from_hf(cls, cfg: dict, architecture: str) -> "ArchConfig":
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type", "")
        # Qwen2 always has q/k/v biases and no attention_bias key; Llama and Qwen3 say so.
        bias = cfg.get("attention_bias", model_type == "qwen2")
        rope = cfg.get("rope_scaling") or None
        params = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
        if rope is None and params.get("rope_type", "default") != "default":
            rope = {k: v for k, v in params.items() if k != "rope_theta"}
        if rope is not None and rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=bool(bias),
            hidden_act=cfg.get("hidden_act", "silu"),
            rope_scaling=tuple(sorted(rope.items())) if rope else None,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
