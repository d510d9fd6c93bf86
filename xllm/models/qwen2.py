"""Qwen2: the Llama structure with biases on q/k/v (read from the config's attention_bias)."""

from xllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
