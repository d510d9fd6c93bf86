"""Overlapped execution: a step's outputs are processed in the helper thread while the next step
computes, and nothing a user sees changes."""

from __future__ import annotations

import threading
import time

import pytest

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [
    "Tell me a story about a dragon.",
    "What is 2+2?",
    "List three colors:",
    "Write a haiku about the sea.",
    "The capital of France is",
]


def outputs(llm: LLM, params: SamplingParams):
    return [
        (o.prompt_logprobs, [(c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs) for c in o.outputs])
        for o in llm.generate(PROMPTS, params)
    ]


@pytest.fixture(scope="module")
def engines():
    return {overlap: LLM(dtype="float32", max_model_len=512, kv_cache_memory_gib=0.1, overlap=overlap) for overlap in (False, True)}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, logprobs=2, prompt_logprobs=1),
        # stop strings end requests in the helper, after the next step already took them
        SamplingParams(temperature=0.8, seed=7, max_tokens=48, stop=[".", "\n"], n=2),
        SamplingParams(temperature=0, max_tokens=32, stop_token_ids=[28], include_stop_str_in_output=True),
    ],
    ids=["greedy-logprobs", "sampled-stop-strings-n2", "stop-token"],
)
def test_same_outputs_with_overlap_on_and_off(engines, params):
    assert outputs(engines[True], params) == outputs(engines[False], params)
    for llm in engines.values():
        llm.engine.kv.check_invariants()
        assert not llm.engine.has_unfinished_requests()


def test_processing_and_scheduling_run_in_the_helper_while_the_step_computes(engines):
    engine = engines[True].engine
    in_forward = threading.Event()
    seen = []  # (what, thread name, whether a forward pass was running)
    execute, process, schedule = engine.runner.execute, engine.pipeline._process, engine.scheduler.schedule

    def slow_execute(scheduled, before_forward=None, *args):
        def slow_start():
            in_forward.set()
            before_forward()  # the helper starts on the previous step's outputs, then the next step
            time.sleep(0.05)  # long enough for it to finish them

        try:
            return execute(scheduled, slow_start, *args)
        finally:
            in_forward.clear()

    def spy(what, fn):
        def wrapped(*args):
            seen.append((what, threading.current_thread().name, in_forward.is_set()))
            return fn(*args)

        return wrapped

    engine.runner.execute, engine.pipeline._process = slow_execute, spy("process", process)
    engine.scheduler.schedule = spy("schedule", schedule)
    try:
        out = engines[True].generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finally:
        del engine.runner.execute, engine.pipeline._process, engine.scheduler.schedule
    assert all(len(o.outputs[0].token_ids) == 6 for o in out)
    for what in ("process", "schedule"):
        overlapped = [name for w, name, during in seen if w == what and during]
        assert len(overlapped) >= 5 and all(name.startswith("xllm-outputs") for name in overlapped), (what, seen)
    # only the first step (nothing computing yet) is scheduled on the calling thread
    assert [w for w, _, during in seen if w == "schedule" and not during] == ["schedule"]


def test_stream_sink_gets_each_step_while_the_next_computes(engines):
    """With a sink (the server's), outputs leave from the helper as soon as they are built."""
    engine = engines[True].engine
    got = []
    engine.output_sink = lambda outs: got.append((threading.current_thread().name, [o.outputs[0].delta_token_ids for o in outs]))
    try:
        engine.add_request("Count: one, two,", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), "sink")
        returned = []
        while engine.has_unfinished_requests():
            returned += engine.step()
    finally:
        engine.output_sink = None
    assert returned == []  # everything went to the sink
    assert [len(tokens[0]) for _, tokens in got] == [1, 1, 1, 1, 1]  # one new token per step
    assert all(name.startswith("xllm-outputs") for name, _ in got)


def test_a_request_added_between_steps_runs_in_the_next_one(engines):
    """The next step was scheduled while the last one computed; a request added in between joins
    it, as in the serial loop, rather than waiting one more step."""
    engine = engines[True].engine
    engine.add_request("Tell me a story.", SamplingParams(max_tokens=8, ignore_eos=True), "first")
    for _ in range(3):
        engine.step()
    engine.add_request("What is 2+2?", SamplingParams(max_tokens=4, ignore_eos=True), "joined")
    ran = []
    execute = engine.runner.execute
    engine.runner.execute = lambda scheduled, *args: ran.append([i.request_id for i in scheduled.items]) or execute(scheduled, *args)
    try:
        engine.step()
    finally:
        del engine.runner.execute
    assert ran == [["first", "joined"]]
    while engine.has_unfinished_requests():
        engine.step()
    engine.kv.check_invariants()


def test_abort_between_overlapped_steps(engines):
    engine = engines[True].engine
    engine.add_request("Tell me a long story.", SamplingParams(max_tokens=200, ignore_eos=True), "long")
    for _ in range(4):
        engine.step()
    out = engine.abort_request("long")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    while engine.has_unfinished_requests():
        engine.step()  # the recorded step of the aborted request is dropped
    engine.kv.check_invariants()
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


LONG = "You are a careful assistant for a bakery. You know every bread, its flour, its oven time and its price. " * 3


@pytest.mark.parametrize("layout", ["paged", "xtensor"])
def test_same_outputs_under_preemption_prefix_hits_and_a_host_tier(layout):
    """A cache too small for the batch: with pipelined scheduling, requests are preempted while a
    step of theirs computes, freed blocks are promoted into from the host tier while the step
    before writes, and the tokens are those of the serial loop."""
    params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=40, ignore_eos=True)
    prompts = [LONG + p for p in PROMPTS[:3]] + PROMPTS[3:]
    got = {}
    for overlap in (False, True):
        llm = LLM(dtype="float32", max_model_len=512, kv_layout=layout, num_blocks=24, max_num_seqs=8,
                  max_num_batched_tokens=64, kv_host_memory_gib=0.05, overlap=overlap)
        first = llm.generate(prompts[:1], params)  # its prefix is cached, then demoted to the host tier
        rest = llm.generate(prompts[1:], params)
        engine = llm.engine
        assert engine.scheduler.num_preemptions > 0 and engine.kv.connector.hits["host"] > 0
        engine.kv.check_invariants()
        assert engine.kv.num_free_blocks == engine.kv.num_blocks
        got[overlap] = [[c.token_ids for c in o.outputs] for o in first + rest]
    assert got[True] == got[False]


def test_a_step_that_was_empty_when_scheduled_does_not_wait_for_reads_once_joined():
    """The worker may wait for lower-tier reads only in a step with nothing to compute: a step
    scheduled empty (with reads in flight) that requests then joined must not wait."""
    from xllm.engine.pipeline import StepPipeline
    from xllm.kv.connector import KVConnectorMeta
    from xllm.scheduler.output import SchedulerOutput

    class KV:
        reads_pending = True

        def take_freed(self):
            return []

    class Scheduler:
        def admit_more(self, out):
            out.scheduled.append(item)
            return True

        requests = {}

        def has_unfinished(self):
            return True

    item = type("Item", (), {"request_id": "r", "epoch": 0})()
    pipeline = StepPipeline(Scheduler(), KV(), None, None, overlap=False)
    Scheduler.requests = {"r": type("R", (), {"finished": False, "num_preemptions": 0})()}
    pipeline._ahead = (SchedulerOutput(kv_meta=KVConnectorMeta(wait_for_reads=True)), None)
    pipeline.arrived = True
    scheduled, _ = pipeline._next_step()
    assert scheduled.scheduled == [item] and not scheduled.kv_meta.wait_for_reads
