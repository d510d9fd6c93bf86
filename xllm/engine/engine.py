"""The engine: request lifecycle around one scheduler, one KV manager and one model runner.

`add_request` validates and tokenizes; `step` runs one scheduler step through the runner and
returns what changed, detokenized incrementally. Bad input raises `ValueError` before any state
changes, so the engine stays usable for the next request.
"""

from __future__ import annotations

import itertools
import logging

import torch

from xllm.config import EngineConfig
from xllm.engine.detokenizer import IncrementalDetokenizer
from xllm.kv.manager import KVCacheManager
from xllm.models.loader import load_model
from xllm.outputs import CompletionOutput, RequestOutput
from xllm.sampling_params import SamplingParams
from xllm.scheduler.output import RunnerOutput
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler
from xllm.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        loaded = load_model(config.model)
        self.model_source = loaded.source
        self.arch = loaded.arch
        self.dtype = loaded.dtype
        self.tokenizer = loaded.tokenizer
        limit = loaded.arch.max_position_embeddings
        max_len = config.model.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length {limit}")
        self.max_model_len = max_len
        self.runner = ModelRunner(loaded.model, loaded.arch, config.cache, loaded.dtype, seed=config.seed)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        eos = set(loaded.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    # ---- requests -------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: give the prompt as token ids")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("prompt must be a string or a list of token ids")
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.arch.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for a vocabulary of {vocab}")
        return list(prompt)

    def validate_prompt_length(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens, but the context limit (max_model_len) is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one generated token"
            )
        if not self.kv.can_ever_fit(num_tokens + 1):
            capacity = self.kv.num_blocks * self.kv.block_size
            raise ValueError(f"prompt has {num_tokens} tokens, more than the KV cache holds ({capacity} tokens)")

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling params must be a SamplingParams")
        token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt_length(len(token_ids))
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= self.eos_token_ids
        room = self.max_model_len - len(token_ids)
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            stop_token_ids=frozenset(stop),
            max_output_tokens=min(params.max_tokens or room, room),
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
            prompt=prompt if isinstance(prompt, str) else None,
        )
        self.scheduler.add(request)
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        result = self.runner.execute(scheduled) if not scheduled.is_empty else RunnerOutput()
        return [self._output(r) for r in self.scheduler.update(scheduled, result)]

    def _output(self, request: Request) -> RequestOutput:
        detok = self._detokenizers[request.request_id]
        delta = detok.update(request.output_token_ids, finished=request.finished)
        if request.finished:
            del self._detokenizers[request.request_id]
        completion = CompletionOutput(
            index=0, text=detok.text, token_ids=list(request.output_token_ids), finish_reason=request.finish_reason
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.finished,
            delta_text=delta,
        )

