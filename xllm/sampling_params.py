"""Per-request sampling parameters, validated when built."""

from __future__ import annotations

from dataclasses import dataclass, field

_MAX_LOGPROBS = 20
_GREEDY_TEMPERATURE = 1e-5


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class SamplingParams:
    """How to pick each next token, what to report, and when to stop.

    Filters and penalties, in the order they apply to the logits: `logit_bias` (token id -> added
    to its logit), `min_tokens` (stop tokens are masked until that many tokens exist),
    `repetition_penalty` (divides positive / multiplies negative logits of every token seen in
    prompt or output; 1 = off), `frequency_penalty` (minus penalty x count in the output),
    `presence_penalty` (minus penalty once for each token in the output), then `temperature`
    (0, or below 1e-5, = greedy), `min_p` (drop tokens less likely than min_p x the top token), `top_k` (-1 = off)
    and `top_p` (1 = off).

    A request with a `seed` draws from its own generator, so it gives the same text whatever else
    is in the batch; with n > 1, sample i uses seed + i.

    `stop`: strings that end the text (not included unless include_stop_str_in_output);
    `logprobs`: report the sampled token's log-probability plus this many top alternatives;
    `prompt_logprobs`: the same for every prompt token (the first has none).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_number("temperature", self.temperature, low=0.0)
        if not _is_int(self.top_k):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1  # 0 is accepted as "disabled", like vLLM
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        self._check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_number("min_p", self.min_p, low=0.0, high=1.0)
        self._check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self._check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        self._check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a mapping of token id to bias")
            bias = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
                if token < 0 or not _is_number(value) or not -100.0 <= value <= 100.0:
                    raise ValueError(f"logit_bias[{key!r}] must be a number in [-100, 100] for a token id >= 0")
                bias[token] = float(value)
            self.logit_bias = bias or None
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64 - self.n):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64 - n), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= _MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {_MAX_LOGPROBS}], got {value!r}")

    @staticmethod
    def _check_number(name: str, value, low: float | None = None, high: float | None = None) -> None:
        if not _is_number(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise ValueError(f"{name} must be in {bounds}, got {value}")

    @property
    def greedy(self) -> bool:
        # Below 1e-5 dividing the logits by the temperature overflows; it is greedy in effect (as in vLLM).
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_sample(self, index: int) -> "SamplingParams":
        """The parameters of sample `index` of an n > 1 request: n = 1, seed + index."""
        from dataclasses import replace

        return replace(self, n=1, seed=None if self.seed is None else self.seed + index)
