"""The paged KV cache's codec: how K/V rows are laid out, stored and written, shared by every backend.

Layouts (docs/architecture.md): one array for all layers, K and V interleaved per KV head (index `2*h` is
K of head `h`, `2*h+1` its V).
- token-major `[layers, pages, page_size, 2 * kv_heads, head_dim]`: the Pallas kernels' cache, written per
  layer inside the step (`write_kv`);
- head-major `[layers, pages, 2 * kv_heads, page_size, head_dim]`: the CPU path's cache, read only inside
  the step and written once after it for every layer (`write_kv_layers`), optionally with each page's K
  block stored transposed (what the native CPU kernel reads in place).
On the head-major path a bfloat16 cache is stored as its bit patterns in uint16 (`storage_dtype`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def storage_dtype(dtype):
    """What the CPU path's cache array holds for a cache of `dtype`: bfloat16 is kept as its bit patterns
    in uint16, because XLA:CPU widens a whole bfloat16 array to float32 and back to scatter into it (and
    materializes a bitcast of it too): a 2 GB cache cost 2 s per step that way."""
    return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def value_dtype(dtype):
    """The dtype of the values a cache array of (storage) `dtype` holds: inverse of `storage_dtype`."""
    return jnp.dtype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.uint16 else jnp.dtype(dtype)


def cache_values(x):
    """Cache elements as float32 (uint16 storage holds bfloat16 bits)."""
    if x.dtype == jnp.uint16:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(jnp.float32)


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
    page = page_indices[seq, pos // page_size]
    # Flat (layer, page) row index into a [layers * pages, ...] view: indexing `kv_pages[layer]` first
    # made XLA:CPU materialize the whole layer (a copy per layer per step, growing with the pool).
    row = jnp.where(valid, layer * num_pages + page, kv_pages.shape[0] * num_pages)
    kv_new = interleave_kv(k, v)
    flat = kv_pages.reshape((-1,) + kv_pages.shape[2:])
    flat = flat.at[row, pos % page_size].set(kv_new.astype(kv_pages.dtype), mode="drop")
    return flat.reshape(kv_pages.shape)


def write_kv_layers(kv_pages, kv_new, page_indices, seq, pos, valid, *, k_transposed: bool = False):
    """Scatter every layer's new K/V (`[layers, T, 2 * kv_heads, head_dim]`, as `interleave_kv` makes
    them) into a head-major cache (`[layers, pages, 2 * kv_heads, page_size, head_dim]`, the CPU path's
    layout, see `attend`) in one go. Padding rows go to row `layers * pages` and are dropped.
    `k_transposed`: store each page's K block as K^T (`[head_dim, page_size]` in the same floats), the
    layout the native CPU kernel reads in place (`cpu.attend(k_transposed=True)`); V is unchanged."""
    num_layers, num_pages, two_heads, page_size, head_dim = kv_pages.shape
    page = page_indices[seq, pos // page_size]
    layer_rows = jnp.arange(num_layers, dtype=jnp.int32)[:, None] * num_pages
    rows = jnp.where(valid[None, :], layer_rows + page[None, :], num_layers * num_pages)  # [L, T]
    heads = jnp.arange(two_heads, dtype=jnp.int32)
    flat = kv_pages.reshape(num_layers * num_pages, two_heads, page_size, head_dim)
    # Only finite values go in, so readers may skip masking stale slots (`reference.attend(cache_is_finite=True)`):
    # a request whose activations overflowed must not poison the pages the next one gets.
    kv_new = jnp.nan_to_num(kv_new.astype(value_dtype(kv_pages.dtype)))
    if kv_pages.dtype == jnp.uint16:  # bfloat16 bits, see `storage_dtype`
        kv_new = jax.lax.bitcast_convert_type(kv_new, jnp.uint16)
    slot = (pos % page_size)[None, :, None]
    if not k_transposed:
        flat = flat.at[rows[:, :, None], heads[None, None, :], slot].set(kv_new, mode="drop")
        return flat.reshape(kv_pages.shape)
    k_heads = heads[None, None, 0::2]
    transposed = flat.reshape(num_layers * num_pages, two_heads, head_dim, page_size)
    transposed = transposed.at[rows[:, :, None], k_heads, :, slot].set(kv_new[:, :, 0::2], mode="drop")
    flat = transposed.reshape(flat.shape)
    flat = flat.at[rows[:, :, None], k_heads + 1, slot].set(kv_new[:, :, 1::2], mode="drop")
    return flat.reshape(kv_pages.shape)


def interleave_kv(k, v):
    """`[T, kv_heads, D]` x 2 -> `[T, 2 * kv_heads, D]`, the cache's per-token row (K/V per head)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    return jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim)
