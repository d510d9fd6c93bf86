"""The engine behind a server: one background thread steps `LLMEngine`; asyncio streams per request.

The engine thread owns the engine: it takes commands (add, abort) from a queue between steps,
runs `step()` while anything is unfinished, and sleeps on an event when idle. The forward pass
releases the GIL, so the event loop keeps serving HTTP while a step computes.

Each step's outputs go to the event loop in one `call_soon_threadsafe` callback, which puts
them in the requests' streams. A stream never blocks the engine: if its client is slow, new
outputs are merged into the one still unread (text and token deltas concatenated), so a slow
reader gets bigger pieces, and other requests do not wait for it.

A request whose consumer goes away (client disconnect, cancellation) is aborted, and its KV
blocks are freed, at the engine thread's next turn. If a step raises, the engine is dead: every
stream gets `EngineDeadError`, and `healthy` turns false (the server's /health fails).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable

import torch

from xllm.config import EngineConfig
from xllm.engine.engine import LLMEngine
from xllm.engine.metrics import EngineMetrics
from xllm.outputs import RequestOutput
from xllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an error; no request can run until the process restarts."""


class RequestFailedError(RuntimeError):
    """This request failed on its own (finish reason "error"); the engine and the others go on."""


class OverloadedError(RuntimeError):
    """The waiting queue is at its bound; retry later."""


class _Stream:
    """Outputs of one request, from the engine to its one consumer; merges what is unread.

    Merging appends the new deltas to the unread ones in place (lists extended, text pieces
    gathered and joined once when read), so a slow reader costs O(tokens), not O(tokens^2)."""

    def __init__(self, arrival_time: float, num_prompt_tokens: int):
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_generated = 0
        self._pending: RequestOutput | BaseException | None = None
        self._texts: list[list[str]] = []  # per sample: the unread text pieces of `_pending`
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self._pending
        if isinstance(pending, BaseException):
            return  # an error is final
        if isinstance(item, RequestOutput):
            if isinstance(pending, RequestOutput):
                for old, new, texts in zip(pending.outputs, item.outputs, self._texts):
                    old.delta_token_ids.extend(new.delta_token_ids)
                    new.delta_token_ids = old.delta_token_ids
                    if new.delta_logprobs is not None and old.delta_logprobs is not None:
                        old.delta_logprobs.extend(new.delta_logprobs)
                        new.delta_logprobs = old.delta_logprobs
                    texts.append(new.delta_text)
            else:
                self._texts = [[c.delta_text] for c in item.outputs]
        self._pending = item
        self._ready.set()

    async def get(self) -> RequestOutput:
        await self._ready.wait()
        self._ready.clear()
        item, self._pending = self._pending, None
        if isinstance(item, BaseException):
            raise item
        for c, texts in zip(item.outputs, self._texts):
            c.delta_text = "".join(texts)
        self._texts = []
        return item


class Reservation:
    """Room in the waiting queue taken for `count` engine requests (samples) before they are
    queued, so that a burst of callers cannot all pass the bound check first. `generate` uses it
    up; whatever was not used goes back with `release` (always call it, e.g. in a `finally`)."""

    def __init__(self, llm: "AsyncLLM", count: int):
        self._llm = llm
        self.left = count

    def use(self, count: int) -> None:
        self.left -= count

    def release(self) -> None:
        self._llm._released += max(self.left, 0)
        self.left = 0


def _warm_up(engine: LLMEngine) -> None:
    """Run one tiny request through the engine, so the first user request does not pay first-call costs."""
    engine.add_request([0], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), "warm-up")
    while engine.has_unfinished_requests():
        engine.step()


class AsyncLLM:
    """An engine stepped by its own thread, with asyncio streams per request.

    Build it with `from_config`: the engine thread then also loads the model, so that it is the
    only thread that ever runs torch's parallel regions. (A second thread running torch ops gets
    a second OpenMP team; with more OpenMP threads than cores, libgomp stops spin-waiting between
    parallel regions, and a decode step on 2 cores loses ~20% to sleeping and waking its workers.)
    """

    def __init__(self, engine: LLMEngine | None, model_name: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.metrics: EngineMetrics | None = None
        self._streams: dict[str, _Stream] = {}
        self._commands: collections.deque[tuple] = collections.deque()
        self._wake = threading.Event()
        self._loop_ready = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0
        # The waiting count (engine requests accepted and not yet given their first step), from
        # counters that only grow, each written by one thread: the event loop's reservations and
        # their returns, and the engine thread's adds that failed; the scheduler counts first
        # steps and requests that ended before one. A check and its reservation happen in one
        # turn of the event loop, so a burst cannot pass the bound: it is exact.
        self._reserved = 0
        self._released = 0
        self._failed_adds = 0
        if engine is not None:
            self._set_engine(engine)

    def _set_engine(self, engine: LLMEngine) -> None:
        self.engine = engine
        # requests the engine ran before (the warm-up) count as reserved: the waiting count starts at 0
        self._reserved = engine.scheduler.num_first_scheduled + engine.scheduler.num_ended_unscheduled
        if self.model_name is None:
            self.model_name = engine.model_source
        self.metrics = EngineMetrics(self.model_name, self._state)

    @classmethod
    def from_config(cls, config: EngineConfig, model_name: str | Callable[[LLMEngine], str] | None = None, warm_up: bool = True) -> "AsyncLLM":
        """Start the engine thread, load the model in it (and warm it up); return once it is ready.

        `model_name` may be a function of the loaded engine. Loading errors are raised here.
        """
        llm = cls(None, None)
        loaded = threading.Event()

        def load_then_run():
            try:
                engine = LLMEngine(config)
                if warm_up:
                    _warm_up(engine)
                llm.model_name = model_name(engine) if callable(model_name) else model_name
                llm._set_engine(engine)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                llm._error = exc
                return
            finally:
                loaded.set()
            llm._loop_ready.wait()
            llm._run()

        llm._thread = threading.Thread(target=load_then_run, name="xllm-engine", daemon=True)
        llm._thread.start()
        loaded.wait()
        if llm._error is not None:
            raise llm._error
        return llm

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Let the engine thread run, delivering to this event loop; call from that loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
            self._thread.start()
        self._loop_ready.set()

    async def shutdown(self) -> None:
        """Stop the engine thread after its current step; unfinished streams get EngineDeadError."""
        self._stopping = True
        self._wake.set()
        self._loop_ready.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the engine was shut down"))
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)  # its worker processes

    @property
    def healthy(self) -> bool:
        running = self._loop is not None and self._thread is not None and self._thread.is_alive()
        # a worker rank that died between steps: no step has failed yet, but none can run
        return running and self._error is None and not self._stopping and self.engine.healthy

    @property
    def num_waiting(self) -> int:
        """Engine requests accepted that have not had their first step yet (an n-sample request
        counts n). Never under the truth: the engine thread's counters lag the event loop's."""
        scheduler = self.engine.scheduler
        started = scheduler.num_first_scheduled + scheduler.num_ended_unscheduled + self._failed_adds
        return self._reserved - self._released - started

    def reserve(self, count: int, bound: int | None) -> Reservation:
        """Take room for `count` engine requests, or raise `OverloadedError` when the waiting ones
        and these would pass `bound` (None: no bound). Call on the event loop."""
        waiting = self.num_waiting
        if bound is not None and waiting + count > bound:
            raise OverloadedError(f"the server is overloaded ({waiting} requests waiting); retry later")
        self._reserved += count
        return Reservation(self, count)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def _state(self) -> dict:
        scheduler = self.engine.scheduler
        return dict(
            running=scheduler.num_running,
            waiting=self.num_waiting,
            kv_usage=self.engine.kv.usage(),
            preemptions=scheduler.num_preemptions,
            prefix_cache_queries=self.engine.kv.prefix_cache_queries,
            prefix_cache_hits=self.engine.kv.prefix_cache_hits,
            tier_hits=self.engine.kv.tier_hit_tokens(),
        )

    # ---- requests ----------------------------------------------------------------------------
    def new_request_id(self, prefix: str = "req") -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        reservation: Reservation | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a tokenized, validated prompt; yield its outputs until the finished one. Room in the
        waiting queue comes from `reservation` when given (`reserve`), else is taken here.

        Leaving the loop early (or the consuming task being cancelled) aborts the request. A
        request that fails on its own raises `RequestFailedError` at its end.
        """
        if not self.healthy:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if reservation is None:
            reservation = self.reserve(params.n, None)
        reservation.use(params.n)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        stream = _Stream(arrival, len(prompt_token_ids))
        self._streams[request_id] = stream
        self._commands.append(("add", request_id, prompt_token_ids, params, arrival, dict(cache_salt=cache_salt, priority=priority, timeout=timeout)))
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await stream.get()
                finished = out.finished
                if finished and out.error is not None:
                    raise RequestFailedError(out.error)
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        if engine.config.num_threads:
            torch.set_num_threads(engine.config.num_threads)  # OpenMP settings are per thread
        if self._stopping:
            return
        # With overlap on, a step's outputs are ready in the engine's helper thread while the next
        # step computes: they go to the event loop from there, not one step later from here.
        engine.output_sink = lambda outputs: self._loop.call_soon_threadsafe(self._dispatch, outputs)
        try:
            while not self._stopping:
                self._drain_commands()
                if not engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = engine.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
        except BaseException as exc:  # noqa: BLE001 - the loop must report whatever killed it
            logger.exception("the engine loop failed; the engine is dead")
            self._error = exc
            self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(f"the engine loop failed: {exc!r}"))
        finally:
            engine.output_sink = None  # the event loop may be gone; the engine may be driven directly again

    def _drain_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "add":
                _, request_id, token_ids, params, arrival, options = command
                try:
                    self.engine.add_request(token_ids, params, request_id, arrival_time=arrival, **options)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone, never the loop
                    self._failed_adds += params.n
                    self._loop.call_soon_threadsafe(self._deliver, request_id, exc)
            else:
                out = self.engine.abort_request(command[1])
                if out is not None:
                    self.metrics.finished("abort")

    # ---- on the event loop -------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(item)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        m = self.metrics
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted meanwhile
            new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
            if new_tokens:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    m.ttft.observe(now - stream.arrival_time)
                    m.prompt_tokens.inc(stream.num_prompt_tokens)
                    if out.metrics is not None and out.metrics.first_scheduled_time is not None:
                        m.queue.observe(max(0.0, out.metrics.first_scheduled_time - stream.arrival_time))
                else:
                    m.itl.observe(now - stream.last_token_time)
                stream.last_token_time = now
                stream.num_generated += new_tokens
                m.generation_tokens.inc(new_tokens)
            if out.finished:
                m.e2e.observe(now - stream.arrival_time)
                per_sample = stream.num_generated / max(1, len(out.outputs))
                if stream.first_token_time is not None and per_sample > 1:
                    m.tpot.observe((now - stream.first_token_time) / (per_sample - 1))
                for c in out.outputs:
                    m.finished(c.finish_reason)
            stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.put(error)
