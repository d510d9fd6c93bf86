"""Incremental detokenization with stop strings, for streaming.

Decoding a growing token list one token at a time is wrong for byte-level BPE: a multi-byte
character can span tokens, and decoding a partial one gives U+FFFD. We keep two offsets into the
output tokens: text for tokens after `read_offset` is appended only once its decoding, in the
context of the tokens from `prefix_offset`, no longer ends in an incomplete character.

Stop strings are searched in the decoded text (so they may span tokens). While a request runs,
the last len(longest stop) - 1 characters are held back from the stream, since they could be the
start of a stop string; the pieces handed out (`take_delta`) always add up to the final text.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True, stop: list[str] | None = None, include_stop: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop or []
        self.include_stop = include_stop
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def update(self, token_ids: list[int], finished: bool = False, check_stop: bool = True) -> str | None:
        """token_ids: all output tokens so far. Appends their new text; returns the stop string hit, if any."""
        if self.tokenizer is None or self.stopped:
            return None
        prefix_text = self._decode(token_ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text):
            return None
        if new_text.endswith("\ufffd") and not finished:
            return None  # an incomplete character: wait for the next token
        before = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        if check_stop and self.stop:
            return self._find_stop(before)
        return None

    def _find_stop(self, before: int) -> str | None:
        start = max(0, before - self.holdback)  # a stop may begin in text we already had
        hits = [(idx, s) for s in self.stop if (idx := self.text.find(s, start)) != -1]
        if not hits:
            return None
        idx, stop = min(hits)
        self.text = self.text[: idx + len(stop)] if self.include_stop else self.text[:idx]
        self.stopped = True
        return stop

    def take_delta(self, finished: bool) -> str:
        """The text not yet handed out, minus what might still turn out to be part of a stop string."""
        end = len(self.text) if finished or self.stopped else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta

    @property
    def visible_text(self) -> str:
        return self.text[: self.sent]
