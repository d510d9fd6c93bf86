"""The Llama family: Llama, and the Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) variants.

Tokens are flat: every tensor is [T, ...] for the T new tokens of a step, whatever sequences they
belong to; the attention layer sorts out which tokens see which (from the forward context).

Tensor parallelism (`tp`, xllm/distributed/): each rank holds whole KV-head groups of every layer
(q/k/v column-parallel, o_proj row-parallel), a share of the MLP's intermediate dimension
(gate/up column-, down row-parallel) and a share of the vocabulary (embedding and LM head). The
model all-reduces after o_proj, after down_proj and after the embedding; logits are gathered (or,
for greedy rows, only each rank's best token: `greedy_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from xllm.distributed import TensorParallel
from xllm.layers.attention import Attention
from xllm.layers.forward_context import get_attn_metadata
from xllm.layers.linear import Embedding, Linear, MergedLinear
from xllm.layers.norm import RMSNorm
from xllm.layers.rotary import RotaryEmbedding
from xllm.models.arch_config import ArchConfig
from xllm.models.errors import ModelLoadError
from xllm.ops import cpu_kernels


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        d = self.head_dim = cfg.head_dim
        (q_start, self.num_heads), (kv_start, self.num_kv_heads) = tp.head_shard(cfg.num_attention_heads,
                                                                                  cfg.num_key_value_heads)
        h, kv = self.num_heads * d, self.num_kv_heads * d
        sharded = tp.size > 1
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": h, "k": kv, "v": kv}, bias=cfg.attention_bias, dtype=dtype,
                                     part_starts={"q": q_start * d, "k": kv_start * d, "v": kv_start * d} if sharded else None)
        self.o_proj = Linear(h, cfg.hidden_size, dtype=dtype, cols=(q_start * d, h) if sharded else None)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim**-0.5)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.apply(q, k, *rope)
        return self.tp.all_reduce(self.o_proj(self.attn(q, k, v)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, tp: TensorParallel):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ModelLoadError(f"hidden_act {cfg.hidden_act!r} is not supported")
        self.tp = tp
        start, size = tp.shard(cfg.intermediate_size)
        sharded = tp.size > 1
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": size, "up": size}, dtype=dtype,
                                         part_starts={"gate": start, "up": start} if sharded else None)
        self.down_proj = Linear(size, cfg.hidden_size, dtype=dtype, cols=(start, size) if sharded else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(cpu_kernels.silu_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, dtype, qk_norm, tp)
        self.mlp = LlamaMLP(cfg, dtype, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope, x, residual):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _fusable_cache(cache: torch.Tensor | None) -> bool:
    return cache is not None and cache.dtype in _FUSED_DTYPES and cache.is_contiguous() and cpu_kernels.on_cpu(cache)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, dtype: torch.dtype, qk_norm: bool, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, scaling)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      shard=tp.shard(cfg.vocab_size) if tp.size > 1 else None, tp=tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, dtype, qk_norm, tp) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary.cos_sin(positions, x.dtype)
        fused = self._fused_decode(x, rope)
        if fused is not None:
            x, residual = fused
        else:
            for layer in self.layers:
                x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x

    def _fused_decode(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode-only step (one token per sequence, paged KV, float32 or bfloat16, kernel-sized)
        runs each layer in one C++ call (`cpu_kernels.decode_layer`): the same kernels as the module
        path, without the Python between them. None when the step or the model does not qualify.
        A bfloat16 model's activations stay in float32 through the layers (its weights and cache
        stay bfloat16) and are rounded back to bfloat16 after the last one. Under tensor
        parallelism each layer is two calls, split at its two all-reduces."""
        tp = self.tp
        if not cpu_kernels.decode_layer_ready(x) or (tp.size > 1 and not cpu_kernels.decode_layer_split_ready()):
            return None
        md = get_attn_metadata()
        if md.prefills or md.decode_slots is not None or md.decode_rows.numel() != x.shape[0] or md.decode_seq_lens is None:
            return None
        layers = self._decode_layer_args()
        if layers is None or not all(_fusable_cache(attn.kv_cache) for _, attn, _ in layers):
            return None
        cos, sin = rope
        dtype, residual = x.dtype, None
        x = x.float()
        for weights, attn, eps in layers:
            if tp.size == 1:
                x, residual = cpu_kernels.decode_layer(
                    x, residual, *weights, cos, sin, attn.kv_cache, md.decode_block_tables, md.decode_seq_lens,
                    md.slot_mapping, attn.num_heads, attn.num_kv_heads, eps, attn.scale,
                )
                continue
            ln1, qkv_w, qkv_b, o_w, ln2, gate_up_w, down_w = weights
            o, residual = cpu_kernels.decode_attn(
                x, residual, ln1, qkv_w, qkv_b, o_w, cos, sin, attn.kv_cache, md.decode_block_tables,
                md.decode_seq_lens, md.slot_mapping, attn.num_heads, attn.num_kv_heads, eps, attn.scale,
            )
            x, residual = cpu_kernels.decode_mlp(tp.all_reduce(o), residual, ln2, gate_up_w, down_w, eps)
            tp.all_reduce(x)
        return x.to(dtype), residual.to(dtype)

    def _decode_layer_args(self):
        """Per layer: (its weights in `decode_layer`'s order, its attention module, its norms' eps);
        None when a layer does not qualify (per-head q/k norms, weights not float32 or bfloat16 and
        contiguous). Built once: the tuples hold the matmul weights themselves, so moving their data
        (huge pages) is followed; the norm weights, a few KiB, as float32 copies."""
        if not hasattr(self, "_decode_args"):
            args = []
            for layer in self.layers:
                a, mlp = layer.self_attn, layer.mlp
                ln1, ln2 = (n.weight.detach().float() for n in (layer.input_layernorm, layer.post_attention_layernorm))
                weights = (ln1, a.qkv_proj.weight, a.qkv_proj.bias, a.o_proj.weight, ln2, mlp.gate_up_proj.weight,
                           mlp.down_proj.weight)
                ok = a.q_norm is None and all(
                    w is None or (w.dtype in _FUSED_DTYPES and w.is_contiguous()) for w in weights
                ) and layer.input_layernorm.eps == layer.post_attention_layernorm.eps and cpu_kernels.on_cpu(*weights)
                if not ok:
                    args = None
                    break
                args.append((weights, a.attn, layer.input_layernorm.eps))
            self._decode_args = args
        return self._decode_args


class LlamaForCausalLM(nn.Module):
    qk_norm = False
    # HF name piece -> (our merged module name, part)
    stacked = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ArchConfig, dtype: torch.dtype = torch.float32, tp: TensorParallel | None = None):
        super().__init__()
        self.config = cfg
        self.tp = tp = tp or TensorParallel()
        self.model = LlamaModel(cfg, dtype, self.qk_norm, tp)
        vocab = tp.shard(cfg.vocab_size) if tp.size > 1 else None
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, vocab[1] if vocab else cfg.vocab_size, dtype=dtype, rows=vocab)
        self.lm_head_packed: torch.Tensor | None = None
        # Norm weights are created in float32 by RMSNorm; keep them in the model dtype like HF does.
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.to(dtype)
                module.weight.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] (this rank's share of the vocabulary
        under tensor parallelism when not `gather`)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = cpu_kernels.linear(hidden, weight, None, self.lm_head_packed).float()
        return self.tp.gather_last(logits, self.config.vocab_size) if gather else logits

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The argmax token of each row, [N] long: under tensor parallelism from each rank's best
        over its share of the vocabulary, without gathering the logits."""
        if self.tp.size == 1:
            return cpu_kernels.argmax(self.compute_logits(hidden))
        return self.tp.argmax_last(self.compute_logits(hidden, gather=False), self.config.vocab_size)

    def prepack_weights(self) -> int:
        """oneDNN-blocked float32 copies of the projection and LM-head weights (`cpu_kernels.prepack`:
        float32 weights for 33-128-row batches, bfloat16 ones widened for every batch past the
        skinny kernel where the CPU has no native bfloat16); returns the bytes they take."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        for m in linears:
            m.prepack()
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        self.lm_head_packed = cpu_kernels.prepack(weight)
        packed = [m.packed for m in linears] + [self.lm_head_packed]
        return sum(p.numel() * p.element_size() for p in packed if p is not None)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied to the embedding
            for piece, (merged, part) in self.stacked.items():
                if f".{piece}." in name:
                    target = name.replace(f".{piece}.", f".{merged}.")
                    module_name, param_name = target.rsplit(".", 1)
                    self.get_submodule(module_name).load_shard(part, param_name, tensor)
                    loaded.add(f"{target}:{part}")
                    break
            else:
                if name not in params:
                    raise ModelLoadError(f"unexpected weight {name!r} for {type(self).__name__}")
                module_name, param_name = name.rsplit(".", 1)
                module = self.get_submodule(module_name)
                if hasattr(module, "load_weight"):  # takes this rank's shard
                    try:
                        module.load_weight(param_name, tensor)
                    except ValueError as exc:
                        raise ModelLoadError(f"weight {name}: {exc}") from None
                elif params[name].shape != tensor.shape:
                    raise ModelLoadError(f"weight {name}: expected {tuple(params[name].shape)}, got {tuple(tensor.shape)}")
                else:
                    params[name].data.copy_(tensor)
                loaded.add(name)
        missing = []
        for pname, _ in params.items():
            module_name = pname.rsplit(".", 1)[0]
            module = self.get_submodule(module_name)
            if isinstance(module, MergedLinear):
                missing += [f"{pname}:{p}" for p in module.offsets if f"{pname}:{p}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        if missing:
            raise ModelLoadError(f"weights missing from the checkpoint: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
