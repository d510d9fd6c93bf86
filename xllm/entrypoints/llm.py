"""The offline API: `LLM(...).generate(...)` and `LLM(...).chat(...)`."""

from __future__ import annotations

from collections.abc import Sequence

from xllm.config import EngineConfig
from xllm.engine.engine import LLMEngine
from xllm.outputs import RequestOutput
from xllm.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """An engine for offline batched generation.

    `LLM()` loads the default model (SmolLM2-135M-Instruct). Keyword arguments are engine
    options: device ("auto", "cpu", "cuda"; auto = CUDA when torch sees a GPU), dtype ("auto",
    "float32", "bfloat16", "float16" on CUDA), max_model_len, kv_cache_memory_gib,
    gpu_memory_utilization (CUDA), num_blocks, block_size, max_num_batched_tokens, max_num_seqs,
    enable_chunked_prefill, seed, num_threads, and the rest of `EngineConfig`'s fields.
    """

    def __init__(self, model: str | None = None, **kwargs):
        self.engine = LLMEngine(EngineConfig.create(model=model, **kwargs))

    def shutdown(self) -> None:
        """Stop the engine's worker processes now (they also stop when it is collected, or at exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for one prompt or many (strings or token-id lists); outputs keep the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            return []
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        return self._run(prompts, params)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or several, rendered with the model's chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it cannot chat")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params)

    def _run(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        engine = self.engine
        # Validate every prompt before queuing any, so one bad prompt leaves nothing behind.
        for prompt in prompts:
            engine.validate_prompt_length(len(engine.tokenize_prompt(prompt)))
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        except BaseException:
            for rid in ids:
                if rid not in done:
                    engine.abort_request(rid)
            raise
        return [done[rid] for rid in ids]
