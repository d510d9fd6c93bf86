"""The workers' copy of the requests, from the scheduler's values alone."""

import pickle

import torch

from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput
from xllm.worker.state import RequestStates


def _new(rid="a", outputs=(), seed=None, temperature=0.0):
    return NewRequestData(rid, [1, 2, 3, 4, 5], list(outputs), SamplingParams(temperature=temperature, seed=seed), frozenset({0}))


def test_a_step_is_a_value_and_applying_it_twice_changes_nothing():
    states = RequestStates()
    first = SchedulerOutput([ScheduledRequest("a", 5, 0, 0, [7, 9], True, new=_new())])
    wire = pickle.loads(pickle.dumps(first))  # what a worker process receives
    for _ in range(2):  # the in-process engine may lay a step out again after requests joined it
        (item,) = states.apply(wire).items
    assert item.block_ids == [7, 9] and item.token_ids == [1, 2, 3, 4, 5] and not item.fill_last
    # the next step, laid out before the first one's token is back: a placeholder
    second = SchedulerOutput([ScheduledRequest("a", 1, 5, 2, [11], True)])
    (item,) = states.apply(second).items
    assert item.fill_last and item.token_ids == [0] and item.block_ids == [7, 9, 11]
    states.record({"a": 42})
    assert states.fill("a", 5) == 42
    (item,) = states.apply(SchedulerOutput([ScheduledRequest("a", 1, 6, 3, [], True)])).items
    assert item.token_ids == [0] and item.fill_last  # token 6 is the second step's
    states.record({"a": 43})
    assert RequestStates.run_item(ScheduledRequest("a", 2, 5, 3, [], True), states.states["a"]).token_ids == [42, 43]


def test_freed_requests_are_dropped_unless_readmitted_by_the_same_step():
    states = RequestStates()
    states.apply(SchedulerOutput([ScheduledRequest("a", 5, 0, 0, [1], True, new=_new("a")),
                                  ScheduledRequest("b", 5, 0, 0, [2], True, new=_new("b"))]))
    states.release(["a", "b"], keep={"b"})
    assert list(states.states) == ["b"]


def test_a_readmitted_request_continues_its_seeded_draws():
    """After a preemption the workers rebuild the request from its seed and skip the draws already
    made (one per sampled token), so its sampling goes on as if it had never been preempted."""
    data = _new(outputs=[8, 9, 10], seed=123, temperature=0.7)
    states = RequestStates()
    states.apply(SchedulerOutput([ScheduledRequest("a", 8, 0, 0, [1], True, new=data)]))
    g = torch.Generator().manual_seed(123)
    for _ in range(3):
        torch.rand(1, generator=g)
    assert torch.rand(1, generator=states.states["a"].sampling.generator) == torch.rand(1, generator=g)
    assert states.states["a"].sampling.output_token_ids == [8, 9, 10]
