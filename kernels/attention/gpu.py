"""Ragged paged attention for NVIDIA GPUs: Pallas kernels through the Triton lowering.

Triton is selected explicitly with `CompilerParams` from `jax.experimental.pallas.triton` (the default
GPU lowering is Mosaic GPU since JAX 0.9; the Triton one is deprecated in 0.11 but present). Triton has
no scalar prefetch, so the metadata arrays are ordinary inputs and the kernels load scalars from them.

Write: one program per new token stores its K and V rows of every head into its page slot; padding
tokens store nothing. The cache is aliased input to output, so XLA updates it in place.

Attention: grid `(work item, KV head, KV split)`. A work item is a block of new tokens of one sequence
(`tuning.query_block_schedule`); its query rows for one KV head are the tokens times the query heads
that share that head (padded to a power of two), one matrix, so decode rows of a GQA group still fill
a tensor-core tile. The program walks its share of the item's KV blocks, gathering each block's pages
through the page table, with an online softmax. Decode batches split the KV range over several
programs (flash-decoding) and merge the partial results in a small jnp epilogue; prefill batches use one
split and write the normalised output directly.

Invariants: page-table entries past a sequence's length are never read (page 0 stands in for them)
and K/V rows at positions `>= kv_len` are zeroed after the load, so whatever those slots hold (NaN
included) cannot reach the result; stores are masked to the item's own rows, so programs never
write the same element; rows that no item covers (padding) are zeroed by the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.attention import tuning

try:  # Present in jax 0.10-0.12; absent from a jax whose Triton lowering was removed.
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def available() -> bool:
    """Whether this jax still has the Pallas Triton lowering."""
    return pltriton is not None and hasattr(pltriton, "CompilerParams")


def _compiler_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load(ref, mask=None, other=None):
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=mask, other=other)


def _store(ref, value, mask):
    pltriton.store(ref, value, mask=mask)


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------------
# KV write


def _write_kernel(layer_ref, page_ref, slot_ref, num_valid_ref, k_ref, v_ref, kv_in_ref, kv_out_ref):
    del kv_in_ref  # the same buffer as kv_out_ref (aliased)
    token = pl.program_id(0)
    num_kv_heads = k_ref.shape[1]

    @pl.when(token < num_valid_ref[0])
    def _write():
        layer, page, slot = layer_ref[0], page_ref[token], slot_ref[token]
        for head in range(num_kv_heads):
            kv_out_ref[layer, page, slot, 2 * head, :] = k_ref[token, head, :].astype(kv_out_ref.dtype)
            kv_out_ref[layer, page, slot, 2 * head + 1, :] = v_ref[token, head, :].astype(kv_out_ref.dtype)


def write_kv_pages(kv_pages, layer, k, v, page, slot, num_valid, *, interpret: bool = False):
    """Write rows `t < num_valid` of k/v to `kv_pages[layer, page[t], slot[t]]`; returns the cache."""
    num_tokens = k.shape[0]
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    return pl.pallas_call(
        _write_kernel,
        grid=(num_tokens,),
        out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        input_output_aliases={6: 0},
        compiler_params=_compiler_params(num_warps=1, num_stages=1),
        interpret=interpret,
        name="kv_write_gpu",
    )(layer, page, slot, num_valid, k, v, kv_pages)


# ---------------------------------------------------------------------------------------------------
# Attention


def _attention_kernel(
    layer_ref, kv_lens_ref, page_indices_ref, cu_q_lens_ref, item_seq_ref, item_block_ref, num_items_ref,
    q_ref, kv_ref, *out_refs,
    sm_scale, sliding_window, soft_cap, q_tokens, block_pages, num_splits,
):
    _, _, group_padded, head_dim = q_ref.shape
    page_size = kv_ref.shape[2]
    pages_per_seq = page_indices_ref.shape[1]
    block_tokens = block_pages * page_size
    rows = q_tokens * group_padded
    item, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(item < num_items_ref[0])
    def _item():
        seq = item_seq_ref[item]
        block_in_seq = item_block_ref[item]
        q_begin = cu_q_lens_ref[seq]
        q_len = cu_q_lens_ref[seq + 1] - q_begin
        kv_len = kv_lens_ref[seq]
        layer = layer_ref[0]
        first_row = q_begin + block_in_seq * q_tokens
        num_rows = jnp.minimum(q_tokens, q_len - block_in_seq * q_tokens)
        first_pos = kv_len - q_len + block_in_seq * q_tokens
        last_pos = first_pos + num_rows - 1
        lowest_pos = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        first_block = lowest_pos // block_tokens
        end_block = last_pos // block_tokens + 1
        per_split = (end_block - first_block + num_splits - 1) // num_splits
        split_begin = first_block + split * per_split
        split_end = jnp.minimum(split_begin + per_split, end_block)
        seq_pages = (kv_len + page_size - 1) // page_size

        q = q_ref[pl.ds(first_row, q_tokens), head, :, :].reshape(rows, head_dim)
        row_pos = first_pos + jnp.arange(rows, dtype=jnp.int32) // group_padded
        lane = jnp.arange(block_tokens, dtype=jnp.int32)
        page_lane = jnp.arange(block_pages, dtype=jnp.int32)

        def kv_block(block, carry):
            m, denom, acc = carry
            page_no = block * block_pages + page_lane
            # Table entries past the sequence's pages are not read; page 0 (always a valid index)
            # stands in for them, and its rows are zeroed below with the other positions >= kv_len.
            pages = _load(page_indices_ref.at[seq, pl.ds(block * block_pages, block_pages)],
                          mask=(page_no < seq_pages) & (page_no < pages_per_seq), other=0)
            pages = jnp.where(page_no < seq_pages, pages, 0)
            kv_pos = block * block_tokens + lane
            in_range = (kv_pos < kv_len)[:, None]
            k = kv_ref[layer, pages, :, 2 * head, :].reshape(block_tokens, head_dim)
            v = kv_ref[layer, pages, :, 2 * head + 1, :].reshape(block_tokens, head_dim)
            k = jnp.where(in_range, k, 0).astype(k.dtype)
            v = jnp.where(in_range, v, 0).astype(v.dtype)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            mask = (kv_pos[None, :] <= row_pos[:, None]) & (kv_pos[None, :] < kv_len)
            if sliding_window is not None:
                mask = mask & (kv_pos[None, :] > row_pos[:, None] - sliding_window)
            s = jnp.where(mask, s, MASK_VALUE)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            denom_new = alpha * denom + jnp.sum(p, axis=1)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
            return m_new, denom_new, acc * alpha[:, None] + pv

        init = (
            jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32),
        )
        m, denom, acc = lax.fori_loop(split_begin, split_end, kv_block, init)

        row_ok = jnp.arange(q_tokens, dtype=jnp.int32) < num_rows
        out_rows = pl.ds(first_row, q_tokens)
        mask3 = jnp.broadcast_to(row_ok[:, None, None], (q_tokens, group_padded, head_dim))
        if num_splits == 1:
            (o_ref,) = out_refs
            out = acc / jnp.where(denom == 0.0, 1.0, denom)[:, None]
            _store(o_ref.at[out_rows, head, :, :],
                   out.reshape(q_tokens, group_padded, head_dim).astype(o_ref.dtype), mask3)
        else:
            o_ref, m_ref, l_ref = out_refs
            mask2 = jnp.broadcast_to(row_ok[:, None], (q_tokens, group_padded))
            _store(o_ref.at[split, out_rows, head, :, :], acc.reshape(q_tokens, group_padded, head_dim), mask3)
            _store(m_ref.at[split, out_rows, head, :], m.reshape(q_tokens, group_padded), mask2)
            _store(l_ref.at[split, out_rows, head, :], denom.reshape(q_tokens, group_padded), mask2)


def attention(q, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
              sliding_window=None, soft_cap=None, interpret: bool = False, q_tokens: int | None = None,
              block_pages: int | None = None, num_splits: int | None = None):
    """Attention of the new tokens over `kv_pages[layer]` (their own K/V already written)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, combined_heads, _ = kv_pages.shape
    num_kv_heads = combined_heads // 2
    group = num_q_heads // num_kv_heads
    group_padded = _next_pow2(group)
    max_seqs = page_indices.shape[0]
    tuned = tuning.gpu_attention_blocks(
        num_tokens=num_tokens, max_seqs=max_seqs, page_size=page_size, group_padded=group_padded,
        head_dim=head_dim, num_kv_heads=num_kv_heads,
        capability=None if not interpret else "9.0", num_sms=None if not interpret else 132,
    )
    q_tokens = q_tokens or tuned[0]
    block_pages = block_pages or tuned[1]
    num_splits = num_splits or tuned[2]
    num_warps, num_stages = tuned[3], tuned[4]
    num_items = tuning.max_work_items(num_tokens, max_seqs, q_tokens)
    item_seq, item_block, num_live = tuning.query_block_schedule(
        cu_q_lens, num_seqs, q_tokens=q_tokens, num_items=num_items
    )
    # [tokens + one block, kv_heads, group (padded to a power of two), head_dim], in the cache dtype.
    q4 = q.astype(kv_pages.dtype).reshape(num_tokens, num_kv_heads, group, head_dim)
    q4 = jnp.pad(q4, ((0, q_tokens), (0, 0), (0, group_padded - group), (0, 0)))
    padded_rows = num_tokens + q_tokens
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((padded_rows, num_kv_heads, group_padded, head_dim), q.dtype)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, padded_rows, num_kv_heads, group_padded, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, padded_rows, num_kv_heads, group_padded), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, padded_rows, num_kv_heads, group_padded), jnp.float32),
        ]
    kernel = functools.partial(
        _attention_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap), q_tokens=q_tokens, block_pages=block_pages,
        num_splits=num_splits,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(num_items, num_kv_heads, num_splits),
        out_shape=out_shape,
        compiler_params=_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(jnp.asarray(layer, jnp.int32).reshape(1), kv_lens, page_indices, cu_q_lens, item_seq, item_block,
      num_live, q4, kv_pages)
    if num_splits == 1:
        out = outs[0]
    else:
        o_part, m_part, l_part = outs
        m_max = jnp.max(m_part, axis=0)
        weight = jnp.exp(m_part - m_max[None])
        denom = jnp.sum(weight * l_part, axis=0)
        out = jnp.sum(weight[..., None] * o_part, axis=0) / jnp.where(denom == 0.0, 1.0, denom)[..., None]
    out = out[:num_tokens, :, :group, :].reshape(num_tokens, num_q_heads, head_dim)
    valid = jnp.arange(num_tokens) < tuning.active_cu_q_lens(cu_q_lens, num_seqs)[-1]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def ragged_paged_attention(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, interpret: bool = False,
                           q_tokens: int | None = None, block_pages: int | None = None,
                           num_splits: int | None = None):
    """The GPU path of `kernels.attention.ragged_paged_attention`: write the new K/V, then attend."""
    page, slot, num_valid = tuning.token_write_slots(
        kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens=q.shape[0], page_size=kv_pages.shape[2]
    )
    kv_pages = write_kv_pages(kv_pages, layer, k, v, page, slot, num_valid, interpret=interpret)
    out = attention(q, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                    sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                    q_tokens=q_tokens, block_pages=block_pages, num_splits=num_splits)
    return out, kv_pages
