"""MoE: the grouped-matmul Pallas kernels (interpret mode) against `jax.lax.ragged_dot` and a float64
oracle, and the routing helpers against dense numpy, on fresh random inputs each run.

Kernel outputs start as NaN in interpret mode (uninitialised buffers), so a row a kernel forgets to
write fails the comparison. Set KERNEL_TEST_SEED to replay a failing draw.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.moe import (
    GroupedMatmulInputError,
    combine,
    gpu,
    grouped_matmul,
    reference_grouped_matmul,
    resolve_backend,
    routing,
    select_experts,
    sort_by_expert,
    tpu,
)
from tests.conftest import replayable_seed, tpu_abstract_mesh

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}  # relative to the largest output magnitude


@pytest.fixture
def seed():
    return replayable_seed("KERNEL_TEST_SEED")


def random_group_sizes(rng, num_groups: int, num_rows: int) -> np.ndarray:
    """Sizes summing to at most `num_rows`, with some empty groups and usually some tail rows."""
    cuts = np.sort(rng.integers(0, num_rows + 1, size=num_groups))
    sizes = np.diff(np.concatenate([[0], cuts])).astype(np.int32)
    sizes[rng.random(num_groups) < 0.3] = 0
    return sizes


def oracle(lhs, rhs, group_sizes):
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    begin = 0
    for g, size in enumerate(group_sizes):
        out[begin:begin + size] = lhs[begin:begin + size] @ rhs[g]
        begin += size
    return out


def draw(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)


# (rows, k, n, groups, dtype, TPU tiles (rows, k, n), GPU blocks (rows, k, n, warps, stages))
CASES = [
    (37, 256, 256, 4, jnp.float32, (16, 128, 128), (16, 64, 128, 4, 2)),
    (64, 128, 384, 5, jnp.bfloat16, (32, 128, 128), (32, 32, 64, 4, 2)),
    (9, 128, 128, 1, jnp.float32, (16, 128, 128), (16, 128, 128, 4, 1)),
]


@pytest.mark.parametrize("rows,k,n,groups,dtype,tpu_tiles,gpu_blocks", CASES)
def test_grouped_matmul_kernels_match_ragged_dot(rows, k, n, groups, dtype, tpu_tiles, gpu_blocks, seed):
    rng = np.random.default_rng(seed)
    lhs, rhs = draw(rng, (rows, k), dtype), draw(rng, (groups, k, n), dtype)
    sizes = random_group_sizes(rng, groups, rows)
    group_sizes = jnp.asarray(sizes)
    expected = oracle(np.asarray(lhs.astype(jnp.float32)), np.asarray(rhs.astype(jnp.float32)), sizes)
    scale = max(np.abs(expected).max(), 1.0)
    tol = TOLERANCE[dtype] * scale
    ref = np.asarray(reference_grouped_matmul(lhs, rhs, group_sizes).astype(jnp.float32))
    assert np.abs(ref - expected).max() <= tol, f"ragged_dot vs oracle, seed={seed}"
    for name, fn in (
        ("tpu", functools.partial(tpu.grouped_matmul, tiles=tpu_tiles)),
        ("gpu", functools.partial(gpu.grouped_matmul, blocks=gpu_blocks)),
    ):
        out = jax.jit(functools.partial(fn, interpret=True))(lhs, rhs, group_sizes)
        assert out.shape == (rows, n) and out.dtype == dtype
        out = np.asarray(out.astype(jnp.float32))
        assert np.isfinite(out).all(), f"{name}: unwritten or non-finite rows, sizes={sizes} seed={seed}"
        assert (out[sizes.sum():] == 0).all(), f"{name}: rows past the groups not zero, seed={seed}"
        err = np.abs(out - ref).max()
        assert err <= tol, f"{name}: off by {err} (tol {tol}), sizes={sizes} seed={seed}"


def test_grouped_matmul_entry_and_edge_groups(seed):
    """Through the public entry (tuned tiles): all rows in the last group, then no rows in any group."""
    rng = np.random.default_rng(seed)
    lhs, rhs = draw(rng, (24, 128), jnp.float32), draw(rng, (3, 128, 128), jnp.float32)
    for sizes in (np.array([0, 0, 24], np.int32), np.array([0, 0, 0], np.int32)):
        expected = oracle(np.asarray(lhs), np.asarray(rhs), sizes)
        for backend in ("pallas_tpu", "pallas_gpu", "reference"):
            out = jax.jit(functools.partial(grouped_matmul, backend=backend))(lhs, rhs, jnp.asarray(sizes))
            err = np.abs(np.asarray(out) - expected).max()
            assert err <= 1e-3, f"{backend}: off by {err}, sizes={sizes} seed={seed}"


def test_tile_schedule_partitions_rows(seed):
    rng = np.random.default_rng(seed)
    rows, tile = int(rng.integers(1, 100)), int(rng.choice([8, 16, 32]))
    sizes = random_group_sizes(rng, int(rng.integers(1, 9)), rows)
    sched = routing.group_tile_schedule(jnp.asarray(sizes), rows, tile)
    owner = np.full(rows, -2)
    ends = np.cumsum(sizes)
    for w in range(int(sched.num_items[0])):
        begin, end, t = int(sched.row_begin[w]), int(sched.row_end[w]), int(sched.tile[w])
        assert t * tile <= begin <= end <= (t + 1) * tile
        assert (owner[begin:end] == -2).all(), "a row is written by two items"
        owner[begin:end] = -1 if sched.zero[w] else int(sched.group[w])
    expected = np.where(np.arange(rows) < ends[-1], np.searchsorted(ends, np.arange(rows), side="right"), -1)
    np.testing.assert_array_equal(owner, expected, err_msg=f"sizes={sizes} seed={seed}")
    tiles = np.asarray(sched.tile[: int(sched.num_items[0])])
    assert (np.diff(tiles) >= 0).all(), "items must ascend by tile"


@pytest.mark.parametrize("renormalize", [False, True])
def test_select_experts(renormalize, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((11, 8)).astype(np.float32)
    weights, experts = select_experts(jnp.asarray(logits, jnp.bfloat16), 3, renormalize=renormalize)
    bf16_logits = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    ranked = np.argsort(-bf16_logits, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(np.asarray(experts), ranked)
    picked = np.take_along_axis(np.exp(bf16_logits - bf16_logits.max(-1, keepdims=True)), ranked, -1)
    picked /= (picked.sum(-1, keepdims=True) if renormalize else
               np.exp(bf16_logits - bf16_logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    assert weights.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(weights), picked, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        select_experts(jnp.asarray(logits), 9, renormalize=renormalize)


@pytest.mark.parametrize("backend", ["reference", "pallas_gpu"])
def test_moe_layer_matches_dense(backend, seed):
    """route -> sort -> grouped matmul -> combine equals the dense per-token mixture; padding tokens
    are left out of every group and come back as zeros."""
    rng = np.random.default_rng(seed)
    tokens, hidden, out_dim, experts, top_k = 13, 128, 128, 6, 2
    x = draw(rng, (tokens, hidden), jnp.float32)
    w = draw(rng, (experts, hidden, out_dim), jnp.float32)
    logits = draw(rng, (tokens, experts), jnp.float32)
    valid = np.ones(tokens, bool)
    valid[-3:] = False
    weights, expert_ids = select_experts(logits, top_k, renormalize=True)
    plan = sort_by_expert(expert_ids, experts, token_mask=jnp.asarray(valid))
    assert int(plan.group_sizes.sum()) == top_k * valid.sum()
    y_sorted = grouped_matmul(x[plan.token_of_row], w, plan.group_sizes, backend=backend)
    out = np.asarray(combine(y_sorted, plan, weights))
    xs, ws, ids, wts = (np.asarray(a, np.float64) for a in (x, w, expert_ids, weights))
    dense = np.zeros((tokens, out_dim))
    for t in np.flatnonzero(valid):
        for j in range(top_k):
            dense[t] += wts[t, j] * (xs[t] @ ws[int(ids[t, j])])
    assert np.abs(out - dense).max() <= 1e-3 * max(np.abs(dense).max(), 1.0), f"seed={seed}"
    assert (out[~valid] == 0).all()


def test_backend_resolution_and_validation():
    assert resolve_backend("auto", dtype=jnp.bfloat16, platform="cpu") == ("reference", False)
    assert resolve_backend("auto", dtype=jnp.bfloat16, platform="tpu") == ("tpu", False)
    assert resolve_backend("auto", dtype=jnp.bfloat16, platform="gpu") == ("gpu", False)
    assert resolve_backend("pallas", dtype=jnp.float32, platform="cpu") == ("gpu", True)
    assert resolve_backend("pallas_tpu", dtype=jnp.float32, platform="cpu") == ("tpu", True)
    assert resolve_backend("pallas", dtype=jnp.float16, platform="gpu") == ("reference", False)
    with pytest.raises(GroupedMatmulInputError):
        resolve_backend("megablox", dtype=jnp.float32, platform="cpu")
    lhs, rhs = jnp.zeros((4, 8)), jnp.zeros((2, 8, 3))
    for bad in ((jnp.zeros((4, 7)), rhs, jnp.zeros((2,), jnp.int32)),
                (lhs, rhs, jnp.zeros((3,), jnp.int32)),
                (lhs, rhs, jnp.zeros((2,), jnp.float32))):
        with pytest.raises(GroupedMatmulInputError):
            grouped_matmul(*bad, backend="reference")


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_their_platform(platform):
    """The Pallas -> Triton / Mosaic lowering (not the final compile) runs on this CPU machine."""
    shapes = (jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((8, 1024, 768), jnp.bfloat16),
              jax.ShapeDtypeStruct((8,), jnp.int32))
    if platform == "cuda":
        fn, context = jax.jit(functools.partial(gpu.grouped_matmul, blocks=(64, 64, 128, 4, 3))), \
            contextlib.nullcontext()
    else:
        fn = jax.jit(functools.partial(tpu.grouped_matmul, tiles=(128, 512, 256)))
        context = tpu_abstract_mesh()
    with context:
        text = fn.trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert ("__gpu$xla.gpu.triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
