"""The OpenAI-compatible HTTP app (FastAPI) over an `AsyncLLM`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /version, POST /tokenize, POST /detokenize, GET /metrics.

Bodies are read by `read_json` (size limit -> 413, bad JSON -> 400) and validated by pydantic
models (a wrong field -> 400 naming it). Every error, including FastAPI's own, leaves in the
OpenAI error shape. An ASGI middleware checks the API key on /v1 routes and writes one access-log
line per request when its response ends (for a stream: when the last event is sent).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

import xllm
from xllm.engine.async_llm import AsyncLLM
from xllm.entrypoints.openai import serving, serving_chat, serving_completions
from xllm.entrypoints.openai.errors import APIError, bad_request, error_body
from xllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from xllm.entrypoints.openai.serving import AccessLog, ServingContext

logger = logging.getLogger("xllm.server")
access_logger = logging.getLogger("xllm.access")


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_waiting_requests: int | None = 256  # past this many waiting requests, 503
    max_body_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    listen: str = ""  # "http://host:port", for the start-up line


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict:
    """The request body as a JSON object; 413 past `limit` bytes, 400 when it is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the {limit}-byte limit", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return data


class _Middleware:
    """API-key check on /v1 routes, and one access-log line per request when its response ends."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        path = scope["path"]
        log = AccessLog()
        scope.setdefault("state", {})["access"] = log
        status = 0

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                _log_access(scope, log, status, start)

        if self.api_key is not None and path.startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                err = APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await err.response()(scope, receive, send_logged)
        try:
            await self.app(scope, receive, send_logged)
        except BaseException:
            _log_access(scope, log, status or 500, start)
            raise


def _log_access(scope, log: AccessLog, status: int, start: float) -> None:
    if log.written:
        return
    log.written = True
    client = scope.get("client")
    access_logger.info(
        "%s %s %s %d prompt_tokens=%d output_tokens=%d latency=%.3fs id=%s",
        f"{client[0]}:{client[1]}" if client else "-",
        scope["method"],
        scope["path"],
        status,
        log.prompt_tokens,
        log.output_tokens,
        time.monotonic() - start,
        log.request_id,
    )


async def _until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (aborting its engine requests)."""
    work = asyncio.ensure_future(coro)

    async def watch():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None
    return work.result()


def build_app(llm: AsyncLLM, settings: ServerSettings) -> FastAPI:
    ctx = ServingContext(llm, settings.model_name, settings.max_waiting_requests)
    engine = llm.engine

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        llm.start()
        if settings.listen:
            logger.info("serving %s at %s (OpenAI API under /v1)", settings.model_name, settings.listen)
        try:
            yield
        finally:
            await llm.shutdown()

    app = FastAPI(title="xLLM", version=xllm.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Middleware, api_key=settings.api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return bad_request(f"invalid request: {exc.errors()[0].get('msg', exc)}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    def access(request: Request) -> AccessLog:
        return request.scope["state"]["access"]

    async def run(request: Request, body, prepare, full, stream):
        log = access(request)
        job = await asyncio.to_thread(prepare, ctx, body)  # chat template + tokenization off the loop
        reservation = serving.admit(ctx, job)  # room in the waiting queue, or 503
        log.request_id = job.request_id
        log.prompt_tokens = sum(len(p) for p in job.prompts)
        if body.stream:
            # the stream gives back what it did not use when it ends; the task covers a stream never started
            return StreamingResponse(stream(ctx, job, body, log), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(reservation.release))
        try:
            result = await _until_disconnect(request, full(ctx, job, body, log))
        except Exception as exc:  # noqa: BLE001
            raise serving.engine_error(exc) from None
        finally:
            reservation.release()
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        return JSONResponse(result)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = serving.parse_body(CompletionRequest, await read_json(request, settings.max_body_bytes))
        return await run(request, body, serving_completions.prepare_completion, serving_completions.completion_full,
                         serving_completions.completion_stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = serving.parse_body(ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        return await run(request, body, serving_chat.prepare_chat, serving_chat.chat_full, serving_chat.chat_stream)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{
                "id": settings.model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "xllm",
                "root": engine.model_source,
                "max_model_len": engine.max_model_len,
            }],
        }

    @app.get("/health")
    async def health():
        if not llm.healthy:
            return JSONResponse(error_body(503, "the engine loop is not running", code="engine_dead"), status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": xllm.__version__}

    def tokenize_body(body: TokenizeRequest) -> dict:
        serving.check_model(ctx, body.model)
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer")
        if body.messages is not None:
            tokens = serving_chat.render_messages(tokenizer, body.messages, body.add_generation_prompt)
        else:
            tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    def detokenize_body(body: DetokenizeRequest) -> dict:
        serving.check_model(ctx, body.model)
        if engine.tokenizer is None:
            raise bad_request("this model has no tokenizer")
        vocab = engine.arch.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range for a vocabulary of {vocab}", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = serving.parse_body(TokenizeRequest, await read_json(request, settings.max_body_bytes))
        return await asyncio.to_thread(tokenize_body, body)  # a long text or template: off the event loop

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = serving.parse_body(DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        return await asyncio.to_thread(detokenize_body, body)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(llm.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

