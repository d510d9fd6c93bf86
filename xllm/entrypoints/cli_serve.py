"""`xllm serve`: the OpenAI-compatible server on one model.

Loads the model first (an unloadable model fails before any port is bound), then serves with
uvicorn. SIGTERM or Ctrl-C stops accepting connections, lets in-flight requests finish for up to
--shutdown-grace seconds, then stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

logger = logging.getLogger("xllm.server")


def add_serve_parser(subparsers, add_engine_args) -> argparse.ArgumentParser:
    serve = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API (completions, chat, streaming, metrics)",
        description="Serve a model over the OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
        "/v1/models, plus /health, /version, /tokenize, /detokenize and Prometheus /metrics. With no arguments it "
        "serves the default model (SmolLM2-135M-Instruct) on 127.0.0.1:8000.",
    )
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all interfaces)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: the model file's or folder's name)",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get("XLLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $XLLM_API_KEY, else no key)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="bound on requests waiting for the engine; past it, new requests get 503 (default 256; 0 = no bound)",
    )
    g.add_argument(
        "--max-request-bytes", type=int, default=8 * 1024 * 1024, help="largest request body; larger ones get 413 (default 8 MiB)"
    )
    g.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests may take to finish after SIGTERM (default 30)"
    )
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)
    return serve


def default_model_name(source: str) -> str:
    name = os.path.basename(os.path.normpath(source))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from xllm.config import EngineConfig
    from xllm.engine.async_llm import AsyncLLM
    from xllm.entrypoints.cli import engine_kwargs
    from xllm.entrypoints.openai.server import ServerSettings, build_app

    if args.max_waiting_requests < 0 or args.max_request_bytes < 1:
        raise ValueError("--max-waiting-requests must be >= 0 and --max-request-bytes >= 1")
    start = time.monotonic()
    config = EngineConfig.create(**engine_kwargs(args))
    if config.parallel.node_rank > 0:  # this host runs only its ranks; node 0 serves
        from xllm.executor.multiproc import run_node

        logger.info("node %d of %d: running ranks for the engine at %s", config.parallel.node_rank,
                    config.parallel.nnodes, config.parallel.dist_init_addr)
        return run_node(config)
    llm = AsyncLLM.from_config(config, lambda engine: args.served_model_name or default_model_name(engine.model_source))
    logger.info("loaded %s in %.1f s", llm.engine.model_source, time.monotonic() - start)
    settings = ServerSettings(
        model_name=llm.model_name,
        api_key=args.api_key or None,
        max_waiting_requests=args.max_waiting_requests or None,
        max_body_bytes=args.max_request_bytes,
        listen=f"http://{args.host}:{args.port}",
    )
    app = build_app(llm, settings)
    # uvicorn handles SIGTERM (stop accepting, drain, shut down), then re-raises it once the
    # previous handler is back in place: make that handler a no-op, so a SIGTERM stop exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,  # our middleware writes one line per request, with its tokens
        timeout_graceful_shutdown=args.shutdown_grace,
        timeout_keep_alive=30,
    )
    logger.info("stopped")
    return 0
