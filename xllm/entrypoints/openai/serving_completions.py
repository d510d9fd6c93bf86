"""/v1/completions: prompts (text or token ids, one or many), echo, logprobs, full or streamed.

Echoed prompts and their logprobs are built off the event loop (a long prompt's are thousands of
token texts): in `prepare_completion`, which runs in a worker thread, and with `asyncio.to_thread`
once the outputs are there.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from xllm.entrypoints.openai.errors import bad_request
from xllm.entrypoints.openai.logprobs import CompletionLogprobs
from xllm.entrypoints.openai.protocol import CompletionRequest
from xllm.entrypoints.openai.serving import (
    AccessLog,
    Job,
    ServingContext,
    check_lengths,
    check_model,
    envelope,
    merged,
    sampling_params,
    scheduling,
    sse_stream,
    usage,
)
from xllm.outputs import RequestOutput


def prepare_completion(ctx: ServingContext, body: CompletionRequest) -> Job:
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
    check_lengths(ctx, prompts, max_tokens)
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(body.logprobs, prompt_logprobs or 0)
    params = sampling_params(ctx, body, max_tokens, body.logprobs, prompt_logprobs)
    if drop:
        params.ignore_eos = True
    echo = [p if isinstance(p, str) else engine.tokenizer.decode(ids, skip_special_tokens=False) for p, ids in zip(prompt, prompts)] if body.echo else []
    return Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, echo, drop, **scheduling(body))


async def completion_full(ctx: ServingContext, job: Job, body: CompletionRequest, log: AccessLog) -> dict:
    finals: dict[int, RequestOutput] = {}
    async for i, out in merged(ctx, job, log):
        if out.finished:
            finals[i] = out
    return await asyncio.to_thread(_completion_response, ctx, job, body, log, finals)


def _completion_response(ctx: ServingContext, job: Job, body: CompletionRequest, log: AccessLog,
                         finals: dict[int, RequestOutput]) -> dict:
    n = job.params.n
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
                lp = CompletionLogprobs(body.logprobs)
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
    return envelope(ctx, job, "text_completion", int(time.time()), choices, usage=usage(log))


def completion_stream(ctx: ServingContext, job: Job, body: CompletionRequest, log: AccessLog) -> AsyncIterator[str]:
    return sse_stream(ctx, job, "text_completion", body, log, _completion_parts(ctx, job, body, log))


async def _completion_parts(ctx: ServingContext, job: Job, body: CompletionRequest, log: AccessLog):
    n = job.params.n
    token_text = ctx.llm.engine.token_text
    trackers: dict[int, CompletionLogprobs] = {}
    started: set[int] = set()
    async for i, out in merged(ctx, job, log):
        choices = []
        new_tokens = 0
        for c in out.outputs:
            index = i * n + c.index
            text, ids = c.delta_text, c.delta_token_ids
            if job.drop_generated:
                text, ids = "", []
            logprobs = None
            if body.logprobs is not None:
                tracker = trackers.setdefault(index, CompletionLogprobs(body.logprobs))
                logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                if body.echo and index not in started:
                    prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                    echoed = await asyncio.to_thread(tracker.add, out.prompt_token_ids, prompt_entries, token_text)
                    for key, value in echoed.items():
                        logprobs[key].extend(value)
                if ids:
                    for key, value in tracker.add(ids, c.delta_logprobs or [], token_text).items():
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
