"""xLLM: an LLM inference engine and serving framework on PyTorch."""

from xllm.logger import configure_logging
from xllm.outputs import CompletionOutput, RequestOutput
from xllm.sampling_params import SamplingParams

__version__ = "0.1.0"

configure_logging()

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    # The engine pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from xllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
