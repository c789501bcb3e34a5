"""Ragged paged attention in plain jnp: the reference for the Pallas kernels and the CPU serving path.

Layout and semantics are documented in docs/architecture.md. The two facts that shape this code:
- the cache holds every layer (`[layers, pages, page_size, 2 * kv_heads, head_dim]`, K and V
  interleaved per head) so the layer scan can carry it and XLA scatters into it in place;
- cost must follow the lengths in use, not the allocated cache: the KV is walked in blocks of pages by
  a `fori_loop` whose trip count is `ceil(max(kv_lens) / block)`, with an online softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Per-block working set, in (token, kv position) pairs: a block gathers `tokens * block_tokens` KV rows.
# 32k pairs keeps a block of the default model (3 KV heads x 64 x 2 x f32) near 50 MB.
_BLOCK_PAIR_BUDGET = 32768
# Longest KV block: a short sequence should not gather (and mask) a block far longer than itself.
_MAX_BLOCK_TOKENS = 128
_NEG = -1e30


def token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens):
    """Per-token sequence id, absolute position and validity for a flat ragged batch.

    Token `t` belongs to the sequence `s` with `cu_q_lens[s] <= t < cu_q_lens[s + 1]`; its position is
    `kv_lens[s] - q_len[s] + (t - cu_q_lens[s])`. Tokens at or past `cu_q_lens[num_seqs]` are padding.
    """
    num_seqs_padded = kv_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # Entries past `num_seqs` may hold anything: treat them as empty sequences.
    cu_q_lens = jnp.where(jnp.arange(num_seqs_padded + 1) > num_seqs[0], cu_q_lens[num_seqs[0]], cu_q_lens)
    valid = t < cu_q_lens[num_seqs[0]]
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right", method="compare_all").astype(jnp.int32)
    seq = jnp.minimum(seq, num_seqs_padded - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (t - cu_q_lens[seq])
    return seq, jnp.where(valid, pos, 0), valid


def write_kv(kv_pages, layer, k, v, page_indices, seq, pos, valid):
    """Scatter the new tokens' K/V into their pages; padding rows go to page `num_pages` and are dropped."""
    num_pages, page_size = kv_pages.shape[1], kv_pages.shape[2]
    num_tokens, num_kv_heads, head_dim = k.shape
    page = page_indices[seq, pos // page_size]
    # Flat (layer, page) row index into a [layers * pages, ...] view: indexing `kv_pages[layer]` first
    # made XLA:CPU materialize the whole layer (a copy per layer per step, growing with the pool).
    row = jnp.where(valid, layer * num_pages + page, kv_pages.shape[0] * num_pages)
    kv_new = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
    flat = kv_pages.reshape((-1,) + kv_pages.shape[2:])
    flat = flat.at[row, pos % page_size].set(kv_new.astype(kv_pages.dtype), mode="drop")
    return flat.reshape(kv_pages.shape)


def block_pages_for(num_tokens: int, page_size: int, pages_per_seq: int) -> int:
    """Pages per KV block: as many as the per-block budget allows for this (static) token count."""
    block_tokens = max(page_size, min(_MAX_BLOCK_TOKENS, _BLOCK_PAIR_BUDGET // max(num_tokens, 1)))
    return max(1, min(pages_per_seq, block_tokens // page_size))


def ragged_paged_attention(
    q,
    k,
    v,
    kv_pages,
    layer,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """Causal attention of a flat ragged batch over a paged cache; returns `(out, kv_pages)`."""
    num_tokens, num_q_heads, head_dim = q.shape
    page_size = kv_pages.shape[2]
    num_kv_heads = kv_pages.shape[3] // 2
    group = num_q_heads // num_kv_heads
    num_seqs_padded, pages_per_seq = page_indices.shape

    seq, pos, valid = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    kv_pages = write_kv(kv_pages, layer, k, v, page_indices, seq, pos, valid)

    block_pages = block_pages_for(num_tokens, page_size, pages_per_seq)
    block_tokens = block_pages * page_size
    padded_pages = -(-pages_per_seq // block_pages) * block_pages
    page_indices = jnp.pad(page_indices, ((0, 0), (0, padded_pages - pages_per_seq)))

    live_lens = jnp.where(jnp.arange(num_seqs_padded) < num_seqs[0], kv_lens, 0)
    num_blocks = (jnp.max(live_lens) + block_tokens - 1) // block_tokens
    token_kv_len = jnp.where(valid, kv_lens[seq], 0)

    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    def body(block, carry):
        m, denom, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_indices, block * block_pages, block_pages, axis=1)
        rows = layer * kv_pages.shape[1] + pages[seq]  # flat (layer, page) rows, see write_kv
        kv = kv_pages.reshape((-1,) + kv_pages.shape[2:])[rows].astype(jnp.float32)  # [T, bp, ps, 2H, D]
        kv = kv.reshape(num_tokens, block_tokens, num_kv_heads, 2, head_dim)
        kb, vb = kv[..., 0, :], kv[..., 1, :]
        s = jnp.einsum("thgd,tkhd->thgk", qg, kb)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        mask = (kv_pos[None, :] <= pos[:, None]) & (kv_pos[None, :] < token_kv_len[:, None])
        if sliding_window is not None:
            mask &= kv_pos[None, :] > pos[:, None] - sliding_window
        # Slots past a sequence's length may hold anything (even NaN): zero them, as 0 * NaN is NaN.
        vb = jnp.where((kv_pos[None, :] < token_kv_len[:, None])[..., None, None], vb, 0.0)
        mask = mask[:, None, None, :]
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        denom = denom * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("thgk,tkhd->thgd", p, vb)
        return m_new, denom, acc

    init = (
        jnp.full((num_tokens, num_kv_heads, group), _NEG, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    _, denom, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    out = acc / jnp.maximum(denom, 1e-30)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_pages
