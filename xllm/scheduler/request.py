"""A request as the scheduler sees it: tokens known, tokens computed, and when to stop."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import NewRequestData, TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # its cached prefix is being read in from a lower tier
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: queues find and remove requests by identity
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Token ids that end the request: the model's EOS ids (unless ignore_eos) plus params.stop_token_ids.
    stop_token_ids: frozenset[int]
    # Hard cap on generated tokens: max_tokens, clipped so prompt + output fits max_model_len.
    max_output_tokens: int
    # A sibling (sample 0 of the same n > 1 request) whose prompt KV blocks this one reuses.
    share_prompt_with: str | None = None
    # Prefix-cache isolation: requests with different salts never share KV blocks.
    cache_salt: str | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    priority: int = 0  # lower runs first; FCFS (arrival) within a priority
    deadline: float | None = None  # time.monotonic() past which the request is aborted ("timeout")
    enqueued_step: int = 0  # scheduler step at which it was added (aging of its priority)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # when it first got a step (queue time ends)
    first_token_time: float | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV a scheduled step computes (advanced when the step is scheduled, so the next
    # step can be scheduled while this one computes).
    num_computed_tokens: int = 0
    # Tokens sampled by steps that are scheduled but not yet recorded (at most two: the step that
    # computes and the one scheduled during it).
    num_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # finish reason "error": what went wrong with this request alone
    num_preemptions: int = 0
    kv_wait_since: float | None = None
    # What the workers hold of it: whether they know it (since its last admission) and how many
    # of its blocks they were sent (the scheduler sends only what is new).
    workers_know: bool = False
    num_sent_blocks: int = 0  # time.monotonic() it began waiting for its prefix to be read in
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # prompt_logprobs[i] is for prompt token i + 1 (the first prompt token has none).
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    def new_request_data(self) -> NewRequestData:
        """The request as a value for the workers (copies: nothing aliases the scheduler's lists)."""
        return NewRequestData(self.request_id, list(self.prompt_token_ids), list(self.output_token_ids), self.params,
                              self.stop_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end], without building the whole list (a decode takes one token)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - p)]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def tokens_to_compute(self) -> int:
        return self.num_tokens + self.num_placeholders - self.num_computed_tokens

    @property
    def at_length_cap(self) -> bool:
        """Its steps in flight already sample its last allowed token: nothing more to schedule."""
        return len(self.output_token_ids) + self.num_placeholders >= self.max_output_tokens

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def check_stop(self) -> bool:
        """After a token was appended: decide whether the request is done, and why."""
        last = self.output_token_ids[-1]
        if last in self.stop_token_ids and len(self.output_token_ids) >= self.params.min_tokens:
            self.finish("stop", last if last in self.params.stop_token_ids else None)
        elif len(self.output_token_ids) >= self.max_output_tokens:
            self.finish("length")
        return self.finished

    def add_prompt_logprobs(self, first_index: int, entries: list[TokenLogprobs]) -> None:
        """Record prompt logprobs for prompt tokens first_index...; a recomputed chunk adds nothing new."""
        have = len(self.prompt_logprobs) + 1  # index of the next prompt token we lack
        if first_index <= have:
            self.prompt_logprobs.extend(entries[have - first_index :])
