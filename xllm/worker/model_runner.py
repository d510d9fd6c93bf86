"""The model runner: owns the model and the KV cache tensors; turns a `RunBatch` into tokens.

Per step it lays the scheduled tokens out flat ([T]), builds the attention metadata once (shared by
every layer), carries out the step's KV transfers (the connectors' worker side), runs the forward
pass inside the forward context, computes logits only for the rows that sample, and samples.
Inputs are laid out on the host (in the engine's helper thread, while the step before computes)
and moved to the platform's device when the step is bound.

KV layouts (`CacheConfig.kv_layout`): `paged`, one tensor [2, num_blocks, block_size, Hkv, D] per
layer read through block tables; `xtensor` (kv/xtensor.py), one page pool with a contiguous virtual
range per sequence: the runner maps each scheduled request's blocks into its range before the step
and unmaps the ranges of requests the scheduler freed. A request whose range cannot be mapped
fails alone: the step runs without it and reports it in `RunnerOutput.failed`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from xllm.config import CacheConfig
from xllm.kv.xtensor import check_page_size, max_map_count
from xllm.layers.forward_context import forward_context
from xllm.layers.sampler import Sampler, gather_logprobs
from xllm.models.arch_config import ArchConfig
from xllm.ops.attention import AttentionMetadata, build_prefill
from xllm.platforms import Platform, get_platform
from xllm.scheduler.output import RunnerOutput
from xllm.worker.state import RunBatch, RunItem

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """A step's laid-out inputs (`ModelRunner.layout`)."""

    input_ids: torch.Tensor  # [T] long; placeholder rows hold 0 until `_bind` fills them
    positions: torch.Tensor  # [T] long
    md: AttentionMetadata
    sample_rows: list[int]  # rows whose logits are sampled
    fill_rows: list[tuple[int, str, int]]  # (row, request id, position) of each placeholder token

    def to(self, device: torch.device) -> "StepInputs":
        if self.input_ids.device == device:
            return self
        return StepInputs(self.input_ids.to(device), self.positions.to(device), self.md.to(device), self.sample_rows,
                          self.fill_rows)


def kv_bytes_per_block(arch: ArchConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
    """Bytes of one KV block over all layers (of `num_kv_heads`: a tensor-parallel rank's share)."""
    element = torch.empty(0, dtype=dtype).element_size()
    heads = arch.num_key_value_heads if num_kv_heads is None else num_kv_heads
    return 2 * arch.num_hidden_layers * block_size * heads * arch.head_dim * element


def _plain_greedy(params) -> bool:
    """Greedy with nothing that needs the whole distribution (logprobs, biases, penalties, min_tokens)."""
    return params.greedy and params.logprobs is None and not (params.logit_bias or params.min_tokens or params.has_penalties)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        arch: ArchConfig,
        cache: CacheConfig,
        dtype: torch.dtype,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        platform: Platform | None = None,
        max_num_batched_tokens: int = 2048,
        allocate: bool = True,
    ):
        self.model = model
        self.arch = arch
        self.block_size = cache.block_size
        self.dtype = dtype
        self.platform = platform or get_platform("cpu")
        self.device = self.platform.device
        self.xtensor = None  # xtensor layout: the page pool (`XTensorPool` on the CPU)
        self.kv_connector = None  # the KV connectors' worker side (host/disk tiers), set by the engine
        self.tp = getattr(model, "tp", None)  # the tensor-parallel group (arch's KV heads: this rank's share)
        self.cache_config = cache
        self.max_len = max_model_len or arch.max_position_embeddings
        self.max_num_seqs = max_num_seqs
        self.num_kv_heads = model.attention_layers()[0].num_kv_heads if model.attention_layers() else arch.num_key_value_heads
        self.per_block = kv_bytes_per_block(arch, cache.block_size, dtype, self.num_kv_heads)
        if cache.num_blocks:
            self.num_blocks = cache.num_blocks
        else:
            budget = self.platform.kv_cache_bytes(
                cache, self._largest_steps(max_num_batched_tokens, max_num_seqs, self.max_len)
            )
            self.num_blocks = max(1, budget // self.per_block)
        self.sampler = Sampler(seed)
        self.pages_mapped_in_step = 0  # xtensor: pages mapped while binding a step's inputs
        self.pages_mapped_ahead = 0  # ...and by `map_ahead`, off the critical path
        self.execute_s = 0.0  # time in `execute` (input layout + forward + sampling), summed
        self.prepare_s = 0.0  # of which the input layout and binding done in `execute` (`layout`, `_bind`)
        self.kv_caches: list[torch.Tensor] = []
        if allocate:
            self.allocate(self.num_blocks)

    def allocate(self, num_blocks: int) -> None:
        """Create the KV cache with `num_blocks` blocks (ranks of a group all take the smallest of
        the counts they sized) and bind it to the model's attention layers."""
        self.num_blocks = num_blocks
        arch, cache = self.arch, self.cache_config
        if cache.kv_layout == "xtensor":
            self.kv_caches, ranges = self._xtensor_cache(self.max_len, self.max_num_seqs)
        else:
            shape = (2, self.num_blocks, cache.block_size, self.num_kv_heads, arch.head_dim)
            # Zeroed: padded decode attention reads unwritten slots with weight 0, and 0 * NaN would poison it.
            self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(arch.num_hidden_layers)]
            ranges = [None] * arch.num_hidden_layers
        self.kv_ranges = ranges
        self.bind_cache()
        logger.info(
            "KV cache (%s, %s): %d blocks of %d tokens (%.2f GiB)",
            cache.kv_layout,
            self.device,
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.per_block / (1 << 30),
        )

    def bind_cache(self, caches: list[torch.Tensor] | None = None, ranges: list | None = None) -> None:
        """Point the model's attention layers at this runner's KV cache (done at construction)."""
        caches = self.kv_caches if caches is None else caches
        ranges = self.kv_ranges if ranges is None else ranges
        for layer, cache_tensor, layer_ranges in zip(self.model.attention_layers(), caches, ranges):
            layer.kv_cache = cache_tensor
            layer.kv_ranges = layer_ranges

    def _largest_steps(self, max_tokens: int, max_rows: int, max_len: int) -> Callable[[], None]:
        """A function that runs, once each, the steps whose activations are the largest this engine
        can schedule, over a scratch KV cache it frees; the platform measures the peak around it:
        - `max_tokens` fresh prompt tokens (in sequences of at most `max_len`);
        - a chunk of up to `max_tokens` over the longest context (attention over `max_len` keys);
        - `max_rows` decodes at the longest context (the torch path gathers every sequence's K/V);
        then logits for `max_rows` rows and a full-vocabulary sort, as the sampler may do. The
        decodes share one sequence's blocks, so the scratch cache holds `max_len` tokens."""

        def run() -> None:
            bs, arch = self.block_size, self.arch
            context = -(-max_len // bs)  # blocks of the longest sequence, shared by the long steps
            blocks = context + -(-max_tokens // bs) + -(-max_tokens // max_len)
            shape = (2, blocks, bs, self.num_kv_heads, arch.head_dim)
            scratch = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(arch.num_hidden_layers)]
            self.bind_cache(scratch, [None] * arch.num_hidden_layers)
            long_blocks = list(range(context))
            prompts, first_block = [], context
            for start in range(0, max_tokens, max_len):
                n = min(max_len, max_tokens - start)
                seq_blocks = list(range(first_block, first_block + -(-n // bs)))
                prompts.append(RunItem(f"profile-{start}", [0] * n, 0, seq_blocks, False, None))
                first_block += len(seq_blocks)
            chunk = min(max_tokens, max_len - 1)
            steps = [
                prompts,
                [RunItem("profile-chunk", [0] * chunk, max_len - chunk, long_blocks, False, None)],
                [RunItem(f"profile-decode-{i}", [0], max_len - 1, long_blocks, False, None) for i in range(max_rows)],
            ]
            try:
                with torch.inference_mode():
                    for items in steps:
                        inputs = self.layout(RunBatch(items)).to(self.device)
                        with forward_context(inputs.md):
                            hidden = self.model(inputs.input_ids, inputs.positions)
                        del hidden, inputs
                    logits = self.model.compute_logits(torch.zeros(max_rows, arch.hidden_size, dtype=self.dtype,
                                                                   device=self.device))
                    logits.sort(dim=-1)
            finally:
                self.bind_cache([None] * arch.num_hidden_layers, [None] * arch.num_hidden_layers)

        return run

    def _xtensor_cache(self, max_len: int, max_num_seqs: int):
        """The xtensor layout: the platform's page pool, one page per block, [layers, 2, block_size,
        Hkv, D] (a layer's K rows of a block are contiguous, as in the paged layout); per layer the
        physical view [2, num_blocks, block_size, Hkv, D] (the paged layout's indexing: new rows are
        written and tiers copy blocks through it) and the ranges' views [slots, pages, block_size,
        Hkv, D] for K and V, which attention reads with no block table."""
        arch, bs = self.arch, self.block_size
        layers, hkv, d = arch.num_hidden_layers, self.num_kv_heads, arch.head_dim
        token_bytes = layers * 2 * hkv * d * torch.empty(0, dtype=self.dtype).element_size()
        page_bytes = check_page_size(bs, token_bytes)
        range_pages = -(-max_len // bs)
        # Only running sequences hold mapped ranges (at most max_num_seqs, parallel samples included;
        # freed ones are unmapped before a step maps anything); the slots are twice that, virtual only.
        worst = max_num_seqs * range_pages  # every page of every running range a mapping of its own
        if worst > max_map_count() // 2:
            logger.warning(
                "xtensor KV: %d running sequences of %d pages could need %d kernel mappings, over half of "
                "vm.max_map_count (%d); lower --max-num-seqs or --max-model-len, or raise vm.max_map_count",
                max_num_seqs, range_pages, worst, max_map_count(),
            )
        pool = self.xtensor = self.platform.new_page_pool(self.num_blocks, page_bytes, range_pages, self.dtype, 2 * max_num_seqs)
        physical = pool.physical().view(self.num_blocks, layers, 2, bs, hkv, d)
        ranges = pool.ranges().view(pool.num_slots, range_pages, layers, 2, bs, hkv, d)
        logger.info("xtensor KV: page %d KiB (%d tokens), %d ranges of %d tokens, huge pages %s",
                    page_bytes >> 10, bs, pool.num_slots, range_pages * bs, "on" if pool.huge_pages else "off")
        caches = [physical[:, i].transpose(0, 1) for i in range(layers)]
        return caches, [(ranges[:, :, i, 0], ranges[:, :, i, 1]) for i in range(layers)]

    def map_ahead(self, scheduled: RunBatch) -> None:
        """xtensor: map every block the step's requests hold (the scheduler's look-ahead block
        included) into the ranges they already have, so `_bind` finds them mapped. The engine
        calls this from its helper thread for the step it has just scheduled, while the step
        before computes: it only adds pages past those mapped, which that forward pass does not
        read, and it creates and unmaps no range (that is `_bind`'s, on the engine thread). A
        range that cannot be mapped here is left to `_bind`, which fails that request alone."""
        xt = self.xtensor
        if xt is None:
            return
        for item in scheduled.items:
            have = xt.num_mapped(item.request_id)
            pages = item.block_ids[: xt.range_pages]
            if xt.has(item.request_id) and len(pages) > have:
                try:
                    xt.map_pages(item.request_id, pages)
                except Exception:  # noqa: BLE001 - an optimization only
                    continue
                self.pages_mapped_ahead += len(pages) - have

    def release(self, request_ids: list[str]) -> None:
        """Drop what the runner keeps for requests the scheduler freed (their xtensor ranges)."""
        if self.xtensor is not None:
            for request_id in request_ids:
                self.xtensor.release(request_id)

    def layout(self, scheduled: RunBatch) -> StepInputs:
        """The step's input tensors and attention metadata, on the host, built from the schedule
        alone (no change to any state, so the engine builds them in its helper thread while the
        step before computes). Placeholder tokens, xtensor ranges and the move to the device are
        left to `_bind`."""
        bs = self.block_size
        xt = self.xtensor
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills = []
        decode_rows, decode_tables, decode_lens = [], [], []
        sample_rows: list[int] = []
        fill_rows: list[tuple[int, str, int]] = []
        for item in scheduled.items:
            row = len(input_ids)
            n = len(item.token_ids)
            input_ids.extend(item.token_ids)
            if item.fill_last:
                fill_rows.append((row + n - 1, item.request_id, item.start_pos + n - 1))
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
        if xt is None and decode_rows:
            width = max(-(-length // bs) for length in decode_lens)
            table = torch.zeros(len(decode_rows), width, dtype=torch.long)
            for i, blocks in enumerate(decode_tables):
                used = blocks[: -(-decode_lens[i] // bs)]
                table[i, : len(used)] = torch.tensor(used, dtype=torch.long)
        else:  # ranges need no block table
            table = torch.zeros(0, 1, dtype=torch.long)
        md = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long),
            decode_block_tables=table,
            decode_mask=None,  # built by the torch attention path if it runs
            block_size=bs,
            decode_seq_lens=torch.tensor(decode_lens, dtype=torch.long),
        )
        return StepInputs(torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), md,
                          sample_rows, fill_rows)

    def _bind(self, scheduled: RunBatch, inputs: StepInputs, fill: Callable[[str, int], int] | None,
              failed: dict[str, str]) -> StepInputs:
        """Just before the forward pass, on the engine thread: drop the freed requests' ranges, carry
        out the step's KV transfers, map the step's blocks into its requests' ranges (xtensor), fill
        in the placeholder tokens (`fill(request_id, position)`: the token the step before sampled
        there), and move the inputs to the device. A request whose range cannot be mapped is dropped from the step (and laid out again
        without it) and named in `failed`."""
        self.release(scheduled.freed_ids)
        if self.kv_connector is not None and scheduled.kv_meta:
            self.kv_connector.execute(scheduled.kv_meta)
        xt = self.xtensor
        if xt is not None:
            bs = self.block_size
            range_of = {}
            for item in scheduled.items:
                num_blocks = -(-(item.start_pos + len(item.token_ids)) // bs)
                have = xt.num_mapped(item.request_id)
                try:
                    range_of[item.request_id] = xt.map_pages(item.request_id, item.block_ids[:num_blocks])
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    logger.exception("request %s: its KV range could not be mapped", item.request_id)
                    failed[item.request_id] = f"its KV cache range could not be mapped: {exc}"
                    continue
                self.pages_mapped_in_step += max(0, num_blocks - have)
            if failed:
                scheduled.items = [item for item in scheduled.items if item.request_id not in failed]
                inputs = self.layout(scheduled)
            decode_slots = []
            prefills = iter(inputs.md.prefills)
            for item in scheduled.items:
                if len(item.token_ids) == 1:
                    decode_slots.append(range_of[item.request_id])
                else:
                    next(prefills).slot = range_of[item.request_id]
            inputs.md.decode_slots = torch.tensor(decode_slots, dtype=torch.long)
        if inputs.fill_rows:
            if fill is None:
                raise RuntimeError("a step with placeholder tokens needs the tokens the step before sampled")
            rows = [row for row, _, _ in inputs.fill_rows]
            inputs.input_ids[rows] = torch.tensor([fill(rid, pos) for _, rid, pos in inputs.fill_rows], dtype=torch.long)
        return inputs.to(self.device)

    def _forward(
        self, scheduled: RunBatch, before_forward: Callable[[], None] | None = None,
        inputs: StepInputs | None = None, fill: Callable[[str, int], int] | None = None,
        failed: dict[str, str] | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        started = time.perf_counter()
        if inputs is None:
            inputs = self.layout(scheduled)
        inputs = self._bind(scheduled, inputs, fill, {} if failed is None else failed)
        self.prepare_s += time.perf_counter() - started
        if before_forward is not None:
            before_forward()
        if not scheduled.items:  # every request of the step failed
            return None, []
        with forward_context(inputs.md):
            hidden = self.model(inputs.input_ids, inputs.positions)
        return hidden, inputs.sample_rows

    def execute_empty(self, scheduled: RunBatch) -> RunnerOutput:
        """A step with nothing to compute: release freed ranges, carry out its KV transfers."""
        self.release(scheduled.freed_ids)
        if self.kv_connector is not None and scheduled.kv_meta:
            self.kv_connector.execute(scheduled.kv_meta)
        return self._finish(RunnerOutput())

    def _finish(self, out: RunnerOutput) -> RunnerOutput:
        if self.kv_connector is not None:
            out.kv_output = self.kv_connector.take_output()
        return out

    @torch.inference_mode()
    def execute(
        self, scheduled: RunBatch, before_forward: Callable[[], None] | None = None,
        inputs: StepInputs | None = None, fill: Callable[[str, int], int] | None = None,
    ) -> RunnerOutput:
        """Run the step; `before_forward` is called once the inputs are laid out, as the forward pass
        starts. `inputs` is the step's `layout` when built beforehand; `fill(request_id, position)`
        gives the placeholder tokens (sampled by the step before)."""
        started = time.perf_counter()
        try:
            return self._finish(self._execute(scheduled, before_forward, inputs, fill))
        finally:
            self.execute_s += time.perf_counter() - started

    def _execute(self, scheduled: RunBatch, before_forward, inputs, fill) -> RunnerOutput:
        out = RunnerOutput()
        hidden, sample_rows = self._forward(scheduled, before_forward, inputs, fill, out.failed)
        if hidden is None:
            return out
        sampling = [item for item in scheduled.items if item.sample]
        if sampling:
            contexts = [s.sampling for s in sampling]
            if self.tp is not None and self.tp.size > 1 and all(_plain_greedy(c.params) for c in contexts):
                # every rank's best token, not the gathered logits
                tokens, logprobs = self.model.greedy_tokens(hidden[sample_rows]), [None] * len(sampling)
            else:
                tokens, logprobs = self.sampler(self.model.compute_logits(hidden[sample_rows]), contexts)
            for item, token, lp in zip(sampling, tokens.tolist(), logprobs):
                out.sampled_token_ids[item.request_id] = token
                if lp is not None:
                    out.logprobs[item.request_id] = lp
        row = 0
        for item in scheduled.items:
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
    def execute_logits(self, scheduled: RunBatch) -> torch.Tensor:
        """Run the step and return float32 logits for every scheduled token: [T, vocab]."""
        hidden, _ = self._forward(scheduled)
        return self.model.compute_logits(hidden)
