"""Input validation shared by the reference and the kernels.

`static_validate` checks what is known at trace time (ranks, shapes, dtypes, static options) and runs on
every call, under `jit` too. `dynamic_validate` checks the metadata values (lengths, page indices, the
slots written) on concrete arrays; it is for tests, debugging and the GPU check, never the hot path.
`kernel_supports` says whether the Pallas kernels take a configuration, so the dispatch can fall back
to the reference instead of failing.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

KERNEL_HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class AttentionInputError(ValueError):
    """Inputs that break the contract in docs/architecture.md; the message names the argument."""


def _shape(x) -> tuple[int, ...]:
    # `.shape` first: np.shape would try to convert a tracer to an array under jit.
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x):
    return jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def static_validate(
    q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
    *, sm_scale, sliding_window=None, soft_cap=None,
) -> None:
    """Raise `AttentionInputError` unless shapes, dtypes and static options follow the contract."""
    if len(_shape(q)) != 3:
        raise AttentionInputError(f"q must be [tokens, q_heads, head_dim], got shape {_shape(q)}")
    num_tokens, num_q_heads, head_dim = _shape(q)
    if len(_shape(kv_pages)) != 5:
        raise AttentionInputError(
            f"kv_pages must be [layers, pages, page_size, 2 * kv_heads, head_dim], got {_shape(kv_pages)}"
        )
    _, _, _, combined_heads, kv_head_dim = _shape(kv_pages)
    if combined_heads % 2:
        raise AttentionInputError(f"kv_pages axis 3 holds K and V interleaved, so it must be even: {combined_heads}")
    num_kv_heads = combined_heads // 2
    if kv_head_dim != head_dim:
        raise AttentionInputError(f"head_dim of q ({head_dim}) and kv_pages ({kv_head_dim}) differ")
    for name, x in (("k", k), ("v", v)):
        if _shape(x) != (num_tokens, num_kv_heads, head_dim):
            raise AttentionInputError(
                f"{name} must be [tokens, kv_heads, head_dim] = {(num_tokens, num_kv_heads, head_dim)}, "
                f"got {_shape(x)}"
            )
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise AttentionInputError(f"q heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_pages", kv_pages)):
        if not jnp.issubdtype(_dtype(x), jnp.floating):
            raise AttentionInputError(f"{name} must be floating point, got {_dtype(x)}")
    if _dtype(k) != _dtype(v):
        raise AttentionInputError(f"k and v must share a dtype, got {_dtype(k)} and {_dtype(v)}")
    if len(_shape(page_indices)) != 2:
        raise AttentionInputError(f"page_indices must be [seqs, pages_per_seq], got {_shape(page_indices)}")
    max_seqs = _shape(page_indices)[0]
    for name, x, shape in (
        ("kv_lens", kv_lens, (max_seqs,)),
        ("cu_q_lens", cu_q_lens, (max_seqs + 1,)),
        ("num_seqs", num_seqs, (1,)),
    ):
        if _shape(x) != shape:
            raise AttentionInputError(f"{name} must have shape {shape} (seqs = {max_seqs}), got {_shape(x)}")
    for name, x in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens),
                    ("num_seqs", num_seqs)):
        if _dtype(x) != jnp.int32:
            raise AttentionInputError(f"{name} must be int32, got {_dtype(x)}")
    if _shape(layer) not in ((), (1,)) or not jnp.issubdtype(_dtype(layer), jnp.integer):
        raise AttentionInputError(f"layer must be an integer scalar, got shape {_shape(layer)} {_dtype(layer)}")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)) or not (
        math.isfinite(sm_scale) and sm_scale > 0
    ):
        raise AttentionInputError(f"sm_scale must be a positive finite Python number, got {sm_scale!r}")
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window <= 0
    ):
        raise AttentionInputError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if soft_cap is not None and (
        isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float))
        or not (math.isfinite(soft_cap) and soft_cap > 0)
    ):
        raise AttentionInputError(f"soft_cap must be a positive finite number or None, got {soft_cap!r}")


def dynamic_validate(
    q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
    *, sm_scale, sliding_window=None, soft_cap=None,
) -> None:
    """`static_validate`, then the metadata values; needs concrete arrays (not tracers)."""
    static_validate(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens = _shape(q)[0]
    num_layers, num_pages, page_size = _shape(kv_pages)[:3]
    kv_lens, page_indices, cu_q_lens = (np.asarray(x) for x in (kv_lens, page_indices, cu_q_lens))
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    layer = int(np.asarray(layer).reshape(-1)[0])
    max_seqs, pages_per_seq = page_indices.shape
    if not 0 <= layer < num_layers:
        raise AttentionInputError(f"layer {layer} is outside [0, {num_layers})")
    if not 0 <= n <= max_seqs:
        raise AttentionInputError(f"num_seqs {n} is outside [0, {max_seqs}]")
    cu = cu_q_lens[: n + 1]
    if cu[0] != 0:
        raise AttentionInputError(f"cu_q_lens[0] must be 0, got {cu[0]}")
    if np.any(np.diff(cu) < 0):
        raise AttentionInputError(f"cu_q_lens must not decrease over the live sequences: {cu.tolist()}")
    if cu[-1] > num_tokens:
        raise AttentionInputError(f"cu_q_lens[num_seqs] = {cu[-1]} exceeds the {num_tokens} query rows")
    written: dict[tuple[int, int], int] = {}
    for s in range(n):
        q_len, kv_len = int(cu[s + 1] - cu[s]), int(kv_lens[s])
        if not q_len <= kv_len <= pages_per_seq * page_size:
            raise AttentionInputError(
                f"sequence {s}: need new tokens ({q_len}) <= kv_len ({kv_len}) <= "
                f"pages_per_seq * page_size ({pages_per_seq * page_size})"
            )
        used = page_indices[s, : -(-kv_len // page_size)]
        if np.any((used < 0) | (used >= num_pages)):
            raise AttentionInputError(f"sequence {s}: page indices {used.tolist()} outside [0, {num_pages})")
        for pos in range(kv_len - q_len, kv_len):
            key = (int(page_indices[s, pos // page_size]), pos % page_size)
            if key in written:
                raise AttentionInputError(
                    f"sequence {s} position {pos} writes page {key[0]} slot {key[1]}, "
                    f"already written by sequence {written[key]}"
                )
            written[key] = s


def kernel_supports(*, head_dim: int, page_size: int, num_kv_heads: int, dtype, platform: str) -> str | None:
    """None if the Pallas kernel for `platform` ('tpu', 'gpu' or 'interpret') takes this configuration,
    else the reason it does not (the dispatch then runs the reference).

    The TPU kernel flattens a fetched block `[pages, page_size, 2 * kv_heads, head_dim]` to rows; that is
    free only when both page_size and 2 * kv_heads fill whole sublane tiles (8 rows of float32, 16 of
    bfloat16), so other shapes stay on the reference there rather than risk a relayout or a Mosaic
    rejection. Interpret mode takes any shape.
    """
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} (kernels take {KERNEL_HEAD_DIMS})"
    if jnp.dtype(dtype) not in KERNEL_DTYPES:
        return f"dtype {jnp.dtype(dtype)} (kernels take float32 and bfloat16)"
    if platform == "gpu" and page_size & (page_size - 1):
        return f"page_size {page_size} (the GPU kernel needs a power of two)"
    if platform == "tpu":
        tile_rows = 8 * 4 // jnp.dtype(dtype).itemsize
        if page_size % tile_rows or (2 * num_kv_heads) % tile_rows:
            return (f"page_size {page_size} with {num_kv_heads} KV heads (the TPU kernel needs page_size and "
                    f"2 * kv_heads in whole {tile_rows}-row {jnp.dtype(dtype)} sublane tiles)")
    return None
