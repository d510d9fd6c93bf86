"""The engine: request lifecycle around one scheduler, one KV manager and one model runner.

`add_request` validates and tokenizes; `step` runs one scheduler step through the runner and
returns what changed, detokenized incrementally, with stop strings applied. Bad input raises
`ValueError` before any state changes, so the engine stays usable for the next request.

A request with n > 1 becomes n scheduler requests ("samples"); samples 1..n-1 reuse the KV
blocks of sample 0's prompt. The output processor (`output_processor.py`) gathers them back
into one `RequestOutput`. The step pipeline (`pipeline.py`) runs steps serially or overlapped
(the CPU work around a step in a helper thread while the step computes).

Construction: the platform (`xllm/platforms/`) is picked from `EngineConfig.device`; it sets up
its op table, loads the model onto its device, prepares the weights, sizes the KV cache. The
ranks run behind an executor (`xllm/executor/`): one in this process, or a process per rank
(tensor parallelism), which load their shards and size their caches themselves; the engine then
reads only the model's configuration and tokenizer.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch

from xllm.config import EngineConfig, dtype_name
from xllm.engine.output_processor import OutputProcessor
from xllm.engine.pipeline import StepPipeline, StepTiming
from xllm.executor.uniproc import UniProcExecutor
from xllm.kv.fingerprint import kv_fingerprint, weights_fingerprint
from xllm.kv.manager import KVCacheManager
from xllm.kv.tiers import build_tiers
from xllm.models.loader import load_model, load_model_info
from xllm.outputs import RequestOutput
from xllm.platforms import get_platform
from xllm.sampling_params import SamplingParams
from xllm.scheduler.request import Request
from xllm.scheduler.scheduler import Scheduler
from xllm.worker.model_runner import ModelRunner
from xllm.worker.worker import Worker

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.platform = get_platform(config.device)
        self.platform.check(config.cache)
        par = config.parallel
        if par.node_rank != 0:
            raise ValueError("node_rank > 0 runs only its ranks (xllm serve --node-rank N), not an engine")
        self.weights_arena = None
        if par.backend == "uni":
            self.platform.init(config.num_threads, config.compiled_kernels)
            loaded = load_model(config.model, self.platform)
            self.weights_arena = self.platform.prepare_model(loaded.model, config.packed_weights, config.huge_pages)
        else:
            cache = config.cache
            if cache.kv_host_memory_gib > 0 or cache.kv_disk_dir:
                raise ValueError("the host and disk KV tiers run with one in-process rank only for now "
                                 "(drop --kv-host-memory-gib / --kv-disk-dir, or run one rank)")
            if config.num_threads:
                torch.set_num_threads(config.num_threads)
            loaded = load_model_info(config.model, self.platform)  # the ranks load the weights
        self.model_source = loaded.source
        self.model_folder = loaded.folder
        self.arch = loaded.arch
        self.dtype = loaded.dtype
        self.tokenizer = loaded.tokenizer
        limit = loaded.arch.max_position_embeddings
        max_len = config.model.max_model_len or limit
        if max_len > limit:
            raise ValueError(f"max_model_len {max_len} exceeds the model's context length {limit}")
        self.max_model_len = max_len
        if par.backend == "uni":
            runner = ModelRunner(
                loaded.model, loaded.arch, config.cache, loaded.dtype, seed=config.seed, max_model_len=max_len,
                max_num_seqs=config.scheduler.max_num_seqs, platform=self.platform,
                max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            )
            self.executor = UniProcExecutor(Worker(runner))
        else:
            from xllm.executor.multiproc import MultiprocExecutor

            self.executor = MultiprocExecutor(config)
        connector = self._tiers()
        self.kv = KVCacheManager(
            self.executor.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching, connector,
            # the helper maps the look-ahead block's pages while the step before computes (in-process)
            lookahead=config.overlap and config.cache.kv_layout == "xtensor" and par.backend == "uni",
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        eos = set(loaded.arch.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._ids = itertools.count()
        self.outputs = OutputProcessor(self.tokenizer, self.scheduler)
        self.pipeline = StepPipeline(self.scheduler, self.kv, self.executor, self.outputs, config.overlap)

    @property
    def runner(self) -> ModelRunner | None:
        """The in-process rank's model runner (None when the ranks run in worker processes)."""
        return getattr(self.executor, "runner", None)

    @property
    def healthy(self) -> bool:
        return self.executor.dead is None

    def shutdown(self) -> None:
        """Stop the worker processes (nothing to do for an in-process rank)."""
        self.executor.shutdown()

    def _tiers(self):
        """The host and disk tiers under the prefix cache, when configured (and caching is on): the
        scheduler side is returned (for the KV manager), the worker side goes to the runner."""
        cache = self.config.cache
        if not cache.enable_prefix_caching or not (cache.kv_host_memory_gib > 0 or cache.kv_disk_dir):
            return None
        fingerprint = None
        if cache.kv_disk_dir:
            block_shape = (self.arch.num_hidden_layers, 2, cache.block_size, self.arch.num_key_value_heads, self.arch.head_dim)
            fingerprint = kv_fingerprint(weights_fingerprint(self.model_folder), dtype_name(self.dtype), cache.block_size,
                                         cache.kv_layout, rank=0, block_shape=block_shape)
        if self.runner is None:
            return None
        scheduler_side, worker_side = build_tiers(
            self.runner.kv_caches, int(cache.kv_host_memory_gib * (1 << 30)), cache.kv_disk_dir,
            int(cache.kv_disk_gib * (1 << 30)) if cache.kv_disk_dir else 0, fingerprint, self.platform.host_buffer,
        )
        self.runner.kv_connector = worker_side
        return scheduler_side

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
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
    ) -> str:
        """Queue a request; `arrival_time` (time.monotonic()) defaults to now. Requests with different
        `cache_salt`s never share prefix-cache blocks (tenant isolation). Lower `priority` runs
        first. After `timeout` seconds from arrival the request ends with finish reason "timeout"."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("sampling params must be a SamplingParams")
        token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt_length(len(token_ids))
        request_id = request_id if request_id is not None else str(next(self._ids))
        sample_ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        if self.outputs.has(request_id) or any(s in self.scheduler.requests for s in sample_ids):
            raise ValueError(f"request id {request_id!r} is already in use")
        stop = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop |= self.eos_token_ids
        room = self.max_model_len - len(token_ids)
        requests = []
        for i, sample_id in enumerate(sample_ids):
            sample_params = params if params.n == 1 else params.for_sample(i)
            if i > 0:
                sample_params.prompt_logprobs = None  # sample 0 reports them for the group
            request = Request(
                request_id=sample_id,
                prompt_token_ids=token_ids,
                params=sample_params,
                stop_token_ids=frozenset(stop),
                max_output_tokens=min(params.max_tokens or room, room),
                share_prompt_with=sample_ids[0] if i > 0 else None,
                cache_salt=cache_salt,
                priority=priority,
            )
            if arrival_time is not None:
                request.arrival_time = arrival_time
            if timeout is not None:
                request.deadline = request.arrival_time + timeout
            requests.append(request)
        self.outputs.add(request_id, prompt if isinstance(prompt, str) else None, token_ids, params, requests)
        for request in requests:
            self.scheduler.add(request)
        self.pipeline.arrived = True
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request (all its samples) now; returns its final output, None if it is not known."""
        group = self.outputs.groups.get(request_id)
        if group is None:
            return None
        for sample in group.samples:
            if not sample.request.finished:
                self.scheduler.abort(sample.request.request_id)
        return self.outputs.output_of(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.groups) or self.pipeline.has_pending

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.outputs.groups)

    def token_text(self, token_id: int) -> str | None:
        """One token decoded alone, special tokens included (cached); None without a tokenizer."""
        return self.outputs.token_text(token_id)

    # ---- the loop -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One turn of the loop (`pipeline.py`); returns the requests whose output changed."""
        return self.pipeline.step()

    @property
    def output_sink(self) -> Callable[[list[RequestOutput]], None] | None:
        """Where outputs go as soon as they are built (from the helper thread when overlapped)."""
        return self.pipeline.output_sink

    @output_sink.setter
    def output_sink(self, sink: Callable[[list[RequestOutput]], None] | None) -> None:
        self.pipeline.output_sink = sink

    @property
    def timing(self) -> StepTiming:
        return self.pipeline.timing

    @timing.setter
    def timing(self, timing: StepTiming) -> None:
        self.pipeline.timing = timing
