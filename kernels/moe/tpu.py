"""Grouped matmul for TPU (Mosaic): `lhs[m, k] x rhs[G, k, n]` over tokens sorted by expert.

Grid `(n tiles, work items, k tiles)`. A work item is one (group, row tile) overlap from
`routing.group_tile_schedule`, scalar-prefetched; the BlockSpec index maps read it to fetch the item's
lhs tile and its group's weight tile, so the pipeline double-buffers both. The k axis accumulates in a
float32 VMEM scratch; on the last k step the rows of the tile that belong to the item are written
(a masked select against what the tile already holds).

Invariant: items ascend by row tile, so all items of one tile are consecutive and the output tile stays
in VMEM across them (it is written back once, when the tile changes). Every row of a tile belongs to
exactly one item (a group, or the zero tail past the groups), so the tile is complete when it leaves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.moe.routing import group_tile_schedule

# (row tile, k tile, n tile) per TPU generation: MXU-sized (128 on v4/v5e, 256 on v6e/v7) multiples.
_TILES = {
    "v4": (128, 512, 512),
    "v5e": (128, 512, 512),
    "v5p": (256, 512, 512),
    "v6e": (256, 512, 1024),
    "v7": (256, 512, 1024),
}


def _compiler_params(**kwargs):
    cls = getattr(pltpu, "CompilerParams", None) or pltpu.TPUCompilerParams
    return cls(**kwargs)


def _fit(dim: int, preferred: int, align: int) -> int:
    """The largest multiple of `align` that divides `dim` and is at most `preferred`, else `dim` itself
    (a block spanning a whole dimension is always legal)."""
    size = (min(preferred, dim) // align) * align
    while size >= align:
        if dim % size == 0:
            return size
        size -= align
    return dim


def tiles_for(m: int, k: int, n: int, dtype, generation: str | None = None) -> tuple[int, int, int]:
    from kernels.attention.tuning import tpu_generation

    tm, tk, tn = _TILES.get(generation or tpu_generation(), _TILES["v5e"])
    sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)
    tm = min(tm, max(sublanes, -(-m // sublanes) * sublanes))
    # k must divide exactly: a padded k block would add garbage into every output element.
    return tm, _fit(k, tk, 128), _fit(n, tn, 128) if n % 128 == 0 else n


def _gmm_kernel(group_ref, tile_ref, begin_ref, end_ref, zero_ref, num_items_ref, lhs_ref, rhs_ref, out_ref,
                acc_ref, *, tile_rows: int):
    del group_ref, num_items_ref  # used by the index maps
    item, k_step = pl.program_id(1), pl.program_id(2)

    @pl.when(k_step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(zero_ref[item] == 0)
    def _accumulate():
        acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=jnp.float32)

    @pl.when(k_step == pl.num_programs(2) - 1)
    def _write():
        rows = tile_ref[item] * tile_rows + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = (rows >= begin_ref[item]) & (rows < end_ref[item])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret: bool = False,
                   tiles: tuple[int, int, int] | None = None):
    m, k = lhs.shape
    num_groups, _, n = rhs.shape
    out_dtype = preferred_element_type or lhs.dtype
    tm, tk, tn = tiles or tiles_for(m, k, n, lhs.dtype, generation="v5e" if interpret else None)
    sched = group_tile_schedule(group_sizes, m, tm)
    num_items = sched.group.shape[0]
    prefetch = (sched.group, sched.tile, sched.row_begin, sched.row_end, sched.zero, sched.num_items)

    def lhs_map(j, w, kk, group, tile, *_):
        return tile[w], kk

    def rhs_map(j, w, kk, group, *_):
        return group[w], kk, j

    def out_map(j, w, kk, group, tile, *_):
        return tile[w], j

    return pl.pallas_call(
        functools.partial(_gmm_kernel, tile_rows=tm),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(pl.cdiv(n, tn), num_items, k // tk),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((None, tk, tn), rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=_compiler_params(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        name="grouped_matmul_tpu",
    )(*prefetch, lhs, rhs.astype(lhs.dtype))
