"""The executor interface the engine's step pipeline drives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from xllm.scheduler.output import RunnerOutput, SchedulerOutput


class WorkerDiedError(RuntimeError):
    """A worker rank died (or its connection broke): the engine cannot run steps any more."""


@dataclass
class HandoffStats:
    """What crossing the process boundary costs (summed over steps), measured by the executor:
    `handoff_s` is the time from serializing a step to the ranks having it decoded, plus the time
    from the first rank's output being serialized to the engine having it decoded."""

    steps: int = 0
    handoff_s: float = 0.0
    step_s: float = 0.0  # the whole `execute`, send to results
    bytes_out: int = 0  # the step as sent to each rank (once per rank)
    bytes_in: int = 0  # what every rank sent back
    # with `record` on: per step (tokens in it, hand-off s, whole step s, bytes both ways)
    record: bool = False
    per_step: list[tuple[int, float, float, int]] = field(default_factory=list)


class Executor:
    num_blocks: int
    world_size: int = 1
    handoff: HandoffStats

    def prepare(self, step: SchedulerOutput):
        """Take in the step ahead of running it (the in-process worker lays out its inputs); None
        where the workers do that when the step reaches them."""
        return None

    def map_ahead(self, prepared) -> None:
        """xtensor: map the prepared step's new pages ahead (in-process only)."""

    def execute(self, step: SchedulerOutput, prepared=None, before_forward: Callable[[], None] | None = None) -> RunnerOutput:
        raise NotImplementedError

    @property
    def dead(self) -> str | None:
        """Why the workers cannot run any more (a rank died), or None."""
        return None

    def shutdown(self) -> None:
        pass
