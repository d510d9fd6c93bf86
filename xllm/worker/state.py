"""The workers' copy of the running requests, kept up to date from the scheduler's values.

The scheduler sends a request once per admission (`NewRequestData`: tokens, sampling parameters
with their seed) and then per-step deltas (`ScheduledRequest`: counts, an absolute position, new
block ids). Every rank applies them to its own `RequestStates` and appends every token it samples,
so the ranks agree on each request's tokens without the engine sending them back. From a step's
items and these states a rank builds its `RunItem`s, the model runner's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm.kv.connector import KVConnectorMeta
from xllm.scheduler.output import NewRequestData, SamplingContext, ScheduledRequest, SchedulerOutput


@dataclass
class RunItem:
    """One request's part of a step as the model runner takes it."""

    request_id: str
    token_ids: list[int]  # the tokens to compute (a placeholder 0 where `fill_last`)
    start_pos: int  # position of token_ids[0]
    block_ids: list[int]  # the request's KV blocks, covering start_pos + len(token_ids) tokens
    sample: bool
    sampling: SamplingContext | None
    want_prompt_logprobs: bool = False
    # The last of token_ids is sampled by the step in flight: the runner reads it from the request's
    # state once that step has appended it, just before this one runs.
    fill_last: bool = False


@dataclass
class RunBatch:
    """A step as the model runner takes it."""

    items: list[RunItem] = field(default_factory=list)
    freed_ids: list[str] = field(default_factory=list)  # requests whose blocks were freed
    kv_meta: KVConnectorMeta = field(default_factory=KVConnectorMeta)

    @property
    def is_empty(self) -> bool:
        return not self.items


class RequestState:
    """What a worker keeps of one request: its tokens, its blocks, its sampling context."""

    __slots__ = ("request_id", "prompt", "output", "blocks", "sampling")

    def __init__(self, data: NewRequestData):
        self.request_id = data.request_id
        self.prompt = list(data.prompt_token_ids)
        self.output = list(data.output_token_ids)
        self.blocks: list[int] = []
        generator = None
        if data.params.seed is not None:
            generator = torch.Generator().manual_seed(data.params.seed)
            if not data.params.greedy:  # one draw per sampled token (layers/sampler.py): skip those made
                for _ in self.output:
                    torch.rand(1, generator=generator)
        self.sampling = SamplingContext(data.params, generator, self.prompt, self.output, data.stop_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def token(self, pos: int) -> int:
        p = len(self.prompt)
        return self.prompt[pos] if pos < p else self.output[pos - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p : end - p]
        return self.prompt[start:end] + self.output[: max(0, end - p)]


class RequestStates:
    """A worker's `RequestState`s by request id."""

    def __init__(self):
        self.states: dict[str, RequestState] = {}

    def __len__(self) -> int:
        return len(self.states)

    def apply(self, step: SchedulerOutput) -> RunBatch:
        """Take in the step's new requests and block deltas; its `RunBatch`. Idempotent (the engine
        may lay a step out again after requests joined it). The freed requests are dropped by
        `release`, at run time, not here: the step before may still be computing them."""
        items = []
        for item in step.scheduled:
            state = self.states.get(item.request_id)
            if item.new is not None:  # (re)admitted: a fresh copy
                state = self.states[item.request_id] = RequestState(item.new)
            if state is None:
                raise KeyError(f"request {item.request_id!r}: a step for a request this worker was never sent")
            del state.blocks[item.block_offset :]
            state.blocks.extend(item.new_block_ids)
            items.append(self.run_item(item, state))
        return RunBatch(items, step.freed_ids, step.kv_meta)

    @staticmethod
    def run_item(item: ScheduledRequest, state: RequestState) -> RunItem:
        start, n = item.start_pos, item.num_tokens
        known_end = start + n - len(item.spec_token_ids)
        have = state.num_tokens
        tokens = state.token_slice(start, min(known_end, have))
        missing = known_end - start - len(tokens)
        if missing > 1:
            raise RuntimeError(f"request {item.request_id!r}: {missing} input tokens not sampled yet")
        tokens += [0] * missing + item.spec_token_ids
        return RunItem(item.request_id, tokens, start, state.blocks, item.sample, state.sampling,
                       item.want_prompt_logprobs, fill_last=missing == 1)

    def release(self, request_ids: list[str], keep: set[str] = frozenset()) -> None:
        """Drop the freed requests (but not those `keep` names: readmitted by the step that frees them)."""
        for request_id in request_ids:
            if request_id not in keep:
                self.states.pop(request_id, None)

    def record(self, sampled: dict[str, int]) -> None:
        """Append the tokens a step sampled."""
        for request_id, token in sampled.items():
            state = self.states.get(request_id)
            if state is not None:
                state.output.append(token)

    def fill(self, request_id: str, pos: int) -> int:
        return self.states[request_id].token(pos)
