"""One worker in the engine's own process: the step is handed over as the same value, without
serializing it; the worker lays it out ahead when the pipeline asks (`prepare`)."""

from __future__ import annotations

from collections.abc import Callable

from xllm.executor.base import Executor, HandoffStats
from xllm.scheduler.output import RunnerOutput, SchedulerOutput
from xllm.worker.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, worker: Worker):
        self.worker = worker
        self.num_blocks = worker.runner.num_blocks
        self.handoff = HandoffStats()

    @property
    def runner(self):
        return self.worker.runner

    def prepare(self, step: SchedulerOutput):
        return self.worker.prepare(step)

    def map_ahead(self, prepared) -> None:
        if prepared is not None:
            self.worker.map_ahead(prepared)

    def execute(self, step: SchedulerOutput, prepared=None, before_forward: Callable[[], None] | None = None) -> RunnerOutput:
        return self.worker.execute(step, prepared, before_forward)
