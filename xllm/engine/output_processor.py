"""Output assembly: from the scheduler's requests to the user's `RequestOutput`s.

One `_Group` per user request holds its n samples (scheduler requests) and their incremental
detokenizers. After each step `process` detokenizes the new tokens, applies stop strings (which
end a sample through the scheduler) and builds the outputs of the groups that changed. Outputs
of a running request carry only what is new (deltas); the final one carries everything.

A request whose processing raises fails alone: it ends with finish reason "error", its blocks
are freed, and its output says what went wrong; the engine and the other requests go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput, SchedulerOutput, TokenLogprobs
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass
class _Sample:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # converted so far
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass
class _Group:
    """One user request: its prompt and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer, scheduler: Scheduler):
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.groups: dict[str, _Group] = {}
        self._sample_group: dict[str, tuple[_Group, int]] = {}  # scheduler request id -> (group, index)
        self._token_text: dict[int, str] = {}

    def add(self, group_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams,
            requests: list[Request]) -> None:
        group = _Group(group_id, prompt, token_ids, params, [])
        for i, request in enumerate(requests):
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output)
            group.samples.append(_Sample(request, detok))
            self._sample_group[request.request_id] = (group, i)
        self.groups[group_id] = group

    def has(self, group_id: str) -> bool:
        return group_id in self.groups

    def output_of(self, group_id: str) -> RequestOutput | None:
        """The output of a group now (after an abort: its final one); None if it is not known."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        try:
            return self._output(group)
        except Exception as exc:  # noqa: BLE001 - this request fails alone
            self._fail(group, f"building its output failed: {exc!r}")
            return self._error_output(group)

    # ---- after a step -----------------------------------------------------------------------
    def process(self, scheduled: SchedulerOutput, requests: list[Request], result: RunnerOutput) -> list[RequestOutput]:
        """Detokenize the step's new tokens, apply stop strings, build the changed requests' outputs."""
        changed: dict[str, _Group] = {}
        for request in requests:
            if request.request_id not in self._sample_group:
                continue  # aborted after its step was recorded: its output was already final
            group, index = self._sample_group[request.request_id]
            try:
                self._detokenize(group.samples[index])
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                self._fail(group, f"processing its output failed: {exc!r}")
            changed[group.request_id] = group
        for item in scheduled.scheduled:  # prompt logprobs arrive with prompt chunks, before any token
            if item.request_id in result.prompt_logprobs and item.request_id in self._sample_group:
                group = self._sample_group[item.request_id][0]
                if self._prompt_logprobs_done(group):  # an output when they are all there, not per chunk
                    changed[group.request_id] = group
        outputs = []
        for group in changed.values():
            try:
                outputs.append(self._output(group))
            except Exception as exc:  # noqa: BLE001
                self._fail(group, f"building its output failed: {exc!r}")
                outputs.append(self._error_output(group))
        return outputs

    def _detokenize(self, sample: _Sample) -> None:
        request = sample.request
        check = len(request.output_token_ids) >= request.params.min_tokens
        stop = sample.detokenizer.update(request.output_token_ids, finished=request.finished, check_stop=check)
        if stop is not None and not request.finished:
            self.scheduler.finish_request(request.request_id, "stop", stop)

    def _fail(self, group: _Group, message: str) -> None:
        """End every unfinished sample of `group` with finish reason "error" (blocks freed)."""
        logger.exception("request %s failed: %s", group.request_id, message)
        group.error = message
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.finish_request(sample.request.request_id, "error", error=message)

    # ---- outputs ------------------------------------------------------------------------------
    def token_text(self, token_id: int) -> str | None:
        """One token decoded alone, special tokens included (cached); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def _position_logprobs(self, entry: TokenLogprobs) -> PositionLogprobs:
        return {
            tid: Logprob(lp, rank, self.token_text(tid))
            for tid, lp, rank in zip(entry.token_ids, entry.logprobs, entry.ranks)
        }

    @staticmethod
    def _prompt_logprobs_done(group: _Group) -> bool:
        lead = group.samples[0].request
        return len(lead.prompt_logprobs) >= len(group.prompt_token_ids) - 1

    def _output(self, group: _Group) -> RequestOutput:
        want_logprobs = group.params.logprobs is not None
        # the whole text, tokens and logprobs go in the group's final output only: a running
        # request's outputs (a finished sample's too, while its siblings run) are deltas
        whole = group.finished
        completions = []
        for index, sample in enumerate(group.samples):
            request = sample.request
            finished = request.finished
            delta = sample.detokenizer.take_delta(finished)
            if want_logprobs:
                for entry in request.logprobs[len(sample.logprobs) :]:
                    sample.logprobs.append(self._position_logprobs(entry))
            tokens = request.output_token_ids
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sample.detokenizer.visible_text if whole else "",
                    token_ids=list(tokens) if whole else [],
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    logprobs=list(sample.logprobs) if want_logprobs and whole else None,
                    delta_text=delta,
                    delta_token_ids=tokens[sample.sent_tokens :],
                    delta_logprobs=sample.logprobs[sample.sent_logprobs :] if want_logprobs else None,
                )
            )
            sample.sent_tokens = len(tokens)
            sample.sent_logprobs = len(sample.logprobs)
        if group.params.prompt_logprobs is not None and group.prompt_logprobs is None and self._prompt_logprobs_done(group):
            # converted once, when every prompt position has its entry; the list never changes after
            lead = group.samples[0].request
            group.prompt_logprobs = [None] + [self._position_logprobs(e) for e in lead.prompt_logprobs]  # the first has none
        finished = group.finished
        if finished:
            self._forget(group)
        lead = group.samples[0].request
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=group.prompt_logprobs,
            metrics=RequestMetrics(lead.arrival_time, lead.first_scheduled_time, lead.first_token_time),
            num_cached_tokens=lead.num_cached_tokens,
            error=group.error or next((s.request.error for s in group.samples if s.request.error), None),
        )

    def _error_output(self, group: _Group) -> RequestOutput:
        """The final output of a group whose output could not be built: the error alone."""
        self._forget(group)
        completions = [CompletionOutput(i, "", [], "error") for i in range(len(group.samples))]
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished=True,
                             error=group.error)

    def _forget(self, group: _Group) -> None:
        self.groups.pop(group.request_id, None)
        for sample in group.samples:
            self._sample_group.pop(sample.request.request_id, None)
