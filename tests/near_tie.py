"""The near-tie rule for greedy comparisons against a transformers reference.

Where the reference's top-2 logits differ by less than NEAR_TIE, either token is a correct greedy
choice (float rounding decides), so a comparison stops at that position. Tests report how many
cases the rule cut short.
"""

from __future__ import annotations

import torch

NEAR_TIE = 1e-3


def first_gap_below(logits: torch.Tensor, n: int, threshold: float = NEAR_TIE) -> int:
    """Index of the first of the first `n` rows of `logits` [steps, vocab] whose top-2 gap is < threshold (n if none)."""
    top2 = logits[:n].float().topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    for i, gap in enumerate(gaps):
        if gap < threshold:
            return i
    return n


def first_near_tie(hf_model, prompt_ids: list[int], output_ids: list[int]) -> int:
    """Index of the first generated position whose reference top-2 gap is < NEAR_TIE (len if none).

    One full forward pass of the reference over prompt + output.
    """
    if not output_ids:
        return 0
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + output_ids])).logits[0, len(prompt_ids) - 1 :]
    return first_gap_below(logits, len(output_ids))


def teacher_forced(hf_model, prompt_ids: list[int], output_ids: list[int]) -> tuple[int, int | None]:
    """Check a greedy output against the reference's argmax at each of its positions, in one forward pass.

    Returns (stop_at, first_mismatch): stop_at is the first position whose reference top-2 gap is
    < NEAR_TIE (len if none); first_mismatch is the first position before stop_at where the output is
    not the reference's argmax given the same prefix, or None. No mismatch means the reference's own
    greedy decoding yields the same tokens up to stop_at (by induction over the positions), at the
    cost of one forward pass instead of one per generated token.
    """
    if not output_ids:
        return 0, None
    with torch.no_grad():
        # Only the positions that predict an output token need the (vocabulary-sized) head.
        out = hf_model(torch.tensor([prompt_ids + output_ids]), logits_to_keep=len(output_ids) + 1)
        logits = out.logits[0, :-1]
    stop = first_gap_below(logits, len(output_ids))
    argmax = logits[:stop].argmax(dim=-1).tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(argmax, output_ids)) if a != b), None)
    return stop, mismatch


def compare(reference: list[int], ours: list[int], stop_at: int) -> bool:
    """Equal up to the near-tie position; where there is none, fully equal."""
    if stop_at >= len(reference):
        return ours == reference
    return ours[:stop_at] == reference[:stop_at]
