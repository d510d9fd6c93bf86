"""Request bodies of the OpenAI-compatible API, validated with pydantic.

Fields are typed strictly enough that a wrong type is a 400 naming the field. Fields of the
OpenAI API that xLLM does not implement are refused by name (`UNSUPPORTED`), never ignored in
silence; fields nobody defined are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

# Fields that change what the client gets back, and that we cannot honour yet: refused by name.
UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "parallel_tool_calls": "tool calling",
    "response_format": "structured output",
    "guided_json": "structured output",
    "guided_regex": "structured output",
    "guided_choice": "structured output",
    "guided_grammar": "structured output",
    "use_beam_search": "beam search",
    "length_penalty": "beam search",
    "suffix": "suffix insertion",
    "audio": "audio output",
    "modalities": "non-text output",
    "prediction": "predicted outputs",
}

Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]
TokenIds = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr | None = None
    n: StrictInt = 1
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Number] | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: "StreamOptions | None" = None
    user: StrictStr | None = None
    best_of: StrictInt | None = None
    # vLLM's extra sampling fields
    top_k: StrictInt | None = None
    min_p: Number | None = None
    repetition_penalty: Number | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = 0
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    # vLLM's prefix-cache isolation: requests with different salts never share cached KV blocks.
    cache_salt: Annotated[str, Field(min_length=1, strict=True)] | None = None
    priority: StrictInt = 0  # lower runs first (vLLM's field)
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # seconds; then finish_reason "timeout"


def check_unsupported(data: dict) -> None:
    """Raise UnsupportedField for the first field of `data` asking for a feature we lack."""
    for name, feature in UNSUPPORTED.items():
        value = data.get(name)
        if value is None or value is False or value == [] or value == {}:
            continue
        if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        raise UnsupportedField(name, feature)
    best_of, n = data.get("best_of"), data.get("n", 1)
    if best_of is not None and best_of != n:
        raise UnsupportedField("best_of", "best-of-n selection (best_of must equal n)")


class UnsupportedField(ValueError):
    def __init__(self, field: str, feature: str):
        super().__init__(f"'{field}' is not supported by this server ({feature} is not implemented)")
        self.field = field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class CompletionRequest(_Body):
    prompt: StrictStr | list[StrictStr] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    max_tokens: StrictInt | None = 16  # OpenAI's default for completions
    prompt_logprobs: StrictInt | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    add_generation_prompt: StrictBool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    tokens: TokenIds


_Body.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()
