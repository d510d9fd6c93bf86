"""The typed hand-offs between scheduler and model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xllm.kv.connector import KVConnectorMeta, KVConnectorOutput
from xllm.sampling_params import SamplingParams


@dataclass
class SamplingContext:
    """What the sampler needs to know about one request. The lists are the request's own (live)."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: frozenset[int]  # masked while fewer than params.min_tokens tokens exist


@dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens to compute this step (a prompt chunk, or the last sampled token)
    start_pos: int  # position of token_ids[0] in the sequence (= tokens already in the KV cache)
    block_ids: list[int]  # the request's KV blocks, covering start_pos + len(token_ids) tokens
    sample: bool  # True when this step reaches the end of the known tokens, so a next token is sampled
    sampling: SamplingContext
    want_prompt_logprobs: bool = False  # this chunk's prompt positions need logprobs
    # The last of token_ids is still being sampled by the step in flight (a placeholder): the
    # runner takes it from that step's output before this one runs.
    fill_last: bool = False
    epoch: int = 0  # the request's preemption count when scheduled: a later preemption voids the item


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    # requests whose KV blocks were freed (finished, aborted, preempted) since the last output;
    # the runner drops what it keeps per request before running this step
    freed_ids: list[str] = field(default_factory=list)
    # KV transfers of the connectors (host/disk tiers), carried out before this step's forward pass
    kv_meta: KVConnectorMeta = field(default_factory=KVConnectorMeta)

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

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
