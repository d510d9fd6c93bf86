"""Incremental detokenization for streaming.

Decoding a growing token list one token at a time is wrong for byte-level BPE: a multi-byte
character can span tokens, and decoding a partial one gives U+FFFD. We keep two offsets into the
output tokens: text is emitted for tokens after `read_offset` only once their decoding, in the
context of the tokens from `prefix_offset`, no longer ends in an incomplete character.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_ids: list[int], finished: bool = False) -> str:
        """token_ids: all output tokens so far. Returns the new text since the last call."""
        if self.tokenizer is None:
            return ""
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(token_ids[self.prefix_offset :])
        delta = ""
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(token_ids)
        elif finished and len(new_text) > len(prefix_text):
            delta = new_text[len(prefix_text) :]  # the stream ended on an incomplete character: flush it
            self.read_offset = len(token_ids)
        self.text += delta
        return delta
