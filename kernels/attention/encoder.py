"""Attention without a paged cache: each token attends to the tokens of its own segment of a flat batch.

For bidirectional encoders (cross-encoder rerankers) whose requests are one forward pass with nothing
kept afterwards. Plain jnp on every platform; the paged kernels are for decoders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_attention(q, k, v, segment_ids, *, sm_scale: float, causal: bool = False):
    """`q [T, q_heads, D]`, `k` / `v` `[T, kv_heads, D]` (grouped-query: q_heads a multiple of kv_heads),
    `segment_ids int32[T]`: token `i` attends to every token `j` with `segment_ids[j] == segment_ids[i]`
    (and `j <= i` when `causal`). Tokens with a negative segment id are padding: they are attended by
    nobody and their output rows are zeros. Softmax in float32; the output has `q`'s dtype."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("thgd,shd->hgts", qg, k.astype(jnp.float32)) * sm_scale
    valid = segment_ids >= 0
    mask = (segment_ids[:, None] == segment_ids[None, :]) & valid[:, None] & valid[None, :]
    if causal:
        index = jnp.arange(num_tokens)
        mask &= index[None, :] <= index[:, None]
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
    # A padding row has no key at all: give it a finite row so softmax stays NaN-free, then zero it.
    scores = jnp.where(valid[None, None, :, None], scores, 0.0)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("hgts,shd->thgd", probs, v.astype(jnp.float32))
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
