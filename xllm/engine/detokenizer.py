"""Incremental detokenization with stop strings, for streaming.

Decoding a growing token list one token at a time is wrong for byte-level BPE: a multi-byte
character can span tokens, and decoding a partial one gives U+FFFD. We keep two offsets into the
output tokens: text for tokens after `read_offset` is appended only once its decoding, in the
context of the tokens from `prefix_offset`, no longer ends in an incomplete character.

Stop strings are searched in the decoded text (so they may span tokens). While a request runs,
the last len(longest stop) - 1 characters are held back from the stream, since they could be the
start of a stop string; the pieces handed out (`take_delta`) always add up to the final text.

Work per token is bounded by the new text and the held-back characters, never by the text so far:
only the text not yet handed out is kept as one string (and searched for stops: an occurrence of
a stop that reaches into new text starts within the held-back characters), and what was handed
out is kept as pieces, joined once when the whole text is asked for.
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
        self._sent: list[str] = []  # the pieces handed out, in order
        self._unsent = ""  # decoded text not handed out yet (held back, or new since the last take)
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
        before = len(self._unsent)
        self._unsent += new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        if check_stop and self.stop:
            return self._find_stop(before)
        return None

    def _find_stop(self, before: int) -> str | None:
        start = max(0, before - self.holdback)  # a stop may begin in text we already had
        hits = [(idx, s) for s in self.stop if (idx := self._unsent.find(s, start)) != -1]
        if not hits:
            return None
        idx, stop = min(hits)
        self._unsent = self._unsent[: idx + len(stop)] if self.include_stop else self._unsent[:idx]
        self.stopped = True
        return stop

    def take_delta(self, finished: bool) -> str:
        """The text not yet handed out, minus what might still turn out to be part of a stop string."""
        end = len(self._unsent) if finished or self.stopped else max(0, len(self._unsent) - self.holdback)
        delta, self._unsent = self._unsent[:end], self._unsent[end:]
        if delta:
            self._sent.append(delta)
        return delta

    @property
    def pending_chars(self) -> int:
        """Characters decoded but not handed out (bounded by the hold-back and one step's text)."""
        return len(self._unsent)

    @property
    def visible_text(self) -> str:
        """Everything handed out so far (joined on each call: ask once, at the end)."""
        if len(self._sent) > 1:
            self._sent = ["".join(self._sent)]
        return self._sent[0] if self._sent else ""

    @property
    def text(self) -> str:
        """The whole text decoded so far, held-back characters included."""
        return self.visible_text + self._unsent
