"""Ragged paged attention for TPU (Mosaic): a KV write kernel and an attention kernel.

Write: every real new token's K/V row (`[2 * kv_heads, head_dim]`, interleaved like the cache) is one
DMA from HBM to its page slot; the cache is aliased input to output, so XLA updates it in place.

Attention: the new tokens are cut into work items, one block of up to `q_tokens` tokens of one
sequence each (`tuning.query_block_schedule`); the grid walks the items in order. An item copies its
query rows into VMEM, then walks the KV blocks it needs (from the sliding-window start to its last
token's position) with double-buffered page DMAs, one DMA per page holding every KV head. Each block
is staged once into a flat 32-bit scratch so that every head's K and V are one strided load. For each
KV head the query heads that share it are folded into one `[q_tokens * group, head_dim]` matrix and updated
with an online softmax (m / l / acc in VMEM scratch). The finished block is copied to the output rows.

Invariants the code relies on:
- all metadata (lengths, page table, schedule) is scalar-prefetched into SMEM;
- a page is fetched only if it holds positions `< kv_len`, so page-table entries past a sequence's
  length are never read; positions past `kv_len` inside a fetched page are masked (K and V zeroed, so
  whatever the slot holds, NaN included, cannot leak into the result);
- shapes it takes on a real TPU are those of `validate.kernel_supports` (page_size and 2 * kv_heads in
  whole sublane tiles, so flattening a fetched block to rows is free);
- an item writes `q_tokens` output rows starting at its first token; rows past its last token belong to
  the next item or are padding. Items run in order (the grid axis is "arbitrary") and each waits for its
  output copy, so the next item overwrites them; padding rows are zeroed by the wrapper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.attention import tuning

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_ANY = getattr(pl, "ANY", None) or getattr(pltpu, "ANY", None)
_LANES = 128


def _interpret_arg(interpret: bool):
    """TPU kernels that use DMAs and semaphores need the TPU simulator in interpret mode."""
    if not interpret:
        return False
    params = getattr(pltpu, "InterpretParams", None)
    return params() if params is not None else True


def _compiler_params(**kwargs):
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------------
# KV write


def _write_kernel(layer_ref, page_ref, slot_ref, num_valid_ref, new_kv_hbm, kv_in_hbm, kv_out_hbm, sem,
                  *, tokens_per_step: int):
    del kv_in_hbm  # the same buffer as kv_out_hbm (aliased)
    start = pl.program_id(0) * tokens_per_step
    end = jnp.minimum(start + tokens_per_step, num_valid_ref[0])
    layer = layer_ref[0]

    def copy(t):
        return pltpu.make_async_copy(new_kv_hbm.at[t], kv_out_hbm.at[layer, page_ref[t], slot_ref[t]], sem.at[0])

    def issue(t, carry):
        copy(t).start()
        return carry

    def drain(t, carry):
        copy(t).wait()
        return carry

    lax.fori_loop(start, end, issue, 0)
    lax.fori_loop(start, end, drain, 0)


def write_kv_pages(kv_pages, layer, k, v, page, slot, num_valid, *, interpret: bool = False,
                   tokens_per_step: int = 256):
    """Write rows `t < num_valid` of k/v to `kv_pages[layer, page[t], slot[t]]`; returns the cache."""
    num_tokens, num_kv_heads, head_dim = k.shape
    new_kv = jnp.stack([k, v], axis=2).reshape(num_tokens, 2 * num_kv_heads, head_dim).astype(kv_pages.dtype)
    tokens_per_step = max(1, min(tokens_per_step, num_tokens))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    prefetch = (layer, page, slot, num_valid)
    return pl.pallas_call(
        functools.partial(_write_kernel, tokens_per_step=tokens_per_step),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(pl.cdiv(num_tokens, tokens_per_step),),
            in_specs=[pl.BlockSpec(memory_space=_ANY), pl.BlockSpec(memory_space=_ANY)],
            out_specs=pl.BlockSpec(memory_space=_ANY),
            scratch_shapes=[pltpu.SemaphoreType.DMA((1,))],
        ),
        out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
        input_output_aliases={len(prefetch) + 1: 0},
        compiler_params=_compiler_params(dimension_semantics=("arbitrary",)),
        interpret=_interpret_arg(interpret),
        name="kv_write_tpu",
    )(*prefetch, new_kv, kv_pages)


# ---------------------------------------------------------------------------------------------------
# Attention


def _stage_kv_rows(kv_block, kv_rows):
    """Copy a fetched block `[pages, page_size, 2 * kv_heads, head_dim]` into the flat 32-bit scratch
    `kv_rows`, so each head's K and V can be read with one strided load.

    float32: row `r` of `kv_rows` is cache row `r` (token `r // 2H`, combined head `r % 2H`).
    bfloat16: two cache rows share a 32-bit word (TPU packs pairs of rows into one sublane), so row `r`
    of `kv_rows` holds token `r // H`, head `r % H`: K in the low half of each word, V in the high half.
    """
    rows = kv_block.shape[0] * kv_block.shape[1] * kv_block.shape[2]
    flat = kv_block.reshape(rows, kv_block.shape[3])
    if flat.dtype != jnp.float32:
        flat = pltpu.bitcast(flat, jnp.uint32)
    kv_rows[...] = flat


def _load_kv_head(kv_rows, head: int, num_kv_heads: int, block_tokens: int, kv_len_mask, dtype):
    """K and V `[block_tokens, head_dim]` of one head from `kv_rows`, rows at positions >= kv_len zeroed
    (so whatever those slots hold, NaN included, cannot reach the result)."""
    if kv_rows.dtype == jnp.float32:
        stride = 2 * num_kv_heads
        k = kv_rows[pl.ds(2 * head, block_tokens, stride=stride), :]
        v = kv_rows[pl.ds(2 * head + 1, block_tokens, stride=stride), :]
    else:
        # Shifting a bfloat16 into the high half of a word gives the float32 of the same value.
        words = kv_rows[pl.ds(head, block_tokens, stride=num_kv_heads), :]
        k = pltpu.bitcast(words << 16, jnp.float32)
        v = pltpu.bitcast(words & jnp.uint32(0xFFFF0000), jnp.float32)
    k = jnp.where(kv_len_mask, k, 0.0).astype(dtype)
    v = jnp.where(kv_len_mask, v, 0.0).astype(dtype)
    return k, v


def _fold_heads(x, dtype):
    """`[tokens, group, head_dim]` -> `[tokens * group, head_dim]` (through float32 for packed types)."""
    tokens, group, head_dim = x.shape
    if jnp.dtype(dtype).itemsize < 4 and group % 2:
        return x.astype(jnp.float32).reshape(tokens * group, head_dim).astype(dtype)
    return x.reshape(tokens * group, head_dim)


def _attention_kernel(
    # scalar prefetch (SMEM)
    layer_ref, kv_lens_ref, page_indices_ref, cu_q_lens_ref, item_seq_ref, item_block_ref, num_items_ref,
    # inputs (HBM)
    q_hbm, kv_hbm,
    # output (HBM)
    o_hbm,
    # scratch
    q_vmem, o_vmem, kv_vmem, kv_rows, kv_sems, io_sems, m_ref, l_ref, acc_ref,
    *, sm_scale, sliding_window, soft_cap, pages_per_seq, q_tokens, block_pages, num_kv_heads, group,
):
    page_size = kv_vmem.shape[2]
    head_dim = q_vmem.shape[-1]
    block_tokens = block_pages * page_size
    rows = q_tokens * group
    dtype = q_vmem.dtype
    item = pl.program_id(0)

    @pl.when(item < num_items_ref[0])
    def _item():
        seq = item_seq_ref[item]
        first_row = cu_q_lens_ref[seq] + item_block_ref[item] * q_tokens
        q_len = cu_q_lens_ref[seq + 1] - cu_q_lens_ref[seq]
        kv_len = kv_lens_ref[seq]
        layer = layer_ref[0]
        num_rows = jnp.minimum(q_tokens, q_len - item_block_ref[item] * q_tokens)
        first_pos = kv_len - q_len + item_block_ref[item] * q_tokens
        last_pos = first_pos + num_rows - 1
        lowest_pos = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        first_block = lowest_pos // block_tokens
        end_block = last_pos // block_tokens + 1
        seq_pages = pl.cdiv(kv_len, page_size)

        q_copy = pltpu.make_async_copy(q_hbm.at[pl.ds(first_row, q_tokens)], q_vmem, io_sems.at[0])
        q_copy.start()

        def page_copy(block, buf, i, action):
            page_no = block * block_pages + i

            @pl.when(page_no < seq_pages)
            def _copy():
                page = page_indices_ref[seq * pages_per_seq + page_no]
                copy = pltpu.make_async_copy(kv_hbm.at[layer, page], kv_vmem.at[buf, i], kv_sems.at[buf])
                copy.start() if action == "start" else copy.wait()

        def page_copies(block, buf, action):
            for i in range(block_pages):
                page_copy(block, buf, i, action)

        page_copies(first_block, 0, "start")
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
        q_copy.wait()

        def kv_block(block, carry):
            buf = (block - first_block) % 2

            @pl.when(block + 1 < end_block)
            def _prefetch():
                page_copies(block + 1, 1 - buf, "start")

            page_copies(block, buf, "wait")
            _stage_kv_rows(kv_vmem[buf], kv_rows)
            kv_pos = block * block_tokens + lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0)
            row_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows, block_tokens), 0) // group
            col_pos = block * block_tokens + lax.broadcasted_iota(jnp.int32, (rows, block_tokens), 1)
            mask = (col_pos <= row_pos) & (col_pos < kv_len)
            if sliding_window is not None:
                mask = mask & (col_pos > row_pos - sliding_window)
            for head in range(num_kv_heads):
                k, v = _load_kv_head(kv_rows, head, num_kv_heads, block_tokens, kv_pos < kv_len, dtype)
                q = _fold_heads(q_vmem[:, head * group:(head + 1) * group, :], dtype)
                s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                s = s * sm_scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(mask, s, MASK_VALUE)
                m_prev = m_ref[head][:, :1]
                m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
                alpha = jnp.exp(m_prev - m_new)
                l_new = alpha * l_ref[head][:, :1] + jnp.sum(p, axis=1, keepdims=True)
                pv = lax.dot_general(p.astype(dtype), v, (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)
                acc_ref[head] = alpha * acc_ref[head] + pv
                m_ref[head] = jnp.broadcast_to(m_new, (rows, _LANES))
                l_ref[head] = jnp.broadcast_to(l_new, (rows, _LANES))
            return carry

        lax.fori_loop(first_block, end_block, kv_block, 0)

        for head in range(num_kv_heads):
            denom = l_ref[head][:, :1]
            out = acc_ref[head] / jnp.where(denom == 0.0, 1.0, denom)
            o_vmem[:, head * group:(head + 1) * group, :] = out.reshape(q_tokens, group, head_dim).astype(
                o_vmem.dtype
            )
        o_copy = pltpu.make_async_copy(o_vmem, o_hbm.at[pl.ds(first_row, q_tokens)], io_sems.at[1])
        o_copy.start()
        o_copy.wait()


def attention(q, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
              sliding_window=None, soft_cap=None, interpret: bool = False, q_tokens: int | None = None,
              block_pages: int | None = None, generation: str | None = None):
    """Attention of the new tokens over `kv_pages[layer]` (their own K/V already written)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, page_size, combined_heads, _ = kv_pages.shape
    num_kv_heads = combined_heads // 2
    group = num_q_heads // num_kv_heads
    max_seqs, pages_per_seq = page_indices.shape
    tuned_q, tuned_pages, vmem_limit = tuning.tpu_attention_blocks(
        num_tokens=num_tokens, max_seqs=max_seqs, page_size=page_size, pages_per_seq=pages_per_seq,
        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=kv_pages.dtype,
        generation=generation or ("v5e" if interpret else None),
    )
    q_tokens = q_tokens or tuned_q
    block_pages = block_pages or tuned_pages
    num_items = tuning.max_work_items(num_tokens, max_seqs, q_tokens)
    item_seq, item_block, num_live = tuning.query_block_schedule(
        cu_q_lens, num_seqs, q_tokens=q_tokens, num_items=num_items
    )
    prefetch = (
        jnp.asarray(layer, jnp.int32).reshape(1), kv_lens, page_indices.reshape(-1), cu_q_lens,
        item_seq, item_block, num_live,
    )
    # Room for the last item's full block of rows past the end of q.
    q_padded = jnp.pad(q.astype(kv_pages.dtype), ((0, q_tokens), (0, 0), (0, 0)))
    rows = q_tokens * group
    kernel = functools.partial(
        _attention_kernel, sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=None if soft_cap is None else float(soft_cap), pages_per_seq=pages_per_seq,
        q_tokens=q_tokens, block_pages=block_pages, num_kv_heads=num_kv_heads, group=group,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_items,),
            in_specs=[pl.BlockSpec(memory_space=_ANY), pl.BlockSpec(memory_space=_ANY)],
            out_specs=pl.BlockSpec(memory_space=_ANY),
            scratch_shapes=[
                pltpu.VMEM((q_tokens, num_q_heads, head_dim), kv_pages.dtype),  # q block
                pltpu.VMEM((q_tokens, num_q_heads, head_dim), q.dtype),  # output block
                pltpu.VMEM((2, block_pages, page_size, combined_heads, head_dim), kv_pages.dtype),
                pltpu.VMEM((block_pages * page_size * combined_heads * kv_pages.dtype.itemsize // 4, head_dim),
                           jnp.float32 if kv_pages.dtype == jnp.float32 else jnp.uint32),
                pltpu.SemaphoreType.DMA((2,)),  # one per KV buffer
                pltpu.SemaphoreType.DMA((2,)),  # query in, output out
                pltpu.VMEM((num_kv_heads, rows, _LANES), jnp.float32),  # running max
                pltpu.VMEM((num_kv_heads, rows, _LANES), jnp.float32),  # running denominator
                pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),  # running numerator
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((num_tokens + q_tokens, num_q_heads, head_dim), q.dtype),
        compiler_params=_compiler_params(dimension_semantics=("arbitrary",), vmem_limit_bytes=vmem_limit),
        interpret=_interpret_arg(interpret),
        name="ragged_paged_attention_tpu",
    )(*prefetch, q_padded, kv_pages)
    valid = jnp.arange(num_tokens) < tuning.active_cu_q_lens(cu_q_lens, num_seqs)[-1]
    return jnp.where(valid[:, None, None], out[:num_tokens], 0).astype(q.dtype)


def ragged_paged_attention(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, interpret: bool = False,
                           q_tokens: int | None = None, block_pages: int | None = None):
    """The TPU path of `kernels.attention.ragged_paged_attention`: write the new K/V, then attend."""
    page, slot, num_valid = tuning.token_write_slots(
        kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens=q.shape[0], page_size=kv_pages.shape[2]
    )
    kv_pages = write_kv_pages(kv_pages, layer, k, v, page, slot, num_valid, interpret=interpret)
    out = attention(q, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                    sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                    q_tokens=q_tokens, block_pages=block_pages)
    return out, kv_pages
