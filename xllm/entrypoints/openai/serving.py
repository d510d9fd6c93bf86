"""What /v1/completions and /v1/chat/completions share: from a validated body to engine requests.

Each handler (`serving_completions.py`, `serving_chat.py`) turns its body into token-id prompts
and `SamplingParams` (every check that can fail runs before anything is queued), takes room in
the waiting queue (`admit`: 503 past the bound, exact under a burst), then runs one engine
request per prompt and either gathers the final outputs into one JSON response or streams them
as server-sent events. Streams end with `data: [DONE]`; an error after the stream started is sent
as one `data: {"error": ...}` event. Logprob formats are in `logprobs.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from xllm.engine.async_llm import AsyncLLM, EngineDeadError, OverloadedError, RequestFailedError, Reservation
from xllm.entrypoints.openai.errors import APIError, bad_request, error_body
from xllm.entrypoints.openai.protocol import UnsupportedField, check_unsupported
from xllm.outputs import RequestOutput
from xllm.sampling_params import SamplingParams


@dataclass
class ServingContext:
    llm: AsyncLLM
    model_name: str
    max_waiting: int | None = None  # waiting-queue bound past which requests get 503


@dataclass
class AccessLog:
    """What the access-log line of one request reports (filled in as the request runs)."""

    request_id: str = "-"
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    written: bool = False


@dataclass
class Job:
    """Everything one API call needs, checked before anything is queued."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    echo_texts: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    drop_generated: bool = False  # echo with max_tokens=0: generate one token, report none
    cache_salt: str | None = None
    priority: int = 0
    timeout: float | None = None
    reservation: Reservation | None = None  # its room in the waiting queue (`admit`)

    @property
    def num_engine_requests(self) -> int:
        return len(self.prompts) * self.params.n


def scheduling(body) -> dict:
    return {"cache_salt": body.cache_salt, "priority": body.priority, "timeout": body.timeout}


def parse_body(model: type, data: dict):
    """Validate a JSON object into `model`; any problem is a 400 naming the field."""
    try:
        check_unsupported(data)
        return model.model_validate(data)
    except UnsupportedField as exc:
        raise bad_request(str(exc), exc.field) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or err["loc"].index(p) > 0)
        param = str(err["loc"][0]) if err["loc"] else None
        raise bad_request(f"invalid field '{loc}': {err['msg']}" if loc else err["msg"], param) from None


def check_model(ctx: ServingContext, name: str | None) -> None:
    if name is not None and name != ctx.model_name:
        raise APIError(404, f"the model '{name}' does not exist; this server serves '{ctx.model_name}'", "model", "model_not_found")


def _param_of(message: str) -> str | None:
    word = message.split(" ", 1)[0]
    return word if word.replace("_", "").isalpha() and word.islower() else None


def sampling_params(ctx: ServingContext, body, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    limit = ctx.llm.engine.config.scheduler.max_num_seqs
    if body.n > limit:
        raise bad_request(f"n must be at most {limit} (the server's max running sequences), got {body.n}", "n")
    try:
        return SamplingParams(
            n=body.n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logit_bias=body.logit_bias,
            seed=body.seed,
            max_tokens=max_tokens,
            min_tokens=body.min_tokens,
            stop=[] if body.stop is None else body.stop,
            stop_token_ids=body.stop_token_ids or [],
            include_stop_str_in_output=body.include_stop_str_in_output,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as exc:
        raise bad_request(str(exc), _param_of(str(exc))) from None


def check_lengths(ctx: ServingContext, prompts: list[list[int]], max_tokens: int | None, param: str = "prompt") -> None:
    engine = ctx.llm.engine
    for ids in prompts:
        try:
            engine.validate_prompt_length(len(ids))
        except ValueError as exc:
            raise bad_request(str(exc), param) from None
        if max_tokens is not None and len(ids) + max_tokens > engine.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {engine.max_model_len} tokens, but {len(ids) + max_tokens} "
                f"were requested ({len(ids)} in the prompt, {max_tokens} for the completion): reduce the prompt or max_tokens",
                "max_tokens",
            )


def admit(ctx: ServingContext, job: Job) -> Reservation:
    """Take room in the waiting queue for the job's engine requests (on the event loop, in the turn
    that checks the bound), or refuse with 503; the caller releases what the job did not use."""
    if not ctx.llm.healthy:
        raise APIError(503, "the engine is not running", code="engine_dead")
    try:
        job.reservation = ctx.llm.reserve(job.num_engine_requests, ctx.max_waiting)
    except OverloadedError as exc:
        raise APIError(503, str(exc), code="overloaded") from None
    return job.reservation


# ---- running them ------------------------------------------------------------------------------
async def merged(ctx: ServingContext, job: Job, log: AccessLog) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of every prompt of the job as (prompt index, output), as they come."""
    async for i, out in _merged_outputs(ctx, job):
        if out.finished:
            log.cached_tokens += out.num_cached_tokens
        yield i, out


async def _merged_outputs(ctx: ServingContext, job: Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    arrival = time.monotonic()
    gens = [
        ctx.llm.generate(
            ids, job.params, job.request_id if len(job.prompts) == 1 else f"{job.request_id}-{i}", arrival,
            cache_salt=job.cache_salt, priority=job.priority, timeout=job.timeout, reservation=job.reservation,
        )
        for i, ids in enumerate(job.prompts)
    ]
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen):
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(500, f"the request failed: {exc}", code="request_failed")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {exc!r}")


def usage(log: AccessLog) -> dict:
    return {
        "prompt_tokens": log.prompt_tokens,
        "completion_tokens": log.output_tokens,
        "total_tokens": log.prompt_tokens + log.output_tokens,
        "prompt_tokens_details": {"cached_tokens": log.cached_tokens},
    }


def envelope(ctx: ServingContext, job: Job, obj: str, created: int, choices: list[dict], **extra) -> dict:
    """The fields every completion / chat response and chunk starts with."""
    return {"id": job.request_id, "object": obj, "created": created, "model": ctx.model_name, "choices": choices, **extra}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def sse_stream(ctx: ServingContext, job: Job, obj: str, body, log: AccessLog, parts) -> AsyncIterator[str]:
    """Server-sent events from `parts`, an async iterator of (choices, new tokens); the usage chunk
    when asked for; an in-band error event if something fails after the stream started; [DONE]."""
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    try:
        async for choices, new_tokens in parts:
            log.output_tokens += new_tokens
            if choices:
                yield sse(envelope(ctx, job, obj, created, choices, **extra))
        if include_usage:
            yield sse(envelope(ctx, job, obj, created, [], usage=usage(log)))
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        err = engine_error(exc)
        yield sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        if job.reservation is not None:
            job.reservation.release()  # what the job did not use (it ended early)
    yield "data: [DONE]\n\n"
