"""OpenAI's logprob formats: the completions one (parallel lists) and the chat one (content items)."""

from __future__ import annotations

from collections.abc import Callable

from xllm.outputs import PositionLogprobs


def top(entry: PositionLogprobs, chosen: int, k: int) -> list[tuple[int, object]]:
    """The chosen token and the k most likely ones at a position, most likely first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= k or t == chosen), key=lambda x: x[1].rank)


class CompletionLogprobs:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset, built up
    piece by piece over a stream (each `add` returns its piece and keeps the offset going)."""

    def __init__(self, k: int, offset: int = 0):
        self.k = k
        self.offset = offset
        self.data = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_ids: list[int], entries: list[PositionLogprobs | None], token_text: Callable[[int], str | None]) -> dict:
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, entry in zip(token_ids, entries):
            text = entry[tid].decoded_token if entry is not None and tid in entry else token_text(tid)
            text = text or ""
            part["tokens"].append(text)
            part["token_logprobs"].append(None if entry is None else entry[tid].logprob)
            part["top_logprobs"].append(
                None if entry is None else {(lp.decoded_token or ""): lp.logprob for _, lp in top(entry, tid, self.k)}
            )
            part["text_offset"].append(self.offset)
            self.offset += len(text)
        for key in part:
            self.data[key].extend(part[key])
        return part


def chat_logprobs(token_ids: list[int], entries: list[PositionLogprobs], k: int) -> list[dict]:
    """Chat's `logprobs.content`: per token its text, logprob, bytes and top alternatives."""
    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        token = chosen.decoded_token or ""
        content.append({
            "token": token,
            "logprob": chosen.logprob,
            "bytes": list(token.encode()),
            "top_logprobs": [
                {"token": lp.decoded_token or "", "logprob": lp.logprob, "bytes": list((lp.decoded_token or "").encode())}
                for _, lp in sorted(entry.items(), key=lambda x: x[1].rank)
                if lp.rank <= k
            ],
        })
    return content
