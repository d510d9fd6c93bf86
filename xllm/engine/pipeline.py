"""The step pipeline: schedule, run, record, process, serially or overlapped.

Serial (`overlap=False`): schedule, run the step, record its tokens, process its outputs. Pipelined
(the default): while step N's forward pass runs on the engine thread, the helper thread first
processes step N-1 (detokenizes its tokens, applies stop strings, builds the outputs), then
schedules step N+1 and lays out its inputs; a decode whose input token N is still sampling gets a
placeholder. When N's forward pass ends, its tokens are recorded (token-level stops applied; the
workers have appended them to their own copies, from which they fill N+1's placeholders), and
the next turn drops N+1's items whose request ended meanwhile and runs it. The steps go to the
workers through the executor (`xllm/executor/`) as values. Outputs go to `output_sink` from the helper as soon as they are built when one is set
(the server streams them while the next step computes); otherwise `step` returns them, one turn
later. The forward pass stays on the calling thread: the thread that runs torch's parallel
regions must be the one that always does (AsyncLLM's note on OpenMP teams); the helper runs
Python and small tensor building only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from xllm.engine.output_processor import OutputProcessor
from xllm.executor.base import Executor
from xllm.kv.manager import KVCacheManager
from xllm.outputs import RequestOutput
from xllm.scheduler.output import RunnerOutput, SchedulerOutput
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler


@dataclass
class StepTiming:
    """Where the engine loop's time goes (seconds, summed over steps); `benchmarks/overlap.py` reads it."""

    steps: int = 0
    wall_s: float = 0.0  # whole turns of `step`
    process_s: float = 0.0  # detokenization, stop strings, outputs
    schedule_s: float = 0.0  # scheduling and input layout (in the helper, during the step before, when overlapped)


class StepPipeline:
    def __init__(self, scheduler: Scheduler, kv: KVCacheManager, executor: Executor, outputs: OutputProcessor, overlap: bool):
        self.scheduler = scheduler
        self.kv = kv
        self.executor = executor
        self.outputs = outputs
        # Overlap: a step's output processing runs in this helper thread while the next step computes.
        self._helper = ThreadPoolExecutor(1, "xllm-outputs") if overlap else None
        self._pending: tuple[SchedulerOutput, list[Request], RunnerOutput] | None = None  # recorded, not yet processed
        self._ahead: tuple[SchedulerOutput, object] | None = None  # scheduled (and prepared) during the last forward pass
        self.arrived = False  # requests were added since the step ahead was scheduled
        self.output_sink: Callable[[list[RequestOutput]], None] | None = None
        self.timing = StepTiming()

    @property
    def has_pending(self) -> bool:
        """A recorded step whose outputs are not processed yet."""
        return self._pending is not None

    def step(self) -> list[RequestOutput]:
        """One turn of the loop; returns the requests whose output changed (module docstring)."""
        started = time.perf_counter()
        if self._helper is None:
            scheduled, inputs = self._schedule()
            result = self._run(scheduled, prepared=inputs)
            outputs = self._process(scheduled, self.scheduler.update(scheduled, result), result)
        else:
            outputs = self._step_overlapped()
        self.timing.steps += 1
        self.timing.wall_s += time.perf_counter() - started
        return outputs

    def _run(self, scheduled: SchedulerOutput, before_forward: Callable[[], None] | None = None, prepared=None) -> RunnerOutput:
        return self.executor.execute(scheduled, prepared, before_forward)

    def _schedule(self) -> tuple[SchedulerOutput, object]:
        """Schedule the next step and let the executor take it in (an in-process worker lays out
        its inputs; in the helper thread while a step computes)."""
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        prepared = self.executor.prepare(scheduled) if not scheduled.is_empty else None
        self.timing.schedule_s += time.perf_counter() - started
        return scheduled, prepared

    def _schedule_ahead(self) -> tuple[SchedulerOutput, object]:
        scheduled, prepared = self._schedule()
        if self.kv.lookahead:
            self.executor.map_ahead(prepared)  # its pages, mapped before it needs them
        return scheduled, prepared

    def _next_step(self) -> tuple[SchedulerOutput, object]:
        """The step to run now: the one scheduled during the last forward pass, joined by requests
        that arrived since (within the budget it left), less the items whose request ended since
        (a stop, an abort, a timeout, a preemption by a joining request), or, when that leaves
        nothing, a step scheduled now, which inherits what the dropped one carried (freed ranges
        to release, KV transfers). The ranges of every request freed so far are released before
        it runs."""
        ahead, self._ahead = self._ahead, None
        arrived, self.arrived = self.arrived, False
        if ahead is not None:
            scheduled, inputs = ahead
            if arrived and self.scheduler.admit_more(scheduled):
                inputs = None  # requests that arrived since it was scheduled joined it: laid out again
            live = [item for item in scheduled.scheduled if self._live(item)]
            if len(live) < len(scheduled.scheduled):
                scheduled.scheduled, inputs = live, None  # laid out again, without them
        if ahead is None or (scheduled.is_empty and self.scheduler.has_unfinished()):
            dropped = scheduled if ahead is not None else None
            scheduled, inputs = self._schedule()
            if dropped is not None:
                scheduled.freed_ids[:0] = dropped.freed_ids
                dropped.kv_meta.extend(scheduled.kv_meta)  # its transfers were decided first
                scheduled.kv_meta = dropped.kv_meta
        scheduled.freed_ids += self.kv.take_freed()
        # the worker may wait for disk reads only in a step with nothing to compute (requests may
        # have joined one that was empty when scheduled)
        scheduled.kv_meta.wait_for_reads = scheduled.is_empty and self.kv.reads_pending
        return scheduled, inputs

    def _live(self, item) -> bool:
        request = self.scheduler.requests.get(item.request_id)
        return request is not None and not request.finished and request.num_preemptions == item.epoch

    def _step_overlapped(self) -> list[RequestOutput]:
        scheduled, inputs = self._next_step()
        pending, self._pending = self._pending, None
        jobs = {}

        def launch():  # once this step's inputs are bound (no contention for the GIL with that)
            if pending is not None:
                jobs["outputs"] = self._helper.submit(self._process_to_sink, *pending)
            if not scheduled.is_empty:
                jobs["ahead"] = self._helper.submit(self._schedule_ahead)

        try:
            # step N computes while the helper processes step N-1's outputs and schedules step N+1
            result = self._run(scheduled, launch, inputs)
        finally:
            if not jobs:
                launch()  # the step failed before its forward pass: still process N-1
            outputs = jobs["outputs"].result() if "outputs" in jobs else []
            if "ahead" in jobs:
                self._ahead = jobs["ahead"].result()
        changed = self.scheduler.update(scheduled, result)
        if scheduled.is_empty:  # nothing computed: report what this turn ended (timeouts) now
            outputs += self._process_to_sink(scheduled, changed, result)
        elif changed or result.prompt_logprobs:  # else only dropped tokens of requests already ended
            self._pending = (scheduled, changed, result)
        return outputs

    def _process_to_sink(self, scheduled: SchedulerOutput, requests: list[Request], result: RunnerOutput) -> list[RequestOutput]:
        outputs = self._process(scheduled, requests, result)
        if self.output_sink is not None and outputs:
            self.output_sink(outputs)
            return []
        return outputs

    def _process(self, scheduled: SchedulerOutput, requests: list[Request], result: RunnerOutput) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs = self.outputs.process(scheduled, requests, result)
        self.timing.process_s += time.perf_counter() - started
        return outputs
