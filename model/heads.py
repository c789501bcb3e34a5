"""What turns the decoder's final hidden states into a result: the LM head, poolers, classification heads.

- `LMHead`: logits over the vocabulary (tied to the embeddings or its own `[hidden, vocab]` kernel).
- `pool`: one vector per sequence from its rows of a flat ragged batch (last token, mean, or first token,
  optionally L2-normalised), for embedding models.
Classification / reward score heads join them with the models that use them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.dense import dense

POOLING_METHODS = ("last", "mean", "cls")


class LMHead(nnx.Module):
    """`[S, hidden] -> float32 [S, vocab]`. Tied: reads the embedding table given at call time."""

    def __init__(self, hidden: int, vocab: int, *, tied: bool, dtype, rngs: nnx.Rngs):
        self.kernel = None if tied else nnx.Param(
            jax.random.normal(rngs.params(), (hidden, vocab), dtype) / math.sqrt(hidden))

    def __call__(self, x, embedding):
        if self.kernel is None:  # a product over the rows of the [vocab, hidden] table, as it is stored
            out = dense(x, embedding, transposed=True)
        else:
            out = dense(x, self.kernel[...])
        return out.astype(jnp.float32)


def pool(hidden, cu_q_lens, num_seqs, *, method: str = "last", normalize: bool = False):
    """`hidden [T, D]` of a flat batch whose sequence `s` owns rows `cu_q_lens[s]:cu_q_lens[s+1]` ->
    float32 `[S, D]` (S = `cu_q_lens.shape[0] - 1`); rows of sequences `>= num_seqs[0]` are zeros.
    Every sequence must be whole in this batch (a pooled request runs as one chunk)."""
    if method not in POOLING_METHODS:
        raise ValueError(f"pooling method must be one of {POOLING_METHODS}, got {method!r}")
    x = hidden.astype(jnp.float32)
    starts, ends = cu_q_lens[:-1], cu_q_lens[1:]
    present = (jnp.arange(starts.shape[0]) < num_seqs[0]) & (ends > starts)
    if method == "last":
        out = x[jnp.maximum(ends - 1, 0)]
    elif method == "cls":
        out = x[jnp.minimum(starts, x.shape[0] - 1)]
    else:
        rows = jnp.arange(x.shape[0])
        member = (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])  # [S, T]
        out = (member.astype(jnp.float32) @ x) / jnp.maximum(ends - starts, 1)[:, None].astype(jnp.float32)
    if normalize:
        out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return jnp.where(present[:, None], out, 0.0)

