"""The scheduler: which tokens of which requests run in the next step.

It schedules tokens, not phases. Every request has `num_computed_tokens` catching up with
`num_tokens` (prompt + output so far); a step gives each chosen request up to its remaining count,
clipped by the per-step token budget. A long prompt is therefore split over several steps
(chunked prefill) while running decodes keep getting their one token per step. Running requests
are served first, in arrival order; waiting ones fill what is left of the budget.

When the KV cache runs out of blocks, the most recently admitted running request is preempted:
its blocks are freed and it goes back to the front of the waiting queue with
`num_computed_tokens = 0`, to be recomputed (prompt and the outputs it already has) later.

With prefix caching, a request being admitted first takes the longest cached prefix of its full
blocks and starts computing after it (a preempted request usually finds most of its own blocks
still cached); each step files newly full blocks in the cache.
"""

from __future__ import annotations

import time
from collections import deque

from xllm.config import SchedulerConfig
from xllm.kv.manager import KVCacheManager
from xllm.scheduler.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from xllm.scheduler.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._ended_while_scheduling: list[Request] = []

    # ---- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, reason: str, stop_reason: str | int | None = None) -> Request | None:
        """End a request from outside a step (abort, a stop string): drop it from its queue, free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.finish(reason, stop_reason)
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

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- one step -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []

        # 1. Running requests, oldest first: decodes and unfinished prompt chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.tokens_to_compute(), budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                victim = self.running.pop()  # the newest request gives way
                if victim is request and not self.running:
                    # Alone and still out of blocks: it can never grow; end it rather than loop.
                    request.finish("length")
                    self._release(request)
                    self._ended_while_scheduling.append(request)
                    out.preempted_ids.append(request.request_id)
                    break
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                chosen.append((request, num_new))
                budget -= num_new
                i += 1
                continue
            # `request` itself was preempted or ended; it is no longer in running[i].

        # 2. Waiting requests, in order, while budget, sequence slots and blocks last.
        # After a preemption nothing new is admitted this step (memory is short).
        while self.waiting and budget > 0 and not out.preempted_ids and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            if request.share_prompt_with is not None and not self._share_prompt(request):
                break  # its sibling is still computing the prompt; take it next step
            cached = self._cached_prefix(request)
            hit = len(cached) * self.kv.block_size
            remaining = request.num_tokens - request.num_computed_tokens - hit
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + hit + num_new, cached):
                break
            if request.num_computed_tokens == 0 and not request.num_preemptions:
                self.kv.record_lookup(len(request.prompt_token_ids), hit)
                request.num_cached_tokens = hit
            request.num_computed_tokens += hit
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chosen.append((request, num_new))
            budget -= num_new

        for request, num_new in chosen:
            start = request.num_computed_tokens
            prompt_len = len(request.prompt_token_ids)
            out.scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=request.all_token_ids[start : start + num_new],
                    start_pos=start,
                    block_ids=list(self.kv.block_ids(request.request_id)),
                    sample=start + num_new == request.num_tokens,
                    sampling=request.sampling,
                    want_prompt_logprobs=request.params.prompt_logprobs is not None
                    and start < prompt_len - 1
                    and len(request.prompt_logprobs) < prompt_len - 1,
                )
            )
        return out

    def _cached_prefix(self, request: Request) -> list[int]:
        """Prefix-cache hits for a request about to be admitted with nothing computed or held.
        Requests that want prompt logprobs compute their whole prompt (they need every position)."""
        if request.num_computed_tokens or self.kv.block_ids(request.request_id) or request.params.prompt_logprobs is not None:
            return []
        return self.kv.find_cached_prefix(request.request_id, request.all_token_ids, request.cache_salt)

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
        """Record a finished step; return the requests that got a new token (finished ones included)."""
        changed, self._ended_while_scheduling = self._ended_while_scheduling, []
        for item in out.scheduled:
            request = self.requests.get(item.request_id)
            if request is None or request.finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(item.token_ids)
            if request.num_computed_tokens // self.kv.block_size > self.kv.num_cached_blocks(request.request_id):
                self.kv.cache_computed(request.request_id, request.all_token_ids, request.num_computed_tokens, request.cache_salt)
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
            if request.check_stop():
                self.running.remove(request)
                self._release(request)
            changed.append(request)
        return changed
