"""/v1/chat/completions: messages through the model's chat template, full or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from xllm.entrypoints.openai.errors import bad_request
from xllm.entrypoints.openai.logprobs import chat_logprobs
from xllm.entrypoints.openai.protocol import ChatCompletionRequest
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


def render_messages(tokenizer, messages, add_generation_prompt: bool, **template_kwargs) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template ("developer" is "system");
    a template that rejects the messages is a 400 naming them."""
    rendered = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(rendered, add_generation_prompt, **template_kwargs)
    except Exception as exc:  # the template raised (e.g. roles out of order)
        raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def prepare_chat(ctx: ServingContext, body: ChatCompletionRequest) -> Job:
    check_model(ctx, body.model)
    tokenizer = ctx.llm.engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    ids = render_messages(tokenizer, body.messages, body.add_generation_prompt, **(body.chat_template_kwargs or {}))
    if not ids:
        raise bad_request("the rendered conversation is empty", "messages")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise bad_request(f"top_logprobs must be in [0, 20], got {body.top_logprobs}", "top_logprobs")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    check_lengths(ctx, [ids], max_tokens, "messages")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(ctx, body, max_tokens, logprobs, None)
    return Job(f"chatcmpl-{uuid.uuid4().hex}", [ids], params, **scheduling(body))


async def chat_full(ctx: ServingContext, job: Job, body: ChatCompletionRequest, log: AccessLog) -> dict:
    final = None
    async for _, out in merged(ctx, job, log):
        if out.finished:
            final = out
    choices = []
    completion_tokens = 0
    for c in final.outputs:
        completion_tokens += len(c.token_ids)
        choices.append({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": {"content": chat_logprobs(c.token_ids, c.logprobs or [], body.top_logprobs or 0)} if body.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        })
    log.output_tokens = completion_tokens
    return envelope(ctx, job, "chat.completion", int(time.time()), choices, usage=usage(log))


def chat_stream(ctx: ServingContext, job: Job, body: ChatCompletionRequest, log: AccessLog) -> AsyncIterator[str]:
    return sse_stream(ctx, job, "chat.completion.chunk", body, log, _chat_parts(ctx, job, body, log))


async def _chat_parts(ctx: ServingContext, job: Job, body: ChatCompletionRequest, log: AccessLog):
    yield [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in range(job.params.n)
    ], 0
    async for _, out in merged(ctx, job, log):
        choices = []
        new_tokens = 0
        for c in out.outputs:
            ids = c.delta_token_ids
            new_tokens += len(ids)
            logprobs = None
            if body.logprobs and ids:
                logprobs = {"content": chat_logprobs(ids, c.delta_logprobs or [], body.top_logprobs or 0)}
            if c.delta_text or logprobs or c.finished:
                choices.append({
                    "index": c.index,
                    "delta": {"content": c.delta_text} if c.delta_text else {},
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
        yield choices, new_tokens
