"""What the engine returns to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float  # natural log of the token's probability under the model (raw logits, before sampling filters)
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


# One position: token id -> Logprob, holding the chosen token and the top alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One sample of a request. While the request runs, an output carries only what is new since
    the previous one (the `delta_*` fields), so streaming costs O(tokens) in all; the final output
    (`finish_reason` set) carries the whole `text`, `token_ids` and `logprobs` as well."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "timeout", "error"; None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[PositionLogprobs] | None = None
    # Text, tokens and logprobs added since this request's previous output (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Times of one request's life, from time.monotonic() (sample 0's, for n > 1)."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    # prompt_logprobs[i] is for prompt token i given the ones before it (None for the first).
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (not computed)
    # Set when the request failed on its own (finish reason "error"): what went wrong. The engine
    # and every other request carry on.
    error: str | None = None

    @property
    def delta_text(self) -> str:
        """New text of a single-sample request since its previous output."""
        return "".join(o.delta_text for o in self.outputs)
