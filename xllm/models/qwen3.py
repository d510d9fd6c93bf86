"""Qwen3 (dense): the Llama structure with an RMSNorm over each head of q and k, before rope."""

from xllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
