"""The typed hand-offs between scheduler and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm.kv.connector import KVConnectorMeta, KVConnectorOutput
from xllm.sampling_params import SamplingParams


@dataclass
class SamplingContext:
    """What the sampler needs to know about one request (the worker's own copy of its state)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: frozenset[int]  # masked while fewer than params.min_tokens tokens exist


@dataclass
class NewRequestData:
    """A request as the workers first learn it (once per admission: again after a preemption,
    which drops the workers' copy). Values only: the workers build their own generator from
    `params.seed` and advance it past the `output_token_ids` already sampled."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # sampled before a preemption (empty for a fresh request)
    params: SamplingParams
    stop_token_ids: frozenset[int]


@dataclass
class ScheduledRequest:
    """One request's part of a step, as a value: counts, positions and the block delta.

    The workers hold each request's tokens (the prompt from `new`, then every token they sample)
    and blocks; a step says how many tokens to compute from which absolute position and which
    blocks to add. `start_pos` is absolute, so it may move back (rejected drafts)."""

    request_id: str
    num_tokens: int  # tokens to compute this step: the known ones from start_pos, then spec_token_ids
    start_pos: int  # absolute position of the first of them (= tokens already in the KV cache)
    block_offset: int  # blocks the workers already hold for it; `new_block_ids` replace those after
    new_block_ids: list[int]  # its blocks from block_offset on (covering start_pos + num_tokens)
    sample: bool  # this step reaches the end of the known tokens: a next token is sampled
    want_prompt_logprobs: bool = False  # this chunk's prompt positions need logprobs
    new: NewRequestData | None = None  # first step after an admission: the request itself
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to verify after the known tokens
    epoch: int = 0  # the request's preemption count when scheduled: a later preemption voids the item


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # requests whose KV blocks were freed (finished, aborted, preempted) since the last output;
    # the workers drop what they keep of them (state, xtensor ranges) before running this step
    freed_ids: list[str] = field(default_factory=list)
    # KV transfers of the connectors (host/disk tiers), carried out before this step's forward pass
    kv_meta: KVConnectorMeta = field(default_factory=KVConnectorMeta)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Log-probabilities at one position: the chosen (or actual) token first, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request id -> (index of the first prompt token covered, one entry per covered prompt token)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # requests the runner could not run (their inputs could not be built) -> why; the step ran without them
    failed: dict[str, str] = field(default_factory=dict)
    # what the connectors' worker side finished (disk reads, lost writes)
    kv_output: KVConnectorOutput = field(default_factory=KVConnectorOutput)
    # per-rank statistics of the step (the small channel back from every rank), by rank
    stats: dict[int, dict] = field(default_factory=dict)
