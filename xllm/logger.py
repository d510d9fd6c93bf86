"""The `xllm` logger: one stderr handler, level from $XLLM_LOG_LEVEL (default INFO).

Configured once when the package is imported, like vLLM, so a user of the Python API sees the
few lines that matter (model loaded, KV cache size) without configuring logging themselves.
"""

from __future__ import annotations

import logging
import os

_FORMAT = "%(levelname)s %(asctime)s %(name)s: %(message)s"


def configure_logging(level: str | None = None) -> None:
    logger = logging.getLogger("xllm")
    if not any(getattr(h, "_xllm", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._xllm = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel((level or os.environ.get("XLLM_LOG_LEVEL") or "INFO").upper())
