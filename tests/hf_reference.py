"""Checking our greedy tokens against transformers without tripping over near-ties.

Comparing two greedy runs token for token fails whenever two logits at some step are closer than the
float32 rounding difference between the two implementations (about 1e-6 relative here): the runs pick
different tokens and from there legitimately continue differently. With fresh random weights each run
that happens now and then over thousands of tokens (CI saw it once in 64 x 24 tokens). So the check is
teacher-forced instead: one transformers forward over prompt + our tokens, and each of our tokens must
have the highest logit at its position, or one within `TIE_TOLERANCE` (relative to the row's largest
magnitude) of it. A real bug, a wrong token, a shifted position or a stale cache page, picks tokens far
from the top and still fails.
"""

from __future__ import annotations

import numpy as np
import torch

# Relative: the engine's logits agree with transformers' to 1e-4 of their largest magnitude
# (tests/test_model_fidelity.py); a gap this small is a tie either side may break its own way.
TIE_TOLERANCE = 1e-4


def assert_greedy(hf, prompt: list[int], ours: list[int], n: int | None = None, label: str = "",
                  tolerance: float = TIE_TOLERANCE) -> int:
    """Assert `ours` is a greedy continuation of `prompt` under `hf` (up to near-ties), of `n` tokens
    when given. Returns how many of our tokens were near-ties that were not the exact argmax. `tolerance`:
    the relative gap that counts as a tie (a bfloat16 model needs one of bfloat16's size)."""
    if n is not None:
        assert len(ours) == n, f"{label}: {len(ours)} tokens, expected {n}"
    if not ours:
        return 0
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours])).logits[0].double().numpy()
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(ours)]
    ties = 0
    for i, (row, token) in enumerate(zip(rows, ours, strict=True)):
        best = int(row.argmax())
        if token == best:
            continue
        gap = row[best] - row[token]
        scale = max(1.0, float(np.abs(row).max()))
        assert gap <= tolerance * scale, (
            f"{label}: token {i} is {token} (logit {row[token]:.6f}), transformers' greedy choice is {best} "
            f"(logit {row[best]:.6f}); ours so far {ours[:i + 1]}")
        ties += 1
    return ties
