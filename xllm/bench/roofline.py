"""The work a decoder-only transformer must do: FLOPs for a batched workload, bytes for a decode step.

Counts are the minimum any engine needs, read off the architecture (not off an implementation):
an engine that computes more (logits for every prompt token, attention over masked-out keys)
simply reaches a smaller fraction of the roofline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing xllm.models.arch_config first is circular (it goes through the loader)
    from xllm.models.arch_config import ArchConfig


@dataclass(frozen=True)
class ModelCost:
    """Parameter counts and attention shape of one model."""

    body_params: int  # every weight a token passes through except the embedding table and lm_head
    lm_head_params: int
    embedding_params: int
    tied_embeddings: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_arch(cls, arch: ArchConfig) -> "ModelCost":
        """Count the weights of a Llama / Qwen2 / Qwen3 decoder from its architecture."""
        h, d = arch.hidden_size, arch.head_dim
        q, kv = arch.num_attention_heads * d, arch.num_key_value_heads * d
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if arch.attention_bias else 0)
        mlp = 3 * h * arch.intermediate_size
        norms = 2 * h + (2 * d if arch.model_type == "qwen3" else 0)  # Qwen3 normalizes q and k per head
        return cls(
            body_params=arch.num_hidden_layers * (attention + mlp + norms) + h,  # + the final norm
            lm_head_params=arch.vocab_size * h,
            embedding_params=arch.vocab_size * h,
            tied_embeddings=arch.tie_word_embeddings,
            num_layers=arch.num_hidden_layers,
            num_heads=arch.num_attention_heads,
            num_kv_heads=arch.num_key_value_heads,
            head_dim=d,
            vocab_size=arch.vocab_size,
        )

    @property
    def total_params(self) -> int:
        """Parameters stored, counting a tied embedding / lm_head matrix once."""
        return self.body_params + self.embedding_params + (0 if self.tied_embeddings else self.lm_head_params)

    @property
    def flops_per_token(self) -> float:
        """2 × (body + lm_head) parameters: one multiply-add per weight for a token that is sampled."""
        return 2.0 * (self.body_params + self.lm_head_params)

    def sequence_flops(self, input_len: int, output_len: int) -> float:
        """FLOPs to generate `output_len` tokens after an `input_len`-token prompt.

        The model runs on input_len + output_len - 1 tokens (the last sampled token is never fed
        back); the lm_head runs only where a token is sampled (the prompt's last position and each
        decode); a token at position p (1-based) attends causally to p keys, at 4 × heads ×
        head_dim FLOPs per key per layer (q·k and p·v).
        """
        fed = input_len + output_len - 1
        linear = 2.0 * (self.body_params * fed + self.lm_head_params * output_len)
        attention = 4.0 * self.num_layers * self.num_heads * self.head_dim * fed * (fed + 1) / 2
        return linear + attention

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V one cached token holds across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def decode_bytes(self, context: float, dtype_bytes: int) -> float:
        """Bytes one batch-1 decode step reads: every weight once (a tied matrix once, as the
        lm_head; the embedding lookup reads one row) plus the KV cache of `context` tokens."""
        return (self.body_params + self.lm_head_params) * dtype_bytes + self.kv_bytes_per_token(dtype_bytes) * context


def mean_decode_context(input_len: int, output_len: int) -> float:
    """Mean number of keys attended over the `output_len` decode steps after an `input_len` prompt
    (the steps that feed tokens input_len+1 ... input_len+output_len)."""
    return input_len + (output_len + 1) / 2
