"""From logits to next tokens: temperature, top-k, top-p, greedy, per-request seeded draws.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with
probability p_i. Each seeded request draws its E from its own generator, exactly once per sampled
token, so its text does not depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from xllm.sampling_params import SamplingParams


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p filter out.

    logits: [N, V]; top_k: [N] long, V for "off"; top_p: [N] float, values >= 1 mean "off".
    Top-p keeps the smallest set of most likely tokens whose probability mass reaches p (always
    at least one token), computed after top-k.
    """
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
        threshold = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p)
        drop = mass_before >= threshold.unsqueeze(1)
        drop[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    def __init__(self, seed: int = 0):
        # Draws for requests without a seed of their own.
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,  # [N, V] float32
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Returns [N] long token ids."""
        greedy_rows = [p.greedy for p in params]
        argmax = logits.argmax(dim=-1)
        if all(greedy_rows):
            return argmax
        n, vocab = logits.shape
        temperature = torch.tensor([p.temperature if not g else 1.0 for p, g in zip(params, greedy_rows)])
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        scaled = logits / temperature.unsqueeze(1)
        probs = apply_top_k_top_p(scaled, top_k, top_p).softmax(dim=-1)
        noise = torch.ones_like(probs)
        for i in range(n):
            if not greedy_rows[i]:
                noise[i].exponential_(generator=generators[i] or self.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(torch.tensor(greedy_rows), argmax, sampled)
