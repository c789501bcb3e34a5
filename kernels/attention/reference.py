"""Ragged paged attention in plain jnp: the reference for the Pallas kernels and the CPU serving path.

Layout and semantics are documented in docs/architecture.md. The facts that shape this code:
- the cache holds every layer, K and V interleaved per head. The kernels' layout is token-major
  (`[layers, pages, page_size, 2 * kv_heads, head_dim]`, `ragged_paged_attention` / `write_kv`); the
  jnp serving path keeps it head-major (`[layers, pages, 2 * kv_heads, page_size, head_dim]`, `attend`
  / `write_kv_layers`), which XLA:CPU reads without transposes;
- `attend` reads the cache and never writes it: the step's own tokens are attended from `k` / `v`, and
  the CPU model step scatters all layers' new K/V once, in a separate jit (`write_kv_layers`).
  Interleaving per-layer writes with reads made XLA:CPU copy the whole cache once per layer;
- cost must follow the lengths in use, not the allocated cache: the cached context is walked in blocks
  of pages by a `fori_loop` whose trip count is `ceil(max(context) / block)`, with an online softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.attention.cache_layout import cache_values, token_layout, value_dtype, write_kv

# Per-block working set, in (token, kv position) pairs: a block gathers `tokens * block_tokens` KV rows.
# 32k pairs keeps a block of the default model (3 KV heads x 64 x 2 x f32) near 50 MB.
_BLOCK_PAIR_BUDGET = 32768
# Longest KV block: a short sequence should not gather (and mask) a block far longer than itself.
_MAX_BLOCK_TOKENS = 128
_NEG = -1e30
# Keys per block when the step's own tokens attend to each other (a `[T, block]` score tile).
_MAX_NEW_BLOCK = 256


def block_pages_for(num_tokens: int, page_size: int, pages_per_seq: int) -> int:
    """Pages per KV block: as many as the per-block budget allows for this (static) token count."""
    block_tokens = max(page_size, min(_MAX_BLOCK_TOKENS, _BLOCK_PAIR_BUDGET // max(num_tokens, 1)))
    return max(1, min(pages_per_seq, block_tokens // page_size))


def _softmax_init(rows: tuple[int, ...], head_dim: int):
    """An empty online-softmax state `(max, denominator, accumulator)` for query rows of shape `rows`."""
    return (jnp.full(rows, _NEG, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros((*rows, head_dim), jnp.float32))


def _online_softmax_step(carry, s, mask, pv, *, zero_masked: bool = True):
    """Fold one block of scores `s [..., K]` (masked by `mask`, broadcastable) into the running
    `(max, denominator, accumulator)`; `pv(p)` is the block's probabilities times its values.

    `zero_masked=False` skips zeroing masked probabilities: a masked score is -1e30, so its exp is 0 once
    the row has met a real key, and what a row sums before that (every key masked so far) is finite
    junk that the next real key's correction `exp(-1e30 - max) = 0` erases. Only for callers whose every
    valid row meets a real key in some block (the step's own tokens: each row sees itself)."""
    m, denom, acc = carry
    s = jnp.where(mask, s, _NEG)
    m_new = jnp.maximum(m, s.max(axis=-1))
    p = jnp.exp(s - m_new[..., None])
    if zero_masked:
        p = jnp.where(mask, p, 0.0)
    correction = jnp.exp(m - m_new)
    return m_new, denom * correction + p.sum(axis=-1), acc * correction[..., None] + pv(p)


def attend(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
           sliding_window: int | None = None, soft_cap: float | None = None, layout=None,
           cache_is_finite: bool = False):
    """Causal attention of the new tokens, reading the cache only for each sequence's earlier context.

    `kv_pages` is head-major, `[layers, pages, 2 * kv_heads, page_size, head_dim]` (K of head h at row
    2h, V at 2h + 1): a gathered page of one head is then a contiguous `[page_size, head_dim]` block and
    the score / value products need no transposes (the kernels' token-major layout made XLA:CPU spend
    more time transposing gathered blocks than multiplying them). The cache holds positions
    `[0, kv_len - q_len)` of each sequence (the context before this step); the step's own tokens are
    attended from `k` / `v` directly (a `[T, T]` block masked to the same sequence and causal order).
    The cache is not written, so XLA never has to copy it: writing it inside the layer loop made XLA:CPU
    copy the whole cache once per layer (step time grew with the pool size).
    `layout`: `token_layout(...)` if the caller already has it. `cache_is_finite`: the caller promises
    no NaN / inf anywhere in the cache (the serving path: it starts at zeros and `write_kv_layers`
    writes finite values only), so slots past a sequence's length need no zeroing before `p @ v`.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, num_pages, two_heads, page_size, _ = kv_pages.shape
    num_kv_heads = two_heads // 2
    group = num_q_heads // num_kv_heads
    num_seqs_padded, pages_per_seq = page_indices.shape
    seq, pos, valid = layout if layout is not None else token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)

    qg = (q.astype(jnp.float32) * sm_scale).reshape(num_tokens, num_kv_heads, group, head_dim)

    # 1. The cached context, in blocks of pages gathered per token.
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    live = jnp.arange(num_seqs_padded) < num_seqs[0]
    prior_lens = jnp.where(live, kv_lens - q_lens, 0)
    token_prior = jnp.where(valid, prior_lens[seq], 0)
    head_rows = 2 * jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None]
    flat = kv_pages.reshape(-1, page_size, head_dim)  # rows: (layer, page, K/V head)

    def cache_part(rows: slice):
        """Online softmax over the cached context for the tokens `rows`: a loop over KV blocks whose trip
        count is set by the longest context among those tokens."""
        n = rows.stop - rows.start
        r_seq, r_pos, r_prior, r_q = seq[rows], pos[rows], token_prior[rows], qg[rows]
        block_pages = block_pages_for(n, page_size, pages_per_seq)
        block_tokens = block_pages * page_size
        padded_pages = -(-pages_per_seq // block_pages) * block_pages
        padded = jnp.pad(page_indices, ((0, 0), (0, padded_pages - pages_per_seq)))
        num_blocks = (jnp.max(r_prior) + block_tokens - 1) // block_tokens
        block_shape = (n, num_kv_heads, block_tokens, head_dim)

        def cache_block(block, carry):
            pages = jax.lax.dynamic_slice_in_dim(padded, block * block_pages, block_pages, axis=1)
            k_rows = (layer * num_pages + pages[r_seq])[:, None, :] * two_heads + head_rows  # [n, H, bp]
            kb = cache_values(flat[k_rows]).reshape(block_shape)
            vb = cache_values(flat[k_rows + 1]).reshape(block_shape)
            kv_pos = block * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
            in_seq = kv_pos[None, :] < r_prior[:, None]
            mask = in_seq
            if sliding_window is not None:
                mask &= kv_pos[None, :] > r_pos[:, None] - sliding_window
            if not cache_is_finite:
                # Slots past a sequence's length may hold anything (even NaN): zero them, as 0 * NaN is NaN.
                vb = jnp.where(in_seq[:, None, :, None], vb, 0.0)
            # Keys as the left operand (M = block_tokens, not the 1-8 query heads of a group): 2.5x faster
            # on XLA:CPU. The barrier keeps XLA from folding the transpose back into a `q @ k.T` dot.
            s = jax.lax.optimization_barrier(jnp.einsum("thkd,thgd->thkg", kb, r_q)).transpose(0, 1, 3, 2)
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            return _online_softmax_step(carry, s, mask[:, None, None, :],
                                        lambda p: jnp.einsum("thgk,thkd->thgd", p, vb))

        init = _softmax_init((n, num_kv_heads, group), head_dim)
        return jax.lax.fori_loop(0, num_blocks, cache_block, init)

    # The scheduler puts decodes (one token each, the longest contexts) first, so the first `S` tokens
    # and the rest get separate loops: a prefill chunk (usually no cached context) does not walk the
    # decodes' contexts, which made a mixed 512-token step 2x slower than a pure prefill one.
    split = min(num_seqs_padded, num_tokens)
    parts = [cache_part(slice(0, split))]
    if split < num_tokens:
        parts.append(cache_part(slice(split, num_tokens)))
    carry = tuple(jnp.concatenate(xs) for xs in zip(*parts, strict=True)) if len(parts) > 1 else parts[0]

    # 2. The step's own tokens: same sequence, not later (rounded to the cache dtype, as if read back).
    # Head-major, so the score and value products are plain batched matmuls (XLA:CPU transposed the
    # token-major operands first: 2.5x slower at 512 tokens).
    q_heads = qg.transpose(1, 2, 0, 3)  # [H, G, T, D]
    cache_dtype = value_dtype(kv_pages.dtype)
    k_new = k.astype(cache_dtype).astype(jnp.float32).transpose(1, 0, 2)  # [H, T, D]
    v_new = v.astype(cache_dtype).astype(jnp.float32).transpose(1, 0, 2)
    new_carry = _softmax_init((num_kv_heads, group, num_tokens), head_dim)
    new_block = min(num_tokens, _MAX_NEW_BLOCK)
    for start in range(0, num_tokens, new_block):
        keys = slice(start, start + new_block)
        mask = (seq[:, None] == seq[None, keys]) & (pos[None, keys] <= pos[:, None]) & valid[None, keys]
        if sliding_window is not None:
            mask &= pos[None, keys] > pos[:, None] - sliding_window
        s = jnp.einsum("hgtd,hkd->hgtk", q_heads, k_new[:, keys])
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        # Every valid row meets itself, so masked probabilities need no second select.
        new_carry = _online_softmax_step(new_carry, s, mask, lambda p, keys=keys: jnp.einsum(
            "hgtk,hkd->hgtd", p, v_new[:, keys]), zero_masked=False)

    # 3. Merge the two partial softmaxes.
    m_cache, d_cache, acc_cache = carry
    m_new, d_new, acc_new = (x.transpose(2, 0, 1, *range(3, x.ndim)) for x in new_carry)  # -> [T, H, G, ...]
    m = jnp.maximum(m_cache, m_new)
    a_cache, a_new = jnp.exp(m_cache - m), jnp.exp(m_new - m)
    denom = d_cache * a_cache + d_new * a_new
    acc = acc_cache * a_cache[..., None] + acc_new * a_new[..., None]
    out = acc / jnp.maximum(denom, 1e-30)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


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
    """Causal attention of a flat ragged batch over a paged cache; returns `(out, kv_pages)` with the new
    tokens' K/V written. The kernels' contract: a token-major cache `[layers, pages, page_size,
    2 * kv_heads, head_dim]`, attended over the whole `[0, kv_len)` (read here from a head-major copy)."""
    layout = token_layout(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    out = attend(q, k, v, kv_pages.transpose(0, 1, 3, 2, 4), layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                 sliding_window=sliding_window, soft_cap=soft_cap, layout=layout)
    return out, write_kv(kv_pages, layer, k, v, page_indices, *layout)
