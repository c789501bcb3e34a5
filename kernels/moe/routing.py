"""Routing helpers around the grouped matmul: pick experts, sort token copies by expert, combine back.

The flow for one MoE layer (Qwen2-MoE / Qwen3-MoE):

    weights, experts = select_experts(router_logits, top_k, renormalize=config.norm_topk_prob)
    plan = sort_by_expert(experts, num_experts, token_mask=valid)
    x_sorted = x[plan.token_of_row]                      # [tokens * top_k, hidden]
    h = grouped_matmul(x_sorted, w_in, plan.group_sizes)  # ... activation, second grouped_matmul ...
    out = combine(y_sorted, plan, weights)               # [tokens, hidden]

Also here: `group_tile_schedule`, the row tiling of sorted tokens that both Pallas kernels walk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def select_experts(router_logits, top_k: int, *, renormalize: bool):
    """Softmax over all experts in float32, keep the `top_k` largest; `renormalize` rescales the kept
    weights to sum to one (Qwen3-MoE and `norm_topk_prob=True`; Qwen2-MoE defaults to False).

    Returns `(weights float32[T, top_k], expert_ids int32[T, top_k])`, largest weight first.
    """
    num_experts = router_logits.shape[-1]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, expert_ids.astype(jnp.int32)


class SortPlan(NamedTuple):
    """Where each (token, choice) pair goes in the expert-sorted rows."""

    order: jax.Array  # int32[T * top_k]: sorted row r holds flat pair order[r] (pair = token * top_k + choice)
    token_of_row: jax.Array  # int32[T * top_k]: the token each sorted row copies
    group_sizes: jax.Array  # int32[num_experts]: rows per expert; masked tokens' rows come last, uncounted


def sort_by_expert(expert_ids, num_experts: int, *, token_mask=None) -> SortPlan:
    """Stable sort of the `[T, top_k]` assignments by expert. Tokens where `token_mask` is False
    (padding) sort after every expert's rows and are not counted in `group_sizes`, so the grouped matmul
    gives them zeros and does no work for them."""
    num_tokens, top_k = expert_ids.shape
    keys = expert_ids.reshape(-1).astype(jnp.int32)
    if token_mask is not None:
        keys = jnp.where(jnp.repeat(token_mask, top_k), keys, num_experts)
    order = jnp.argsort(keys, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(keys, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    return SortPlan(order, order // top_k, group_sizes)


def combine(y_sorted, plan: SortPlan, weights):
    """Unsort the expert outputs `[T * top_k, H]` and sum each token's copies weighted by `weights[T, k]`."""
    num_tokens, top_k = weights.shape
    inverse = jnp.argsort(plan.order).astype(jnp.int32)
    y = y_sorted[inverse].reshape(num_tokens, top_k, -1)
    out = jnp.einsum("tkh,tk->th", y.astype(jnp.float32), weights.astype(jnp.float32))
    return out.astype(y_sorted.dtype)


class TileSchedule(NamedTuple):
    """Work items of a grouped matmul over row tiles: one per (group, tile) overlap, plus one per tile
    of the rows past the last group (which are set to zero). Items ascend by tile."""

    group: jax.Array  # int32[W]: the rhs group (for zero items: the last group; unused)
    tile: jax.Array  # int32[W]: the row tile
    row_begin: jax.Array  # int32[W]: first row this item writes
    row_end: jax.Array  # int32[W]: one past the last row it writes (== row_begin for dead items)
    zero: jax.Array  # int32[W]: 1 if the item writes zeros (rows past the groups, or a dead item)
    num_items: jax.Array  # int32[1]: live items


def max_tile_items(num_rows: int, num_groups: int, tile_rows: int) -> int:
    """Static bound: every tile once, plus one extra item per group boundary inside a tile."""
    return -(-num_rows // tile_rows) + num_groups


def group_tile_schedule(group_sizes, num_rows: int, tile_rows: int) -> TileSchedule:
    """Cut rows `[0, num_rows)` into tiles of `tile_rows` and list each tile's overlap with each group
    (groups are consecutive row ranges in order) and with the tail past the groups. Items past
    `num_items` repeat the last live item's group and tile and write nothing."""
    num_groups = group_sizes.shape[0]
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
    seg_begin = jnp.concatenate([starts, ends[-1:]])
    seg_end = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
    first_tile = seg_begin // tile_rows
    count = jnp.where(seg_end > seg_begin, (seg_end + tile_rows - 1) // tile_rows - first_tile, 0)
    cum = jnp.cumsum(count).astype(jnp.int32)
    total = cum[-1]
    num_items = max_tile_items(num_rows, num_groups, tile_rows)
    w = jnp.arange(num_items, dtype=jnp.int32)
    live = w < total
    w_live = jnp.minimum(w, total - 1)
    seg = jnp.minimum(jnp.searchsorted(cum, w_live, side="right"), num_groups).astype(jnp.int32)
    tile = first_tile[seg] + w_live - (cum[seg] - count[seg])
    row_begin = jnp.maximum(seg_begin[seg], tile * tile_rows)
    row_end = jnp.where(live, jnp.minimum(seg_end[seg], (tile + 1) * tile_rows), row_begin)
    zero = ((seg == num_groups) | ~live).astype(jnp.int32)
    group = jnp.minimum(seg, num_groups - 1)
    return TileSchedule(group, tile.astype(jnp.int32), row_begin.astype(jnp.int32),
                        row_end.astype(jnp.int32), zero, total.reshape(1))
