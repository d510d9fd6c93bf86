"""The model's tokenizer and chat template, from the same folder as its weights.

Wraps a `tokenizers.Tokenizer` (tokenizer.json) and renders the chat template from
tokenizer_config.json with Jinja2 the way transformers does (sandboxed, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import cached_property

from xllm.models.errors import ModelLoadError
from xllm.models.loader.hf import read_json


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, backend, config: dict):
        self.backend = backend
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)

    @classmethod
    def from_folder(cls, folder: str) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = Backend.from_file(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot read {path}: {exc}") from exc
        config = read_json(os.path.join(folder, "tokenizer_config.json"))
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file) as f:
                config["chat_template"] = f.read()
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.backend.post_processor is None
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _template(self):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            from jinja2.exceptions import TemplateError

            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the conversation to the prompt text the model was trained on."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': str, 'content': str} dicts")
        if not messages:
            raise ValueError("messages must not be empty")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )
