"""The scheduler: which tokens of which requests run in the next step.

It schedules tokens, not phases. Every request has `num_computed_tokens` catching up with
`num_tokens` (prompt + output so far); a step gives each chosen request up to its remaining count,
clipped by the per-step token budget and the per-request chunk (`max_prefill_chunk`). A long
prompt is therefore split over several steps (chunked prefill).

Three batch policies share this one loop (`scheduling_policy`):
- `chunked` (default): running requests first (decodes, unfinished prompt chunks), then waiting
  ones fill what is left of the budget in the same step;
- `prefill-first`: while a waiting prompt can be admitted or a prompt is unfinished, steps run
  prompts only (waiting ones whole), no decodes: the best TTFT, at the cost of inter-token spikes;
- `decode-first`: while requests run, steps decode only; new prompts are admitted when fewer than
  `decode_first_min_running` run or the first waiting request has waited
  `decode_first_max_wait_steps` steps (the best inter-token latency, no starvation).

Waiting requests are taken by priority (lower first), then arrival. A waiting request's priority
improves by one every `priority_aging_steps` steps it waits, so a long stream of higher-priority
work cannot starve it. When the KV cache runs out of blocks, the running request that ranks last
(lowest priority, latest arrival) is preempted: its blocks are freed and it returns to the
waiting queue, where its arrival time keeps its place. With prefix caching its computed full
blocks stay cached; with a host (or disk) tier they are swapped down when another request takes
the room, and promoted back when it is readmitted. Only what no tier kept (at least the last,
partial block) is recomputed; without caching, all of it. A waiting request may also preempt
running ones that rank below it when it cannot get blocks. A request past its deadline
(`timeout`) is ended with finish reason "timeout" and its blocks freed.

With prefix caching, a request being admitted first takes the longest cached prefix of its full
blocks and starts computing after it; each step files newly full blocks in the cache.

Pipelining: `schedule` advances `num_computed_tokens` as it schedules, and a step that samples
leaves a placeholder for the token it will produce. So the next step can be scheduled while this
one computes (the engine does so in its helper thread): a request whose token is still in flight
gets a decode whose input is that placeholder (the workers fill it in from their own copy of
the request, to which that step appends its token), and one whose steps in flight already sample its last allowed token
(`max_tokens`) is not scheduled again. `update` then records the step: tokens, stops, and the
prefix-cache blocks its computed tokens filled. An item whose request ended or was preempted
after it was scheduled is void; the engine drops it before the step runs.
"""

from __future__ import annotations

import time

from xllm.config import SchedulerConfig
from xllm.kv.connector import PrefixLookup
from xllm.kv.manager import KVCacheManager
from xllm.scheduler.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from xllm.scheduler.request import Request, RequestStatus

_WAITING = (RequestStatus.WAITING, RequestStatus.WAITING_FOR_KV)
MAX_KV_WAIT_S = 10.0  # how long a request may wait for lower-tier reads of its prefix


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # in no particular order; `_queue()` ranks them
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.step_count = 0
        # Requests that got their first step, and that ended before getting one (abort, timeout):
        # with the adds, these give exactly how many requests wait for their first step.
        self.num_first_scheduled = 0
        self.num_ended_unscheduled = 0
        self._ended_while_scheduling: list[Request] = []

    # ---- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        request.enqueued_step = self.step_count
        self.waiting.append(request)

    def finish_request(
        self, request_id: str, reason: str, stop_reason: str | int | None = None, error: str | None = None
    ) -> Request | None:
        """End a request from outside a step (abort, a stop string, an error of its own): drop it
        from its queue, free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
            if request.first_scheduled_time is None:
                self.num_ended_unscheduled += 1
        request.finish(reason, stop_reason)
        request.error = error
        self._release(request)
        return request

    def abort(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def _release(self, request: Request) -> None:
        self.kv.free(request.request_id)
        self.requests.pop(request.request_id, None)

    def _rank(self, request: Request) -> tuple:
        """Sort key: effective priority (aged while waiting), then arrival. Lower runs first."""
        aging = self.config.priority_aging_steps
        waited = self.step_count - request.enqueued_step if request.status in _WAITING else 0
        return (request.priority - (waited // aging if aging else 0), request.arrival_time, request.request_id)

    def _queue(self) -> list[Request]:
        return sorted(self.waiting, key=self._rank)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_placeholders = 0  # a step in flight still records its token (`update`)
        request.status = RequestStatus.WAITING
        request.workers_know = False  # its blocks are freed: the workers drop their copy, it is sent again
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def _expire(self) -> None:
        """End every request whose deadline has passed."""
        now = time.monotonic()
        for request in [r for r in (*self.running, *self.waiting) if r.deadline is not None and r.deadline <= now]:
            self.finish_request(request.request_id, "timeout")
            self._ended_while_scheduling.append(request)

    def _chunk(self, request: Request, budget: int) -> int:
        remaining = request.tokens_to_compute()
        cap = self.config.max_prefill_chunk
        if cap is not None and remaining > 1:
            remaining = min(remaining, cap)
        return min(remaining, budget)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        out = SchedulerOutput()
        self._expire()
        self.running.sort(key=self._rank)  # best first: preemption victims come from the end
        prefill_step = self.config.scheduling_policy == "prefill-first" and (
            self._can_admit_one() or any(r.num_computed_tokens < len(r.prompt_token_ids) for r in self.running)
        )
        chosen = self._fill(out, prefill_step)
        if prefill_step and not chosen:  # nothing could start after all: decode instead
            chosen = self._fill(out, False)
        self._emit(out, chosen)
        out.freed_ids = self.kv.take_freed()
        out.kv_meta = self.kv.take_connector_meta(nothing_else_runs=not out.scheduled)
        return out

    def _emit(self, out: SchedulerOutput, chosen: list[tuple[Request, int]]) -> None:
        """Append the chosen (request, token count) pairs to the step as values, advancing their
        computed counts and leaving a placeholder for each token the step will sample. A request
        the workers do not know yet (new, or readmitted after a preemption) carries itself; every
        item carries only the blocks the workers were not sent yet."""
        for request, num_new in chosen:
            start = request.num_computed_tokens
            end = start + num_new
            prompt_len = len(request.prompt_token_ids)
            if end - request.num_tokens > 1:
                raise AssertionError(f"request {request.request_id!r}: {end - request.num_tokens} input tokens not sampled yet")
            sample = end == request.num_tokens + request.num_placeholders
            new = None
            if not request.workers_know:
                new, request.workers_know, request.num_sent_blocks = request.new_request_data(), True, 0
            blocks = self.kv.block_ids(request.request_id)
            offset = request.num_sent_blocks
            request.num_sent_blocks = len(blocks)
            out.scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    num_tokens=num_new,
                    start_pos=start,
                    block_offset=offset,
                    new_block_ids=blocks[offset:],
                    sample=sample,
                    want_prompt_logprobs=request.params.prompt_logprobs is not None
                    and start < prompt_len - 1
                    and len(request.prompt_logprobs) < prompt_len - 1,
                    new=new,
                    epoch=request.num_preemptions,
                )
            )
            request.num_computed_tokens = end
            request.num_placeholders += sample

    def _fill(self, out: SchedulerOutput, prefill_step: bool) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        # 1. Running requests, best ranked first: decodes and unfinished prompt chunks (in a
        #    prefill-first prefill step, only the chunks).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            in_prompt = request.num_computed_tokens < len(request.prompt_token_ids)
            num_new = self._chunk(request, budget) if (in_prompt or not prefill_step) and not request.at_length_cap else 0
            if num_new <= 0:
                i += 1
                continue
            if self._allocate_or_preempt(request, num_new, out):
                chosen.append((request, num_new))
                budget -= num_new
                i += 1
            # else `request` was preempted or ended; running[i] is now the next one.

        # 2. Waiting requests by rank, while budget, sequence slots and blocks last.
        if self._admitting(self.config.scheduling_policy):
            chosen += self._admit_waiting(out, budget, whole=prefill_step)
        # A request preempted by a higher-priority admission gives up its place in this step.
        return [(r, n) for r, n in chosen if r.status is RequestStatus.RUNNING]

    def _admit_waiting(self, out: SchedulerOutput, budget: int, whole: bool) -> list[tuple[Request, int]]:
        """Waiting requests by rank, while `budget` tokens, sequence slots and blocks last. After a
        preemption nothing new is admitted this step (memory is short)."""
        chosen: list[tuple[Request, int]] = []
        for request in self._queue():
            if budget <= 0 or out.preempted_ids or len(self.running) >= self.config.max_num_seqs:
                break
            num_new = self._admit(request, budget, whole=whole, out=out)
            if num_new is None:
                break
            if num_new:  # 0: it waits for its KV to be read in; the next ones may start
                chosen.append((request, num_new))
                budget -= num_new
        return chosen

    def admit_more(self, out: SchedulerOutput) -> bool:
        """Admit waiting requests into a step scheduled earlier, within the token budget and
        sequence slots it left. The engine calls it, between steps, for requests that arrived
        after it scheduled that step ahead, so that pipelining does not cost them a step of TTFT.
        Not under prefill-first, whose steps are all prompts or all decodes, nor after a
        preemption (memory is short). A running request preempted for a higher-priority one here
        leaves its item in `out` void (the engine drops it). True if anything joined."""
        policy = self.config.scheduling_policy
        if policy == "prefill-first" or out.preempted_ids or not self._admitting(policy):
            return False
        chosen = self._admit_waiting(out, self.config.max_num_batched_tokens - out.num_batched_tokens, whole=False)
        chosen = [(r, n) for r, n in chosen if r.status is RequestStatus.RUNNING]
        self._emit(out, chosen)
        out.kv_meta.extend(self.kv.take_connector_meta())
        return bool(chosen)

    def _admitting(self, policy: str) -> bool:
        """Whether waiting requests may join this step."""
        if not self.waiting:
            return False
        if policy != "decode-first" or len(self.running) < self.config.decode_first_min_running:
            return True
        oldest = min(self.waiting, key=lambda r: r.enqueued_step)
        return self.step_count - oldest.enqueued_step >= self.config.decode_first_max_wait_steps

    def _can_admit_one(self) -> bool:
        """prefill-first: is there a waiting request that could start now (slot and blocks)?"""
        if not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return False
        first = self._queue()[0]
        total = first.num_computed_tokens + min(first.tokens_to_compute(), self.config.max_num_batched_tokens)
        return self.kv.can_allocate(first.request_id, total) or bool(self._victims_below(first))

    def _victims_below(self, request: Request) -> list[Request]:
        """Running requests that rank strictly below `request` in priority, worst first."""
        mine = self._rank(request)[0]
        return sorted((r for r in self.running if r.priority > mine), key=self._rank, reverse=True)

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        """Blocks for a running request's next tokens, preempting the last-ranked running requests
        as needed; False if `request` itself was preempted or ended instead. With look-ahead on and
        a free block per running request to spare, the block of the token after these is taken
        too (never at the cost of a preemption)."""
        total = request.num_computed_tokens + num_new
        if self.kv.lookahead and self.kv.num_free_blocks > len(self.running) and self.kv.allocate_slots(request.request_id, total + 1):
            return True
        while not self.kv.allocate_slots(request.request_id, total):
            victim = self.running[-1]  # ranked last
            if victim is request and len(self.running) == 1:
                # Alone and still out of blocks: it can never grow; end it rather than loop.
                self.running.remove(request)
                request.finish("length")
                self._release(request)
                self._ended_while_scheduling.append(request)
                out.preempted_ids.append(request.request_id)
                return False
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit(self, request: Request, budget: int, whole: bool, out: SchedulerOutput) -> int | None:
        """Admit a waiting request with up to `budget` tokens (its whole prompt if `whole` and it
        fits); returns the tokens scheduled, or None if it cannot start now (admission stops)."""
        if request.share_prompt_with is not None and not self._share_prompt(request):
            return None  # its sibling is still computing the prompt; take it next step
        lookup = self._cached_prefix(request)
        if lookup.pending:  # its prefix is being read from a lower tier; the others go on meanwhile
            request.status = RequestStatus.WAITING_FOR_KV
            return 0
        cached = lookup.blocks
        hit = len(cached) * self.kv.block_size
        remaining = request.num_tokens - request.num_computed_tokens - hit
        cap = self.config.max_prefill_chunk if not whole else None
        num_new = min(remaining, budget, cap or remaining)
        full = self.config.max_num_batched_tokens
        if num_new < remaining and (
            not self.config.enable_chunked_prefill
            # prefill-first runs prompts whole; only one longer than the whole budget is split, alone
            or (whole and (remaining <= full or budget < full))
        ):
            return None
        total = request.num_computed_tokens + hit + num_new
        while not self.kv.allocate_slots(request.request_id, total, cached):
            victims = self._victims_below(request)
            if not victims:
                return None
            self._preempt(victims[0])  # a higher-priority request takes the blocks of a lower one
            out.preempted_ids.append(victims[0].request_id)
        if request.num_computed_tokens == 0 and not request.num_preemptions:
            self.kv.record_lookup(len(request.prompt_token_ids), hit)
            request.num_cached_tokens = hit
        request.num_computed_tokens += hit
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
            self.num_first_scheduled += 1
        self.running.append(request)
        return num_new

    def _cached_prefix(self, request: Request) -> PrefixLookup:
        """Prefix-cache hits for a request about to be admitted with nothing computed or held, and
        whether more of its prefix is still being read from a lower tier. Requests that want
        prompt logprobs compute their whole prompt (they need every position)."""
        if request.num_computed_tokens or self.kv.block_ids(request.request_id) or request.params.prompt_logprobs is not None:
            return PrefixLookup([])
        # A request waits for reads of its prefix for a bounded time (each wait brings more of it
        # in); past that it takes what is cached and computes the rest.
        now = time.monotonic()
        waited = 0.0 if request.kv_wait_since is None else now - request.kv_wait_since
        lookup = self.kv.find_cached_prefix(request.request_id, request.all_token_ids, request.cache_salt,
                                            fetch=waited < MAX_KV_WAIT_S)
        request.kv_wait_since = (request.kv_wait_since or now) if lookup.pending else None
        return lookup

    def _share_prompt(self, request: Request) -> bool:
        """Before admitting sample i > 0 of an n > 1 request: reuse sample 0's prompt blocks.

        Returns False while sample 0 is still computing its prompt (wait for it). All full blocks
        but the one holding the last prompt token are shared; the rest is recomputed, so this
        sample computes its own last-position logits.
        """
        leader = self.requests.get(request.share_prompt_with)
        prompt_len = len(request.prompt_token_ids)
        if leader is not None and not leader.finished and leader.num_computed_tokens < prompt_len:
            return False
        request.share_prompt_with = None
        if leader is not None and leader.status is RequestStatus.RUNNING:
            bs = self.kv.block_size
            request.num_computed_tokens = self.kv.share_prefix(
                leader.request_id, request.request_id, (prompt_len - 1) // bs * bs
            )
        return True

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Record a finished step; return the requests that got a new token (finished ones included).
        A request preempted after the step was scheduled still gets the token the step sampled
        (it was computed from intact KV); it recomputes from the start when readmitted."""
        changed, self._ended_while_scheduling = self._ended_while_scheduling, []
        self.kv.connector_update(result.kv_output)
        for request_id, message in result.failed.items():  # this request's inputs could not be built
            request = self.finish_request(request_id, "error", error=message)
            if request is not None:
                changed.append(request)
        bs = self.kv.block_size
        for item in out.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.finished:
                continue  # ended while the step ran (its item was dropped, or its token is void)
            if request.num_preemptions == item.epoch:
                request.num_placeholders -= item.sample
                computed = item.start_pos + item.num_tokens
                if computed // bs > self.kv.num_cached_blocks(request.request_id):
                    self.kv.cache_computed(request.request_id, request.all_token_ids, computed, request.cache_salt)
            if item.request_id in result.prompt_logprobs:
                request.add_prompt_logprobs(*result.prompt_logprobs[item.request_id])
            token = result.sampled_token_ids.get(item.request_id)
            if token is None:
                continue
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if item.request_id in result.logprobs:
                request.logprobs.append(result.logprobs[item.request_id])
            queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
            if request.check_stop():
                queue.remove(request)
                self._release(request)
            changed.append(request)
        return changed
