"""The model runner: owns the model and the KV cache tensors; turns a SchedulerOutput into tokens.

Per step it lays the scheduled tokens out flat ([T]), builds the attention metadata once (shared by
every layer), runs the forward pass inside the forward context, computes logits only for the rows
that sample, and samples.
"""

from __future__ import annotations

import logging

import torch

from xllm.config import CacheConfig
from xllm.layers.forward_context import forward_context
from xllm.layers.sampler import Sampler, gather_logprobs
from xllm.models.arch_config import ArchConfig
from xllm.ops.attention import AttentionMetadata, build_decode_mask, build_prefill
from xllm.scheduler.output import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


def kv_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    return 2 * arch.num_hidden_layers * block_size * arch.num_key_value_heads * arch.head_dim * element


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ArchConfig, cache: CacheConfig, dtype: torch.dtype, seed: int = 0):
        self.model = model
        self.arch = arch
        self.block_size = cache.block_size
        self.dtype = dtype
        per_block = kv_bytes_per_block(arch, cache.block_size, dtype)
        self.num_blocks = cache.num_blocks or max(1, int(cache.kv_cache_memory_gib * (1 << 30)) // per_block)
        shape = (2, self.num_blocks, cache.block_size, arch.num_key_value_heads, arch.head_dim)
        # Zeroed: padded decode attention reads unwritten slots with weight 0, and 0 * NaN would poison it.
        self.kv_caches = [torch.zeros(shape, dtype=dtype) for _ in range(arch.num_hidden_layers)]
        for layer, cache_tensor in zip(model.attention_layers(), self.kv_caches):
            layer.kv_cache = cache_tensor
        self.sampler = Sampler(seed)
        logger.info(
            "KV cache: %d blocks of %d tokens (%.2f GiB)",
            self.num_blocks,
            self.block_size,
            self.num_blocks * per_block / (1 << 30),
        )

    def _prepare(self, so: SchedulerOutput):
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills = []
        decode_rows, decode_tables, decode_lens = [], [], []
        sample_rows: list[int] = []
        for item in so.scheduled:
            row = len(input_ids)
            n = len(item.token_ids)
            input_ids.extend(item.token_ids)
            pos = range(item.start_pos, item.start_pos + n)
            positions.extend(pos)
            slots.extend(item.block_ids[p // bs] * bs + p % bs for p in pos)
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(item.block_ids)
                decode_lens.append(item.start_pos + 1)
            else:
                num_blocks = -(-(item.start_pos + n) // bs)
                block_ids = torch.tensor(item.block_ids[:num_blocks], dtype=torch.long)
                prefills.append(build_prefill(row, n, item.start_pos, block_ids))
            if item.sample:
                sample_rows.append(row + n - 1)
        decode_mask = None
        if decode_rows:
            width = max(-(-length // bs) for length in decode_lens)
            table = torch.zeros(len(decode_rows), width, dtype=torch.long)
            for i, blocks in enumerate(decode_tables):
                used = blocks[: -(-decode_lens[i] // bs)]
                table[i, : len(used)] = torch.tensor(used, dtype=torch.long)
            decode_mask = build_decode_mask(torch.tensor(decode_lens), width, bs, torch.float32)
        else:
            table = torch.zeros(0, 1, dtype=torch.long)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_block_tables=table,
            decode_mask=decode_mask,
            block_size=bs,
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.long),
        )
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), md, sample_rows

    def _forward(self, so: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        input_ids, positions, md, sample_rows = self._prepare(so)
        with forward_context(md):
            hidden = self.model(input_ids, positions)
        return hidden, sample_rows

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        hidden, sample_rows = self._forward(so)
        out = RunnerOutput()
        sampling = [item for item in so.scheduled if item.sample]
        if sampling:
            logits = self.model.compute_logits(hidden[sample_rows])
            tokens, logprobs = self.sampler(logits, [s.sampling for s in sampling])
            for item, token, lp in zip(sampling, tokens.tolist(), logprobs):
                out.sampled_token_ids[item.request_id] = token
                if lp is not None:
                    out.logprobs[item.request_id] = lp
        row = 0
        for item in so.scheduled:
            if item.want_prompt_logprobs:
                out.prompt_logprobs[item.request_id] = self._prompt_logprobs(item, hidden[row : row + len(item.token_ids)])
            row += len(item.token_ids)
        return out

    def _prompt_logprobs(self, item, hidden: torch.Tensor, rows_per_slice: int = 256):
        """Logprobs of the prompt tokens this chunk predicts: position p's logits score prompt token p + 1."""
        prompt = item.sampling.prompt_token_ids
        count = min(len(item.token_ids), len(prompt) - 1 - item.start_pos)
        targets = torch.tensor(prompt[item.start_pos + 1 : item.start_pos + 1 + count], dtype=torch.long)
        entries = []
        for lo in range(0, count, rows_per_slice):  # bounded memory: [slice, vocab] logits at a time
            hi = min(count, lo + rows_per_slice)
            logits = self.model.compute_logits(hidden[lo:hi])
            entries += gather_logprobs(logits, targets[lo:hi], item.sampling.params.prompt_logprobs)
        return item.start_pos + 1, entries

    @torch.inference_mode()
    def execute_logits(self, so: SchedulerOutput) -> torch.Tensor:
        """Run the step and return float32 logits for every scheduled token: [T, vocab]."""
        hidden, _ = self._forward(so)
        return self.model.compute_logits(hidden)
