"""From logits to next tokens.

Order, as in vLLM: logit_bias, min_tokens (stop tokens masked), repetition / frequency / presence
penalties -> greedy rows take the argmax; the others: temperature, min_p, top-k, top-p, then
inverse-CDF sampling: one uniform u per row, the token where the cumulative probability first
exceeds u. Each seeded request draws its u from its own generator, exactly once per sampled
token, so its text does not depend on what else is in the batch.

Top-k / top-p need the most likely tokens in order. Sorting the whole vocabulary per row costs
more than a decode step's attention here, so rows filter among their `CANDIDATES` most likely
tokens (a partial sort) whenever that is provably the same as filtering the whole vocabulary:
top-k within the candidates, or top-p (without top-k) when the candidates already hold at least
p of the mass. Other rows take the full sort (`apply_top_k_top_p`, also the tests' reference).

Reported logprobs are those of the raw model distribution (before any of the above).
"""

from __future__ import annotations

import torch

from xllm.ops import cpu_kernels
from xllm.scheduler.output import SamplingContext, TokenLogprobs


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


CANDIDATES = 1024


def candidate_rows(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, limit: int = CANDIDATES):
    """For the rows where filtering among the top `limit` tokens equals filtering the whole
    vocabulary: (row mask [N] bool, candidate logits [N, C] sorted descending with the filtered ones
    at -inf, their token ids [N, C]). top_k: [N] (V = off); top_p: [N] (>= 1 = off)."""
    n, vocab = logits.shape
    c = min(limit, vocab)
    values, ids = logits.topk(c, dim=-1)
    lse = logits.logsumexp(dim=-1, keepdim=True)
    mass = (values - lse).exp().sum(dim=-1)  # share of the full distribution the candidates hold
    k_on = top_k < vocab
    ok = (k_on & (top_k <= c)) | (~k_on & (top_p < 1.0) & (mass >= top_p))
    ranks = torch.arange(c, device=logits.device).unsqueeze(0)
    values = values.masked_fill(ranks >= top_k.clamp(max=c).unsqueeze(1), float("-inf"))
    # top-p over the (top-k filtered) distribution: normalized over the kept candidates when top-k
    # is on (they are its whole support), over the full vocabulary otherwise.
    norm = torch.where(k_on.unsqueeze(1), values.logsumexp(dim=-1, keepdim=True), lse)
    probs = (values - norm).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    threshold = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p)
    drop = mass_before >= threshold.unsqueeze(1)
    drop[:, 0] = False
    return ok, values.masked_fill(drop, float("-inf")), ids


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of `probs` (unnormalized, >= 0) with one uniform in [0, 1) per row;
    never an index of probability 0."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the top token's. min_p: [N]."""
    probs = logits.softmax(dim=-1)
    keep = probs >= min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(~keep, float("-inf"))


def apply_penalties(
    logits: torch.Tensor,  # [N, V]
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    repetition: torch.Tensor,  # [N]
    frequency: torch.Tensor,  # [N]
    presence: torch.Tensor,  # [N]
) -> torch.Tensor:
    """vLLM's penalties. Repetition: every token seen in prompt or output has its logit divided by
    the penalty if positive, multiplied if negative. Frequency: minus penalty x count in the output.
    Presence: minus penalty once for each token present in the output."""
    n, vocab = logits.shape
    device = logits.device
    counts = torch.zeros(n, vocab, dtype=logits.dtype, device=device)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    for i in range(n):
        if output_ids[i]:
            out = torch.tensor(output_ids[i], dtype=torch.long, device=device)
            counts[i].index_add_(0, out, torch.ones(len(out), dtype=logits.dtype, device=device))
        if prompt_ids[i]:
            seen[i, torch.tensor(prompt_ids[i], dtype=torch.long, device=device)] = True
    repetition, frequency, presence = (t.to(device) for t in (repetition, frequency, presence))
    seen |= counts > 0
    rep = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def gather_logprobs(logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """logits: [M, V] float32; targets: [M] -> for each row the target's logprob and rank, plus the top k."""
    logprobs = logits.log_softmax(dim=-1)
    target_lp = logprobs.gather(1, targets.to(logits.device).unsqueeze(1))
    ranks = (logprobs > target_lp).sum(dim=-1) + 1
    entries = []
    # read back to the host once, not element by element
    targets, target_lp, ranks = targets.tolist(), target_lp.squeeze(1).tolist(), ranks.tolist()
    if k > 0:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
        top_ranks = list(range(1, k + 1))
    for i in range(logits.shape[0]):
        ids, lps, rks = [targets[i]], [target_lp[i]], [ranks[i]]
        if k > 0:
            ids += top_ids[i]
            lps += top_lp[i]
            rks += top_ranks
        entries.append(TokenLogprobs(ids, lps, rks))
    return entries


class Sampler:
    def __init__(self, seed: int = 0):
        # Draws for requests without a seed of their own.
        self.generator = torch.Generator().manual_seed(seed)

    def process_logits(self, logits: torch.Tensor, contexts: list[SamplingContext]) -> torch.Tensor:
        """Apply logit_bias, min_tokens and penalties (the argmax-changing processors); [N, V] -> [N, V]."""
        params = [c.params for c in contexts]
        for i, (c, p) in enumerate(zip(contexts, params)):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
                valid = ids < logits.shape[1]
                bias = torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
                logits[i, ids[valid]] += bias[valid]
            if len(c.output_token_ids) < p.min_tokens and c.stop_token_ids:
                stop = [t for t in c.stop_token_ids if t < logits.shape[1]]
                logits[i, stop] = float("-inf")
        rows = [i for i, p in enumerate(params) if p.has_penalties]
        if rows:
            sub = apply_penalties(
                logits[rows],
                [contexts[i].prompt_token_ids if params[i].repetition_penalty != 1.0 else [] for i in rows],
                [contexts[i].output_token_ids for i in rows],
                torch.tensor([params[i].repetition_penalty for i in rows]),
                torch.tensor([params[i].frequency_penalty for i in rows]),
                torch.tensor([params[i].presence_penalty for i in rows]),
            )
            logits[rows] = sub
        return logits

    def __call__(
        self, logits: torch.Tensor, contexts: list[SamplingContext]
    ) -> tuple[torch.Tensor, list[TokenLogprobs | None]]:
        """logits: [N, V] float32 (raw). Returns [N] long token ids and, per row, logprobs if asked."""
        params = [c.params for c in contexts]
        raw = logits
        if any(p.logit_bias or p.min_tokens or p.has_penalties for p in params):
            logits = self.process_logits(logits.clone(), contexts)
        tokens = self._sample(logits, contexts)
        logprobs: list[TokenLogprobs | None] = [None] * len(params)
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if rows:
            k = max(params[i].logprobs for i in rows)
            for i, entry in zip(rows, gather_logprobs(raw[rows], tokens[rows], k)):
                keep = params[i].logprobs + 1
                logprobs[i] = TokenLogprobs(entry.token_ids[:keep], entry.logprobs[:keep], entry.ranks[:keep])
        return tokens, logprobs

    def _sample(self, logits: torch.Tensor, contexts: list[SamplingContext]) -> torch.Tensor:
        params = [c.params for c in contexts]
        greedy_rows = [p.greedy for p in params]
        argmax = cpu_kernels.argmax(logits)
        if all(greedy_rows):
            return argmax
        n, vocab = logits.shape
        device = logits.device
        temperature = torch.tensor([p.temperature if not g else 1.0 for p, g in zip(params, greedy_rows)], device=device)
        logits = logits / temperature.unsqueeze(1)
        if any(p.min_p > 0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device))
        top_k = top_p = None
        if any(p.top_k > 0 for p in params):
            top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        # The uniforms come from host generators (a request's own when seeded), whatever the device,
        # so a seeded request draws the same numbers everywhere.
        uniforms = torch.empty(n)
        for i in range(n):
            uniforms[i] = 0.0 if greedy_rows[i] else torch.rand(1, generator=contexts[i].generator or self.generator)
        uniforms = uniforms.to(device)
        sampled = torch.empty(n, dtype=torch.long, device=device)
        greedy = torch.tensor(greedy_rows, device=device)
        full = ~greedy  # rows sampled over the whole vocabulary
        if top_k is not None or top_p is not None:
            top_k = top_k if top_k is not None else torch.full((n,), vocab, device=device)
            top_p = top_p if top_p is not None else torch.ones(n, device=device)
            ok, values, ids = candidate_rows(logits, top_k, top_p)
            ok &= ~greedy
            if ok.any():
                rows = ok.nonzero().squeeze(1)
                pick = inverse_cdf(values[rows].softmax(dim=-1), uniforms[rows])
                sampled[rows] = ids[rows].gather(1, pick.unsqueeze(1)).squeeze(1)
                full &= ~ok
        if full.any():
            rows = full.nonzero().squeeze(1)
            sub = logits[rows]
            if top_k is not None or top_p is not None:
                sub = apply_top_k_top_p(sub, top_k[rows], top_p[rows])
            sampled[rows] = inverse_cdf(sub.softmax(dim=-1), uniforms[rows])
        return torch.where(greedy, argmax, sampled)
