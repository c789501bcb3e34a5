"""Grouped matmul in plain JAX (`jax.lax.ragged_dot`): the reference for the Pallas kernels and the CPU path.

`lhs[m, k]` holds tokens sorted by expert, `group_sizes[G]` how many rows each expert owns (consecutive
row ranges, in order), `rhs[G, k, n]` the experts' weights. Row `i` of the result is
`lhs[i] @ rhs[g(i)]` for the group `g(i)` that owns it; rows past `sum(group_sizes)` are zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


class GroupedMatmulInputError(ValueError):
    """Shapes or dtypes that break the grouped-matmul contract; the message names the argument."""


def validate(lhs, rhs, group_sizes) -> None:
    """Raise `GroupedMatmulInputError` unless `lhs[m, k]`, `rhs[G, k, n]`, `group_sizes int32[G]` agree."""
    if lhs.ndim != 2:
        raise GroupedMatmulInputError(f"lhs must be [rows, k], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise GroupedMatmulInputError(f"rhs must be [groups, k, n], got shape {rhs.shape}")
    if rhs.shape[1] != lhs.shape[1]:
        raise GroupedMatmulInputError(f"contracting sizes differ: lhs k={lhs.shape[1]}, rhs k={rhs.shape[1]}")
    if group_sizes.shape != (rhs.shape[0],):
        raise GroupedMatmulInputError(
            f"group_sizes must have shape ({rhs.shape[0]},) (one per rhs group), got {group_sizes.shape}"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise GroupedMatmulInputError(f"group_sizes must be integers, got {group_sizes.dtype}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise GroupedMatmulInputError(f"{name} must be floating point, got {x.dtype}")


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None):
    """`out[m, n]` with `out[i] = lhs[i] @ rhs[g(i)]`; accumulates in float32, returns
    `preferred_element_type` (default: the lhs dtype)."""
    validate(lhs, rhs, group_sizes)
    out_dtype = preferred_element_type or lhs.dtype
    out = jax.lax.ragged_dot(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(out_dtype)
