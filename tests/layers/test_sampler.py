import math

import pytest
import torch

from xllm.layers.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p, gather_logprobs
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import SamplingContext


def ctx(params, generator=None, prompt=(), output=(), stop=frozenset()):
    return SamplingContext(params, generator, list(prompt), list(output), frozenset(stop))


def direct_filter(logits: torch.Tensor, k: int, p: float) -> set[int]:
    """The tokens top-k then top-p keep, computed the obvious way on one row."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if k > 0:
        order = order[:k]
    kept_logits = torch.tensor([float(logits[i]) for i in order])
    probs = kept_logits.softmax(0).tolist()
    kept, mass = [], 0.0
    for i, pr in zip(order, probs):
        if kept and mass >= p:
            break
        kept.append(i)
        mass += pr
    return set(kept)


@pytest.mark.parametrize("seed", range(20))
def test_top_k_top_p_keep_exactly_the_right_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    n, vocab = 6, 50
    logits = torch.randn(n, vocab, generator=g) * 3
    ks = [(-1 if i % 3 == 0 else int(torch.randint(1, vocab, (1,), generator=g))) for i in range(n)]
    ps = [1.0 if i % 2 == 0 else float(torch.rand(1, generator=g) * 0.9 + 0.05) for i in range(n)]
    top_k = torch.tensor([k if k > 0 else vocab for k in ks])
    out = apply_top_k_top_p(logits, top_k, torch.tensor(ps))
    for i in range(n):
        kept = {j for j in range(vocab) if out[i, j] != float("-inf")}
        assert kept == direct_filter(logits[i], ks[i], ps[i])
        # Kept logits are unchanged.
        for j in kept:
            assert out[i, j] == logits[i, j]


def test_top_p_keeps_at_least_one_token():
    logits = torch.tensor([[10.0, 0.0, -1.0]])
    out = apply_top_k_top_p(logits, None, torch.tensor([0.01]))
    assert (out[0] != float("-inf")).tolist() == [True, False, False]


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(4, 30)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0), SamplingParams(temperature=0)]
    tokens, _ = Sampler()(logits, [ctx(p) for p in params])
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_beyond_the_vocabulary_means_off():
    logits = torch.randn(2, 30)
    params = [SamplingParams(top_k=10**30, seed=1), SamplingParams(top_k=3, seed=2)]
    tokens, _ = Sampler()(logits, [ctx(p) for p in params])
    assert tokens.shape == (2,)


def test_seeded_draws_do_not_depend_on_the_rest_of_the_batch():
    vocab = 100
    target = torch.randn(1, vocab)
    p = SamplingParams(temperature=1.0, seed=1234)

    def draws(batch_logits, row, seeded_row_params):
        gen = torch.Generator().manual_seed(1234)
        sampler = Sampler(seed=99)
        out = []
        for _ in range(20):
            params = [SamplingParams(temperature=0.8)] * batch_logits.shape[0]
            params = params[:row] + [seeded_row_params] + params[row + 1 :]
            gens = [None] * batch_logits.shape[0]
            gens[row] = gen
            out.append(int(sampler(batch_logits, [ctx(p, g) for p, g in zip(params, gens)])[0][row]))
        return out

    alone = draws(target, 0, p)
    batched = draws(torch.cat([torch.randn(3, vocab), target, torch.randn(5, vocab)]), 3, p)
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled


def test_sampled_frequencies_follow_the_filtered_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    scaled = (logits / 0.7).unsqueeze(0)
    filtered = apply_top_k_top_p(scaled, torch.tensor([5]), torch.tensor([0.9]))
    expected = filtered.softmax(-1)[0]
    sampler = Sampler(seed=5)
    draws = 20000
    batch = logits.unsqueeze(0).repeat(draws, 1)
    tokens, _ = sampler(batch, [ctx(params)] * draws)
    counts = torch.bincount(tokens, minlength=8).double() / draws
    for j in range(8):
        sd = math.sqrt(float(expected[j]) * (1 - float(expected[j])) / draws)
        assert abs(counts[j] - expected[j]) <= 5 * sd + 1e-9, (j, counts[j], expected[j])
    assert counts[5:].sum() == 0  # filtered out by top-k


def test_penalties_match_a_direct_computation():
    torch.manual_seed(1)
    vocab = 12
    logits = torch.randn(3, vocab) * 2
    prompts = [[1, 2, 2], [], [5]]
    outputs = [[2, 3, 3, 3], [0, 0, 7], []]
    rep, freq, pres = [1.3, 1.0, 0.7], [0.0, 0.5, -0.4], [0.25, 1.0, 0.0]
    got = apply_penalties(logits.clone(), prompts, outputs, torch.tensor(rep), torch.tensor(freq), torch.tensor(pres))
    for i in range(3):
        for t in range(vocab):
            x = float(logits[i, t])
            if t in prompts[i] or t in outputs[i]:
                x = x / rep[i] if x > 0 else x * rep[i]
            count = outputs[i].count(t)
            x -= freq[i] * count + pres[i] * (count > 0)
            assert abs(float(got[i, t]) - x) < 1e-5, (i, t)


def test_logit_bias_and_min_tokens_steer_greedy_choice():
    logits = torch.tensor([[5.0, 1.0, 0.0, 4.0]])
    sampler = Sampler()
    tok, _ = sampler(logits.clone(), [ctx(SamplingParams(temperature=0, logit_bias={2: 10.0}))])
    assert tok.tolist() == [2]
    # Token 0 is a stop token: masked until min_tokens outputs exist.
    p = SamplingParams(temperature=0, min_tokens=2)
    tok, _ = sampler(logits.clone(), [ctx(p, output=[3], stop={0})])
    assert tok.tolist() == [3]
    tok, _ = sampler(logits.clone(), [ctx(p, output=[3, 3], stop={0})])
    assert tok.tolist() == [0]


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=1.5)
    tok, _ = Sampler()(logits.clone(), [ctx(p, prompt=[0])])
    assert tok.tolist() == [1]  # 3.0 / 1.5 = 2.0 < 2.5


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_min_p(logits, torch.tensor([0.2]))  # keep p >= 0.1
    assert (out[0] != float("-inf")).tolist() == [True, True, True, False]


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k():
    torch.manual_seed(3)
    logits = torch.randn(2, 9)
    targets = torch.tensor([4, 0])
    entries = gather_logprobs(logits, targets, k=3)
    lsm = logits.log_softmax(-1)
    for i, e in enumerate(entries):
        assert e.token_ids[0] == int(targets[i])
        assert abs(e.logprobs[0] - float(lsm[i, targets[i]])) < 1e-6
        assert e.ranks[0] == int((lsm[i] > lsm[i, targets[i]]).sum()) + 1
        assert e.token_ids[1:] == lsm[i].topk(3).indices.tolist() and e.ranks[1:] == [1, 2, 3]
    # The sampler reports logprobs of the raw distribution even when penalties changed the choice.
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    p = SamplingParams(temperature=0, repetition_penalty=1.5, logprobs=1)
    tok, lps = Sampler()(logits.clone(), [ctx(p, prompt=[0])])
    assert tok.tolist() == [1] and lps[0].token_ids == [1, 0] and lps[0].ranks == [2, 1]
    assert abs(lps[0].logprobs[0] - float(logits.log_softmax(-1)[0, 1])) < 1e-6


@pytest.mark.parametrize("seed", range(10))
def test_candidate_filtering_equals_the_full_sort_where_it_claims_to(seed):
    from xllm.layers.sampler import candidate_rows

    g = torch.Generator().manual_seed(seed)
    n, vocab = 8, 3000
    logits = torch.randn(n, vocab, generator=g) * torch.tensor([1.0, 3.0, 6.0, 9.0] * 2).unsqueeze(1)
    top_k = torch.tensor([vocab, 40, vocab, 5, vocab, 200, vocab, 1])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.8, 0.99, 0.95, 1.0, 0.3])
    ok, values, ids = candidate_rows(logits, top_k, top_p, limit=256)
    reference = apply_top_k_top_p(logits, top_k, top_p)
    assert ok[1] and ok[3] and ok[5] and ok[7]  # top-k within the candidates: always exact
    assert not ok[6]  # no filter at all: needs the whole vocabulary
    for i in range(n):
        if not ok[i]:
            continue
        kept = {int(t) for t, v in zip(ids[i], values[i]) if v != float("-inf")}
        assert kept == {j for j in range(vocab) if reference[i, j] != float("-inf")}, i


def test_flat_rows_with_a_wide_top_p_take_the_full_sort():
    from xllm.layers.sampler import candidate_rows

    logits = torch.zeros(1, 5000)  # uniform: the top 1024 hold ~20% of the mass
    ok, _, _ = candidate_rows(logits, torch.tensor([5000]), torch.tensor([0.9]))
    assert not ok[0]
    sampler = Sampler(0)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    tokens = {int(sampler(logits.clone(), [ctx(params)])[0][0]) for _ in range(200)}
    assert len(tokens) > 150 and max(tokens) < 5000  # spread over the 4,500 kept tokens


def test_inverse_cdf_never_picks_a_zero_probability_token():
    from xllm.layers.sampler import inverse_cdf

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    for u in (0.0, 0.25, 0.5, 0.999999, 1.0 - 2**-24):
        picks = inverse_cdf(probs, torch.full((4,), u))
        assert set(picks.tolist()) <= {1, 3}
