"""The requests of `xllm bench serve`: datasets, prompt text of a given token length, arrivals.

Everything is drawn from the config's seed, with no downloads: `random` lengths, a ShareGPT-like
lognormal length mix, and a shared-prefix set; prompt text is made of common English words of
about one token each (exact with a tokenizer.json).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xllm.bench.serve_stats import arrival_offsets

if TYPE_CHECKING:
    from xllm.bench.serve import ServeBenchConfig

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DATASETS = ("random", "sharegpt", "shared-prefix")

# ShareGPT-like lengths: lognormal, i.e. exp(normal(mu, sigma)), so the median is exp(mu).
# Input: median 200 tokens, sigma 1.0 (p90 ~720, mean ~330 before clipping), clipped to [4, 1024].
# Output: median 150 tokens, sigma 0.9 (p90 ~475, mean ~225 before clipping), clipped to [4, 512].
SHAREGPT_INPUT = dict(median=200, sigma=1.0, low=4, high=1024)
SHAREGPT_OUTPUT = dict(median=150, sigma=0.9, low=4, high=512)

# Common short English words that BPE vocabularies (Llama, Qwen, GPT-2, ...) hold as one token
# each after a space: n of them joined by spaces make a prompt of about n tokens.
WORDS = tuple(
    """the of and to in is it that for on was with as be at by this have from or one had not but what
    all were when we there can an your which their if do will each about how up out them then she
    many some so these would other into has more her two like him see time could no make than first
    been its who now people my made over did down only way find use may water long little very after
    words called just where most know get through back much go good new write our me man too any day
    same right look think also around another came come work three word must because does part even
    place well such here take why help put different away again off went old number great tell men
    say small every found still between name should home big give air line set own under read last
    never us left end along while might next sound below saw something thought both few those always
    show large often together asked house world going want school important until form food keep
    children feet land side without boy once animal life enough took four head above kind began
    almost live page got earth need far hand high year mother light country father let night picture
    being study second soon story since white ever paper hard near sentence better best across during
    today however sure knew try told young sun thing whole hear example heard several change answer
    room sea against top turned learn point city play toward five himself usually money seen car
    morning body upon family later turn move face door cut done group true half red fish plants
    living black eat short run book gave order open ground cold really table remember tree course
    front space inside ago early learned brought close nothing though idea before lived became add
    become grow draw yet less wind behind cannot letter among able dog shown mean rest perhaps certain
    six feel fire ready green yes built special ran full town complete person hot anything hold state
    list stood hundred ten fast felt kept notice strong voice probably area horse matter stand box
    start class piece surface river common stop talk whether fine round dark past ball girl road blue
    instead either held already warm gone finally summer understand moon mind outside power problem
    longer winter deep heavy follow beautiful everyone leave everything game system bring watch dry
    within floor ice ship begin fact third quite carry distance although sat possible heart real
    simple snow rain easy size wild weather sky main someone center field stay itself boat question
    wide least hour happened foot care low else gold build glass rock tall alone bottom check reading
    fall poor map friend language job music buy window mark heat grew listen ask single clear energy
    week lost spring travel wrote farm circle bed measure straight base caught bright walk""".split()
)




@dataclass(frozen=True)
class BenchRequest:
    """One request's prompt and lengths."""

    text: str  # the prompt (chat: the user message)
    input_len: int  # prompt tokens aimed at, prefix included
    output_len: int  # max_tokens
    prefix: str = ""  # shared-prefix: the common system prompt (completions: put before `text`)


class PromptText:
    """Seeded prompt text of a given token length, from WORDS.

    Without a tokenizer each word counts as one token, so lengths are approximate (the server's
    chat template and tokenizer add or merge a few). With a tokenizer.json (tokenizers library)
    only the words it holds as one token are used and each text is trimmed or extended until the
    tokenizer counts exactly the length asked (without special tokens).
    """

    def __init__(self, tokenizer_path: str | None = None):
        self._tokenizer = None
        self.words: tuple[str, ...] = WORDS
        if tokenizer_path is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(tokenizer_path)
            self.words = tuple(w for w in WORDS if self._single_token(w))
            if len(self.words) < 2:
                raise ValueError(f"{tokenizer_path}: too few common English words are single tokens")

    @property
    def exact(self) -> bool:
        """True when lengths are counted by a tokenizer."""
        return self._tokenizer is not None

    def count(self, text: str) -> int:
        """Tokens of `text` by the tokenizer, without special tokens (needs a tokenizer)."""
        assert self._tokenizer is not None
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _single_token(self, word: str) -> bool:
        """True when the tokenizer holds `word` after a space as one token of its own (not the unknown token)."""
        assert self._tokenizer is not None
        base = self._tokenizer.encode("a", add_special_tokens=False)
        after = self._tokenizer.encode(f"a {word}", add_special_tokens=False)
        return len(after.ids) == len(base.ids) + 1 and word in after.tokens[-1]

    def _draw(self, rng: np.random.Generator, n: int) -> list[str]:
        """`n` words drawn uniformly."""
        return [self.words[i] for i in rng.integers(0, len(self.words), size=n)]

    def make(self, rng: np.random.Generator, num_tokens: int, lead: Sequence[str] = ()) -> str:
        """A text of about (with a tokenizer: exactly) `num_tokens` tokens, starting with the words `lead`."""
        words = list(lead) + self._draw(rng, max(0, num_tokens - len(lead)))
        if self._tokenizer is None:
            return " ".join(words)
        count = self.count(" ".join(words))
        while count > num_tokens and len(words) > 1:
            words.pop()
            count = self.count(" ".join(words))
        while count < num_tokens:
            words += self._draw(rng, 1)
            count = self.count(" ".join(words))
        return " ".join(words)

    def index_words(self, index: int, total: int) -> list[str]:
        """`index` written in base len(words) with words as digits, as many as `total` needs: distinct texts."""
        base, width = len(self.words), 1
        while base**width < total:
            width += 1
        return [self.words[(index // base**k) % base] for k in range(width)]


def random_lengths(
    rng: np.random.Generator, n: int, input_len: int, output_len: int, range_ratio: float
) -> list[tuple[int, int]]:
    """(input, output) lengths, each uniform over the integers within +-range_ratio of its mean, at least 1."""

    def draw(mean: int) -> np.ndarray:
        low, high = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
        return rng.integers(low, high + 1, size=n)

    return list(zip(draw(input_len).tolist(), draw(output_len).tolist()))


def sharegpt_lengths(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    """(input, output) lengths drawn like ShareGPT conversations: SHAREGPT_INPUT and SHAREGPT_OUTPUT lognormals."""

    def draw(median: float, sigma: float, low: int, high: int) -> np.ndarray:
        return np.clip(np.rint(rng.lognormal(math.log(median), sigma, size=n)), low, high).astype(int)

    return list(zip(draw(**SHAREGPT_INPUT).tolist(), draw(**SHAREGPT_OUTPUT).tolist()))


# Streams of the seed: each purpose has its own, so that changing one leaves the others alone.
_PROMPTS, _WARMUP, _ARRIVALS = 0, 1, 2


class Workload:
    """The requests and arrival times of every run, all from the config's seed.

    Each load point gets its own prompts (the same for every server at that point), so that a
    server's prefix cache does not serve one run the prompts of an earlier one; the warm-up
    requests are different again.
    """

    def __init__(self, cfg: ServeBenchConfig):
        self.cfg = cfg
        self.text = PromptText(cfg.tokenizer)

    def requests(self, point: int) -> list[BenchRequest]:
        """The `num_prompts` requests of load point `point`."""
        return self._make(np.random.default_rng([self.cfg.seed, _PROMPTS, point]), self.cfg.num_prompts)

    def warmup_requests(self) -> list[BenchRequest]:
        """The `warmup` untimed requests sent to each server first."""
        return self._make(np.random.default_rng([self.cfg.seed, _WARMUP]), self.cfg.warmup)

    def arrivals(self, rate: float, point: int) -> list[float]:
        """Send offsets in seconds of load point `point`'s requests at `rate` requests/s."""
        return arrival_offsets(self.cfg.num_prompts, rate, np.random.default_rng([self.cfg.seed, _ARRIVALS, point]))

    def _make(self, rng: np.random.Generator, n: int) -> list[BenchRequest]:
        """`n` requests of the configured dataset."""
        cfg = self.cfg
        if cfg.dataset == "shared-prefix":
            prefix = self.text.make(rng, cfg.prefix_len) if cfg.prefix_len else ""
            return [
                BenchRequest(
                    text=self.text.make(rng, cfg.suffix_len, lead=self.text.index_words(i, n)),
                    input_len=cfg.prefix_len + cfg.suffix_len,
                    output_len=cfg.output_len,
                    prefix=prefix,
                )
                for i in range(n)
            ]
        if cfg.dataset == "sharegpt":
            lengths = sharegpt_lengths(rng, n)
        else:
            lengths = random_lengths(rng, n, cfg.input_len, cfg.output_len, cfg.range_ratio)
        return [BenchRequest(self.text.make(rng, i), i, o) for i, o in lengths]
