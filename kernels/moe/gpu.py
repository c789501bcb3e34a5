"""Grouped matmul for NVIDIA GPUs: a Pallas kernel through the Triton lowering.

Grid `(work items, n blocks)`. A work item is one (group, row tile) overlap from
`routing.group_tile_schedule` (passed as ordinary arrays: Triton has no scalar prefetch). A program
loads its row tile and its group's weight block in k steps (masked at the edges), accumulates in
float32 and stores only the rows the item owns, so the two programs of a tile that straddles a group
boundary write disjoint rows. Items for the rows past the last group store zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.moe.routing import group_tile_schedule

try:
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - depends on the installed jax
    pltriton = None

# (rows, k, n, warps, stages) per compute capability.
_BLOCKS = {
    "8.0": (64, 32, 128, 4, 3),
    "8.6": (64, 32, 64, 4, 2),
    "8.9": (64, 32, 64, 4, 2),
    "9.0": (64, 64, 128, 4, 3),
    "10.0": (64, 64, 128, 4, 3),
}


def blocks_for(m: int, k: int, n: int, capability: str | None = None):
    from kernels.attention.tuning import gpu_capability

    bm, bk, bn, warps, stages = _BLOCKS.get(capability or gpu_capability(), _BLOCKS["9.0"])

    def fit(dim, preferred):  # powers of two, at least 16 (the smallest tensor-core tile)
        return max(16, min(preferred, 1 << max(dim - 1, 0).bit_length()))

    return fit(m, bm), fit(k, bk), fit(n, bn), warps, stages


def _gmm_kernel(group_ref, tile_ref, begin_ref, end_ref, zero_ref, lhs_ref, rhs_ref, out_ref, *,
                block_rows, block_k, block_n):
    m, k = lhs_ref.shape
    n = out_ref.shape[1]
    item, n_block = pl.program_id(0), pl.program_id(1)
    row_begin, row_end = begin_ref[item], end_ref[item]

    @pl.when(row_end > row_begin)
    def _item():
        group, tile = group_ref[item], tile_ref[item]
        rows = tile * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
        mine = (rows >= row_begin) & (rows < row_end)
        cols = n_block * block_n + jnp.arange(block_n, dtype=jnp.int32)
        col_ok = cols < n

        def k_step(step, acc):
            ks = step * block_k + jnp.arange(block_k, dtype=jnp.int32)
            k_ok = ks < k
            a = pltriton.load(lhs_ref.at[pl.ds(tile * block_rows, block_rows), pl.ds(step * block_k, block_k)],
                              mask=mine[:, None] & k_ok[None, :], other=0)
            b = pltriton.load(rhs_ref.at[group, pl.ds(step * block_k, block_k), pl.ds(n_block * block_n, block_n)],
                              mask=k_ok[:, None] & col_ok[None, :], other=0)
            return acc + lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        steps = jnp.where(zero_ref[item] == 0, pl.cdiv(k, block_k), 0)
        acc = lax.fori_loop(0, steps, k_step, jnp.zeros((block_rows, block_n), jnp.float32))
        pltriton.store(out_ref.at[pl.ds(tile * block_rows, block_rows), pl.ds(n_block * block_n, block_n)],
                       acc.astype(out_ref.dtype), mask=mine[:, None] & col_ok[None, :])


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret: bool = False,
                   blocks: tuple[int, int, int, int, int] | None = None):
    m, k = lhs.shape
    n = rhs.shape[2]
    out_dtype = preferred_element_type or lhs.dtype
    bm, bk, bn, warps, stages = blocks or blocks_for(m, k, n, capability="9.0" if interpret else None)
    sched = group_tile_schedule(group_sizes, m, bm)
    num_items = sched.group.shape[0]
    return pl.pallas_call(
        functools.partial(_gmm_kernel, block_rows=bm, block_k=bk, block_n=bn),
        grid=(num_items, pl.cdiv(n, bn)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="grouped_matmul_gpu",
    )(sched.group, sched.tile, sched.row_begin, sched.row_end, sched.zero, lhs, rhs.astype(lhs.dtype))
