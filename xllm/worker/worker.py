"""A worker: one rank's model runner and its copy of the requests (`state.py`).

It takes the scheduler's step as a value, applies it to its request states, runs the model runner
and appends what it sampled. The in-process executor calls `prepare` ahead (in the engine's
helper thread, while the step before computes) and `execute` on the engine thread; a worker
process (`xllm/executor/worker_process.py`) calls `execute` alone, as each step arrives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from xllm.scheduler.output import RunnerOutput, SchedulerOutput
from xllm.worker.model_runner import ModelRunner, StepInputs
from xllm.worker.state import RequestStates, RunBatch

Prepared = tuple[RunBatch, StepInputs | None]


class Worker:
    def __init__(self, runner: ModelRunner, rank: int = 0):
        self.runner = runner
        self.rank = rank
        self.states = RequestStates()

    def prepare(self, step: SchedulerOutput) -> Prepared:
        """Apply the step's new requests and block deltas; lay out its inputs (placeholders where
        the step before has not sampled yet). Changes no state the step in flight reads."""
        batch = self.states.apply(step)
        return batch, (self.runner.layout(batch) if batch.items else None)

    def map_ahead(self, prepared: Prepared) -> None:
        self.runner.map_ahead(prepared[0])

    def execute(self, step: SchedulerOutput, prepared: Prepared | None = None,
                before_forward: Callable[[], None] | None = None) -> RunnerOutput:
        """Run the step: drop the freed requests (but not those it readmits), take in the rest of
        it (unless `prepared`), run it, record its tokens."""
        started = time.perf_counter()
        self.states.release(step.freed_ids, {item.request_id for item in step.scheduled if item.new is not None})
        if step.is_empty:
            out = self.runner.execute_empty(RunBatch([], step.freed_ids, step.kv_meta))
            if before_forward is not None:
                before_forward()
        else:
            batch, inputs = prepared if prepared is not None else self.prepare(step)
            batch = RunBatch(batch.items, step.freed_ids, step.kv_meta)
            out = self.runner.execute(batch, before_forward, inputs, self.states.fill)
            self.states.record(out.sampled_token_ids)
        out.stats[self.rank] = {"execute_s": time.perf_counter() - started, "requests": len(self.states)}
        return out
