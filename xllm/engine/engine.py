"""The engine: request lifecycle around one scheduler, one KV manager and one model runner.

`add_request` validates and tokenizes; `step` runs one scheduler step through the runner and
returns what changed, detokenized incrementally, with stop strings applied. Bad input raises
`ValueError` before any state changes, so the engine stays usable for the next request.

A request with n > 1 becomes n scheduler requests ("samples"); samples 1..n-1 reuse the KV
blocks of sample 0's prompt. The engine gathers them back into one `RequestOutput`.

By default the CPU work around a step runs in a helper thread while the step computes (`step`):
the previous step's output processing (detokenization, stop strings, outputs) and the scheduling
and input layout of the next step. `EngineConfig.overlap=False` runs them in turn.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from xllm.config import EngineConfig
from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.kv.manager import KVCacheManager
from xllm.kv.tiers import KVTiers
from xllm.models.huge_pages import huge_page_kib, to_huge_pages
from xllm.models.loader import load_model
from xllm.ops import cpu_kernels
from xllm.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput, SchedulerOutput, TokenLogprobs
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler
from xllm.worker.model_runner import ModelRunner, StepInputs, kv_bytes_per_block

logger = logging.getLogger(__name__)


@dataclass
class StepTiming:
    """Where the engine loop's time goes (seconds, summed over steps); `benchmarks/overlap.py` reads it."""

    steps: int = 0
    wall_s: float = 0.0  # whole turns of `step`
    process_s: float = 0.0  # detokenization, stop strings, outputs
    schedule_s: float = 0.0  # scheduling and input layout (in the helper, during the step before, when overlapped)


@dataclass
class _Sample:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # converted so far
    sent_tokens: int = 0


@dataclass
class _Group:
    """One user request: its prompt and its n samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    prompt_logprobs: list[PositionLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.request.finished for s in self.samples)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        cpu_kernels.set_enabled(config.compiled_kernels)
        if config.compiled_kernels:
            cpu_kernels.load()
        loaded = load_model(config.model)
        if config.packed_weights and hasattr(loaded.model, "prepack_weights"):
            extra = loaded.model.prepack_weights()
            if extra:
                logger.info("prepacked float32 weight copies for batches past the skinny kernel: %.0f MiB more", extra / 2**20)
        self.weights_arena = to_huge_pages(loaded.model) if config.huge_pages else None
        if self.weights_arena is not None:
            logger.info("weights on transparent huge pages: %.0f MiB, %.0f MiB granted so far",
                        self.weights_arena.nbytes / 2**20, huge_page_kib(self.weights_arena) / 1024)
        self.model_source = loaded.source
        self.arch = loaded.arch
        self.dtype = loaded.dtype
        self.tokenizer = loaded.tokenizer
        limit = loaded.arch.max_position_embeddings
        max_len = config.model.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length {limit}")
        self.max_model_len = max_len
        self.runner = ModelRunner(
            loaded.model, loaded.arch, config.cache, loaded.dtype, seed=config.seed, max_model_len=max_len,
            max_num_seqs=config.scheduler.max_num_seqs,
        )
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching, self._tiers(config.cache)
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        eos = set(loaded.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()
        # Overlap: a step's output processing runs in this helper thread while the next step computes.
        self._helper = ThreadPoolExecutor(1, "xllm-outputs") if config.overlap else None
        self.kv.lookahead = config.overlap and config.cache.kv_layout == "xtensor"  # the helper maps it ahead
        self._pending: tuple[SchedulerOutput, list[Request], RunnerOutput] | None = None  # recorded, not yet processed
        self._ahead: tuple[SchedulerOutput, StepInputs | None] | None = None  # scheduled during the last forward pass
        self._prev_result: RunnerOutput | None = None  # its tokens fill the next step's placeholders
        self._arrived = False  # requests were added since the step ahead was scheduled
        self.output_sink: Callable[[list[RequestOutput]], None] | None = None
        self.timing = StepTiming()
        self._groups: dict[str, _Group] = {}
        self._sample_group: dict[str, tuple[_Group, int]] = {}  # scheduler request id -> (group, index)
        self._token_text: dict[int, str] = {}

    # ---- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give the prompt as token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids")
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for a vocabulary of {vocab}")
        return list(prompt)

    def validate_prompt_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens, but the context limit (max_model_len) is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one generated token"
            )
        if not self.kv.can_ever_fit(num_tokens + 1):
            capacity = self.kv.num_blocks * self.kv.block_size
            raise ValueError(f"prompt has {num_tokens} tokens, more than the KV cache holds ({capacity} tokens)")

    def _tiers(self, cache) -> KVTiers | None:
        """The host and disk tiers under the prefix cache, when configured (and caching is on)."""
        if not cache.enable_prefix_caching or not (cache.kv_host_memory_gib > 0 or cache.kv_disk_dir):
            return None
        per_block = kv_bytes_per_block(self.arch, cache.block_size, self.dtype)
        host_blocks = int(cache.kv_host_memory_gib * (1 << 30)) // per_block
        disk_bytes = int(cache.kv_disk_gib * (1 << 30)) if cache.kv_disk_dir else 0
        logger.info(
            "prefix-cache tiers: host %d blocks (%.2f GiB), disk %s", host_blocks, host_blocks * per_block / (1 << 30),
            f"{cache.kv_disk_dir} (up to {cache.kv_disk_gib:g} GiB)" if disk_bytes else "off",
        )
        return KVTiers(self.runner.kv_caches, host_blocks, cache.kv_disk_dir, disk_bytes)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> str:
        """Queue a request; `arrival_time` (time.monotonic()) defaults to now. Requests with different
        `cache_salt`s never share prefix-cache blocks (tenant isolation). Lower `priority` runs
        first. After `timeout` seconds from arrival the request ends with finish reason "timeout"."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling params must be a SamplingParams")
        token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt_length(len(token_ids))
        request_id = request_id if request_id is not None else str(next(self._ids))
        sample_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if request_id in self._groups or any(s in self.scheduler.requests for s in sample_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= self.eos_token_ids
        room = self.max_model_len - len(token_ids)
        group = _Group(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, [])
        for i, sample_id in enumerate(sample_ids):
            sample_params = params if params.n == 1 else params.for_sample(i)
            if i > 0:
                sample_params.prompt_logprobs = None  # sample 0 reports them for the group
            request = Request(
                request_id=sample_id,
                prompt_token_ids=token_ids,
                params=sample_params,
                stop_token_ids=frozenset(stop),
                max_output_tokens=min(params.max_tokens or room, room),
                generator=torch.Generator().manual_seed(sample_params.seed) if sample_params.seed is not None else None,
                share_prompt_with=sample_ids[0] if i > 0 else None,
                cache_salt=cache_salt,
                priority=priority,
            )
            if arrival_time is not None:
                request.arrival_time = arrival_time
            if timeout is not None:
                request.deadline = request.arrival_time + timeout
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output)
            group.samples.append(_Sample(request, detok))
            self._sample_group[sample_id] = (group, i)
        self._groups[request_id] = group
        for sample in group.samples:
            self.scheduler.add(sample.request)
        self._arrived = True
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        group = self._groups.get(request_id)
        if group is None:
            return None
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.abort(sample.request.request_id)
        return self._output(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or self._pending is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One turn of the loop; returns the requests whose output changed.

        Serial (`overlap=False`): schedule, run the step, record its tokens, detokenize. Pipelined
        (the default): while step N's forward pass runs on this thread, the helper thread first
        processes step N-1 (detokenizes its tokens, applies stop strings, builds the outputs), then
        schedules step N+1 and lays out its inputs; a decode whose input token N is still sampling
        gets a placeholder. When N's forward pass ends, its tokens are recorded (token-level stops
        applied), and the next turn fills them into N+1's placeholders, drops N+1's items whose
        request ended meanwhile, and runs it. Outputs go to `output_sink` from the helper as soon
        as they are built when one is set (the server streams them while the next step computes);
        otherwise this call returns them, one turn later. The forward pass stays on the calling
        thread: the thread that runs torch's parallel regions must be the one that always does
        (AsyncLLM's note on OpenMP teams); the helper runs Python and small tensor building only."""
        started = time.perf_counter()
        if self._helper is None:
            scheduled, inputs = self._schedule()
            result = self._run(scheduled, inputs=inputs)
            outputs = self._process(scheduled, self.scheduler.update(scheduled, result), result)
        else:
            outputs = self._step_overlapped()
        self.timing.steps += 1
        self.timing.wall_s += time.perf_counter() - started
        return outputs

    def _run(
        self, scheduled: SchedulerOutput, before_forward: Callable[[], None] | None = None, inputs: StepInputs | None = None,
        prev: RunnerOutput | None = None,
    ) -> RunnerOutput:
        if scheduled.is_empty:
            self.runner.release(scheduled.freed_ids)
            if before_forward is not None:
                before_forward()
            return RunnerOutput()
        return self.runner.execute(scheduled, before_forward, inputs, prev)

    def _schedule(self) -> tuple[SchedulerOutput, StepInputs | None]:
        """Schedule the next step and lay out its inputs (in the helper thread while a step computes)."""
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        inputs = self.runner.layout(scheduled) if not scheduled.is_empty else None
        self.timing.schedule_s += time.perf_counter() - started
        return scheduled, inputs

    def _schedule_ahead(self) -> tuple[SchedulerOutput, StepInputs | None]:
        scheduled, inputs = self._schedule()
        if self.kv.lookahead:
            self.runner.map_ahead(scheduled)  # its pages, mapped before it needs them
        return scheduled, inputs

    def _next_step(self) -> tuple[SchedulerOutput, StepInputs | None]:
        """The step to run now: the one scheduled during the last forward pass, joined by requests
        that arrived since (within the budget it left), less the items whose request ended since
        (a stop, an abort, a timeout, a preemption by a joining request), or, when that leaves
        nothing, a step scheduled now. The ranges of every request freed so far are released
        before it runs."""
        ahead, self._ahead = self._ahead, None
        arrived, self._arrived = self._arrived, False
        if ahead is not None:
            scheduled, inputs = ahead
            if arrived and self.scheduler.admit_more(scheduled):
                inputs = None  # requests that arrived since it was scheduled joined it: laid out again
            live = [item for item in scheduled.scheduled if self._live(item)]
            if len(live) < len(scheduled.scheduled):
                scheduled.scheduled, inputs = live, None  # laid out again, without them
        if ahead is None or (scheduled.is_empty and self.scheduler.has_unfinished()):
            freed = scheduled.freed_ids if ahead is not None else []
            scheduled, inputs = self._schedule()
            scheduled.freed_ids[:0] = freed
        scheduled.freed_ids += self.kv.take_freed()
        return scheduled, inputs

    def _live(self, item) -> bool:
        request = self.scheduler.requests.get(item.request_id)
        return request is not None and not request.finished and request.num_preemptions == item.epoch

    def _written_blocks(self, scheduled: SchedulerOutput) -> frozenset[int]:
        bs = self.kv.block_size
        return frozenset(
            b for item in scheduled.scheduled
            for b in item.block_ids[item.start_pos // bs : (item.start_pos + len(item.token_ids) - 1) // bs + 1]
        )

    def _step_overlapped(self) -> list[RequestOutput]:
        scheduled, inputs = self._next_step()
        pending, self._pending = self._pending, None
        prev, self._prev_result = self._prev_result, None
        jobs = {}

        def launch():  # once this step's inputs are bound (no contention for the GIL with that)
            if pending is not None:
                jobs["outputs"] = self._helper.submit(self._process_to_sink, *pending)
            if not scheduled.is_empty:
                if self.kv.tiers is not None:
                    self.kv.busy_blocks = self._written_blocks(scheduled)
                jobs["ahead"] = self._helper.submit(self._schedule_ahead)

        try:
            # step N computes while the helper processes step N-1's outputs and schedules step N+1
            result = self._run(scheduled, launch, inputs, prev)
        finally:
            if not jobs:
                launch()  # the step failed before its forward pass: still process N-1
            try:
                outputs = jobs["outputs"].result() if "outputs" in jobs else []
                if "ahead" in jobs:
                    self._ahead = jobs["ahead"].result()
            finally:
                self.kv.busy_blocks = frozenset()
        changed = self.scheduler.update(scheduled, result)
        self._prev_result = result
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
        """Detokenize the step's new tokens, apply stop strings, build the changed requests' outputs."""
        started = time.perf_counter()
        changed: dict[str, _Group] = {}
        for request in requests:
            if request.request_id not in self._sample_group:
                continue  # aborted after its step was recorded: its output was already final
            group, index = self._sample_group[request.request_id]
            sample = group.samples[index]
            check = len(request.output_token_ids) >= request.params.min_tokens
            stop = sample.detokenizer.update(request.output_token_ids, finished=request.finished, check_stop=check)
            if stop is not None and not request.finished:
                self.scheduler.finish_request(request.request_id, "stop", stop)
            changed[group.request_id] = group
        for item in scheduled.scheduled:  # prompt logprobs arrive with prompt chunks, before any token
            if item.request_id in result.prompt_logprobs and item.request_id in self._sample_group:
                group = self._sample_group[item.request_id][0]
                changed[group.request_id] = group
        outputs = [self._output(g) for g in changed.values()]
        self.timing.process_s += time.perf_counter() - started
        return outputs

    # ---- outputs --------------------------------------------------------------------------
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

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for index, sample in enumerate(group.samples):
            request = sample.request
            finished = request.finished
            delta = sample.detokenizer.take_delta(finished)
            if group.params.logprobs is not None:
                for entry in request.logprobs[len(sample.logprobs) :]:
                    sample.logprobs.append(self._position_logprobs(entry))
            tokens = request.output_token_ids
            completions.append(
                CompletionOutput(
                    index=index,
                    text=sample.detokenizer.visible_text,
                    token_ids=list(tokens),
                    finish_reason=request.finish_reason,
                    stop_reason=request.stop_reason,
                    logprobs=list(sample.logprobs) if group.params.logprobs is not None else None,
                    delta_text=delta,
                    delta_token_ids=tokens[sample.sent_tokens :],
                )
            )
            sample.sent_tokens = len(tokens)
        if group.params.prompt_logprobs is not None:
            lead = group.samples[0].request
            have = 0 if group.prompt_logprobs is None else len(group.prompt_logprobs) - 1
            group.prompt_logprobs = (group.prompt_logprobs or [None]) + [
                self._position_logprobs(e) for e in lead.prompt_logprobs[have:]
            ]
        finished = group.finished
        if finished:
            del self._groups[group.request_id]
            for sample in group.samples:
                self._sample_group.pop(sample.request.request_id, None)
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
        )
