"""/v1/completions and /v1/chat/completions: from a validated body to OpenAI responses.

Each handler turns its body into token-id prompts and `SamplingParams` (every check that can fail
runs before anything is queued), then runs one engine request per prompt and either gathers the
final outputs into one JSON response or streams them as server-sent events. Streams end with
`data: [DONE]`; an error after the stream started is sent as one `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import ValidationError

from xllm.engine.async_llm import AsyncLLM, EngineDeadError
from xllm.entrypoints.openai.errors import APIError, bad_request, error_body
from xllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, UnsupportedField, check_unsupported
from xllm.outputs import PositionLogprobs, RequestOutput
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
class _Job:
    """Everything one API call needs, checked before anything is queued."""

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    echo_texts: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    drop_generated: bool = False  # echo with max_tokens=0: generate one token, report none
    cache_salt: str | None = None
    priority: int = 0
    timeout: float | None = None


def _scheduling(body) -> dict:
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


def _sampling_params(ctx: ServingContext, body, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
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


def _check_lengths(ctx: ServingContext, prompts: list[list[int]], max_tokens: int | None, param: str = "prompt") -> None:
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


def check_capacity(ctx: ServingContext) -> None:
    if not ctx.llm.healthy:
        raise APIError(503, "the engine is not running", code="engine_dead")
    if ctx.max_waiting is not None and ctx.llm.num_waiting >= ctx.max_waiting:
        raise APIError(503, f"the server is overloaded ({ctx.llm.num_waiting} requests waiting); retry later", code="overloaded")


# ---- preparing requests ------------------------------------------------------------------------
def prepare_completion(ctx: ServingContext, body: CompletionRequest) -> _Job:
    check_model(ctx, body.model)
    engine = ctx.llm.engine
    prompt = body.prompt
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    prompts = []
    for p in prompt:
        try:
            prompts.append(engine.tokenize_prompt(p))
        except ValueError as exc:
            raise bad_request(str(exc), "prompt") from None
    max_tokens = body.max_tokens
    drop = False
    if max_tokens == 0 and body.echo:
        max_tokens, drop = 1, True  # scoring a prompt: the one generated token is dropped
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1 (or 0 with echo), got {max_tokens}", "max_tokens")
    _check_lengths(ctx, prompts, max_tokens)
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(body.logprobs, prompt_logprobs or 0)
    params = _sampling_params(ctx, body, max_tokens, body.logprobs, prompt_logprobs)
    if drop:
        params.ignore_eos = True
    echo = [p if isinstance(p, str) else engine.tokenizer.decode(ids, skip_special_tokens=False) for p, ids in zip(prompt, prompts)] if body.echo else []
    return _Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, echo, drop, **_scheduling(body))


def prepare_chat(ctx: ServingContext, body: ChatCompletionRequest) -> _Job:
    check_model(ctx, body.model)
    tokenizer = ctx.llm.engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(messages, body.add_generation_prompt, **(body.chat_template_kwargs or {}))
    except Exception as exc:  # the template raised (e.g. roles out of order)
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered conversation is empty", "messages")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise bad_request(f"top_logprobs must be in [0, 20], got {body.top_logprobs}", "top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    _check_lengths(ctx, [ids], max_tokens, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling_params(ctx, body, max_tokens, logprobs, None)
    return _Job(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, **_scheduling(body))


# ---- running them ------------------------------------------------------------------------------
async def _merged(ctx: ServingContext, job: _Job, log: AccessLog) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of every prompt of the job as (prompt index, output), as they come."""
    async for i, out in _merged_outputs(ctx, job):
        if out.finished:
            log.cached_tokens += out.num_cached_tokens
        yield i, out


async def _merged_outputs(ctx: ServingContext, job: _Job) -> AsyncIterator[tuple[int, RequestOutput]]:
    arrival = time.monotonic()
    gens = [
        ctx.llm.generate(
            ids, job.params, job.request_id if len(job.prompts) == 1 else f"{job.request_id}-{i}", arrival,
            cache_salt=job.cache_salt, priority=job.priority, timeout=job.timeout,
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
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {exc!r}")


def _usage(log: AccessLog) -> dict:
    return {
        "prompt_tokens": log.prompt_tokens,
        "completion_tokens": log.output_tokens,
        "total_tokens": log.prompt_tokens + log.output_tokens,
        "prompt_tokens_details": {"cached_tokens": log.cached_tokens},
    }


def _envelope(ctx: ServingContext, job: _Job, obj: str, created: int, choices: list[dict], **extra) -> dict:
    """The fields every completion / chat response and chunk starts with."""
    return {"id": job.request_id, "object": obj, "created": created, "model": ctx.model_name, "choices": choices, **extra}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ---- logprobs formats --------------------------------------------------------------------------
def _top(entry: PositionLogprobs, chosen: int, k: int) -> list[tuple[int, object]]:
    items = sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k or t == chosen), key=lambda x: x[1].rank)
    return items


class _CompletionLogprobs:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, k: int, offset: int = 0):
        self.k = k
        self.offset = offset
        self.data = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_ids: list[int], entries: list[PositionLogprobs | None], token_text) -> dict:
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            text = entry[tid].decoded_token if entry is not None and tid in entry else token_text(tid)
            text = text or ""
            part["tokens"].append(text)
            part["token_logprobs"].append(None if entry is None else entry[tid].logprob)
            part["top_logprobs"].append(
                None if entry is None else {(lp.decoded_token or ""): lp.logprob for _, lp in _top(entry, tid, self.k)}
            )
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for key in part:
            self.data[key].extend(part[key])
        return part


def _chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], k: int) -> list[dict]:
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        token = chosen.decoded_token or ""
        content.append({
            "token": token,
            "logprob": chosen.logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}
                for _, lp in sorted(entry.items(), key=lambda x: x[1].rank)
                if lp.rank <= k
            ],
        })
    return content


# ---- /v1/completions ---------------------------------------------------------------------------
async def completion_full(ctx: ServingContext, job: _Job, body: CompletionRequest, log: AccessLog) -> dict:
    n = job.params.n
    finals: dict[int, RequestOutput] = {}
    async for i, out in _merged(ctx, job, log):
        if out.finished:
            finals[i] = out
    token_text = ctx.llm.engine.token_text
    choices = []
    completion_tokens = 0
    for i in range(len(job.prompts)):
        out = finals[i]
        for c in out.outputs:
            ids, text, lps = c.token_ids, c.text, c.logprobs
            if job.drop_generated:
                ids, text, lps = [], "", []
            completion_tokens += len(ids)
            logprobs = None
            prefix = job.echo_texts[i] if body.echo else ""
            if body.logprobs is not None:
                lp = _CompletionLogprobs(body.logprobs)
                if body.echo:
                    lp.add(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids), token_text)
                lp.add(ids, lps or [], token_text)
                logprobs = lp.data
            choices.append({
                "index": i * n + c.index,
                "text": prefix + text,
                "logprobs": logprobs,
                "finish_reason": "length" if job.drop_generated else c.finish_reason,
                "stop_reason": c.stop_reason,
            })
    log.output_tokens = completion_tokens
    return _envelope(ctx, job, "text_completion", int(time.time()), choices, usage=_usage(log))


async def _sse_stream(ctx: ServingContext, job: _Job, obj: str, body, log: AccessLog, parts) -> AsyncIterator[str]:
    """Server-sent events from `parts`, an async iterator of (choices, new tokens); the usage chunk
    when asked for; an in-band error event if something fails after the stream started; [DONE]."""
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    try:
        async for choices, new_tokens in parts:
            log.output_tokens += new_tokens
            if choices:
                yield _sse(_envelope(ctx, job, obj, created, choices, **extra))
        if include_usage:
            yield _sse(_envelope(ctx, job, obj, created, [], usage=_usage(log)))
    except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
        err = engine_error(exc)
        yield _sse(error_body(err.status, err.message, err.param, err.code))
    yield "data: [DONE]\n\n"


def completion_stream(ctx: ServingContext, job: _Job, body: CompletionRequest, log: AccessLog) -> AsyncIterator[str]:
    return _sse_stream(ctx, job, "text_completion", body, log, _completion_parts(ctx, job, body, log))


async def _completion_parts(ctx: ServingContext, job: _Job, body: CompletionRequest, log: AccessLog):
    n = job.params.n
    token_text = ctx.llm.engine.token_text
    trackers: dict[int, _CompletionLogprobs] = {}
    started: set[int] = set()
    async for i, out in _merged(ctx, job, log):
        choices = []
        new_tokens = 0
        for c in out.outputs:
            index = i * n + c.index
            text, ids = c.delta_text, c.delta_token_ids
            if job.drop_generated:
                text, ids = "", []
            logprobs = None
            if body.logprobs is not None:
                tracker = trackers.setdefault(index, _CompletionLogprobs(body.logprobs))
                logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if body.echo and index not in started:
                    prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                    for key, value in tracker.add(out.prompt_token_ids, prompt_entries, token_text).items():
                        logprobs[key].extend(value)
                if ids:
                    for key, value in tracker.add(ids, (c.logprobs or [])[len(c.token_ids) - len(ids):], token_text).items():
                        logprobs[key].extend(value)
            if body.echo and index not in started:
                text = job.echo_texts[i] + text
            started.add(index)
            new_tokens += len(ids)
            finish = ("length" if job.drop_generated else c.finish_reason) if c.finished else None
            if text or finish is not None or (logprobs and logprobs["tokens"]):
                choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                                "stop_reason": c.stop_reason if c.finished else None})
        yield choices, new_tokens


# ---- /v1/chat/completions ----------------------------------------------------------------------
async def chat_full(ctx: ServingContext, job: _Job, body: ChatCompletionRequest, log: AccessLog) -> dict:
    final = None
    async for _, out in _merged(ctx, job, log):
        if out.finished:
            final = out
    choices = []
    completion_tokens = 0
    for c in final.outputs:
        completion_tokens += len(c.token_ids)
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": _chat_logprobs(c.token_ids, c.logprobs or [], body.top_logprobs or 0)} if body.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        })
    log.output_tokens = completion_tokens
    return _envelope(ctx, job, "chat.completion", int(time.time()), choices, usage=_usage(log))


def chat_stream(ctx: ServingContext, job: _Job, body: ChatCompletionRequest, log: AccessLog) -> AsyncIterator[str]:
    return _sse_stream(ctx, job, "chat.completion.chunk", body, log, _chat_parts(ctx, job, body, log))


async def _chat_parts(ctx: ServingContext, job: _Job, body: ChatCompletionRequest, log: AccessLog):
    yield [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(job.params.n)
    ], 0
    async for _, out in _merged(ctx, job, log):
        choices = []
        new_tokens = 0
        for c in out.outputs:
            ids = c.delta_token_ids
            new_tokens += len(ids)
            logprobs = None
            if body.logprobs and ids:
                entries = (c.logprobs or [])[len(c.token_ids) - len(ids):]
                logprobs = {"content": _chat_logprobs(ids, entries, body.top_logprobs or 0)}
            if c.delta_text or logprobs or c.finished:
                choices.append({
                    "index": c.index,
                    "delta": {"content": c.delta_text} if c.delta_text else {},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
        yield choices, new_tokens
