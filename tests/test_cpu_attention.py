"""The native CPU attention kernel (`kernels/attention/cpu_attention.cc`) against the float64 oracle and the
jnp reference, on fresh random inputs each run (KERNEL_TEST_SEED replays), with the NaN-poisoned caches
and garbage page-table entries of tests/test_attention_kernels.py."""

from __future__ import annotations

import functools
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import cpu, ragged_paged_attention, resolve_backend
from kernels.attention.reference import attend
from tests.test_attention_kernels import TOLERANCE, check, make_case, random_lens, rng  # noqa: F401

BUILDABLE = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64") and any(
    shutil.which(c) for c in ("c++", "g++", "clang++"))


def test_kernel_builds_where_a_compiler_is():
    """No silent fallback on the machines we serve from: with a compiler here the kernel must build."""
    if not BUILDABLE:
        pytest.skip("no C++ compiler / unsupported platform: the reference serves instead")
    assert cpu.available(), cpu._load()
    assert resolve_backend("auto", head_dim=64, page_size=16, dtype=jnp.float32, platform="cpu") == ("cpu", False)
    assert resolve_backend("cpu", head_dim=96, page_size=4, dtype=jnp.float32, platform="cpu") == ("cpu", False)


def test_backend_resolution_falls_back_with_a_reason():
    assert resolve_backend("auto", head_dim=64, page_size=16, dtype=jnp.float16, platform="cpu") == (
        "reference", False)
    assert resolve_backend("reference", head_dim=64, page_size=16, dtype=jnp.float32, platform="cpu") == (
        "reference", False)
    assert cpu.unsupported_reason(page_size=16, dtype=jnp.float16, platform="cpu") == (
        "it takes a float32 or bfloat16 KV cache, not float16")
    assert "not tpu" in cpu.unsupported_reason(page_size=16, dtype=jnp.float32, platform="tpu")


needs_kernel = pytest.mark.skipif(not BUILDABLE, reason="the CPU kernel needs a C++ compiler on Linux")

# (kinds of sequences, kv heads, group, head_dim, page_size, dtype, options)
CASES = [
    (["decode", "prefill", "chunk", "aligned", "aligned_end"], 3, 3, 64, 16, jnp.float32, {}),
    (["decode"] * 5, 2, 4, 128, 8, jnp.float32, {}),
    (["prefill", "chunk"], 1, 1, 32, 4, jnp.float32, dict(sliding_window=5, soft_cap=3.0)),
    (["chunk", "decode", "aligned"], 2, 2, 64, 32, jnp.float32, dict(sliding_window=21)),
    (["prefill"], 1, 8, 96, 4, jnp.float32, dict(soft_cap=20.0)),
    (["decode", "chunk", "aligned_end"], 3, 3, 64, 16, jnp.bfloat16, {}),
    (["prefill", "decode"], 2, 2, 128, 8, jnp.bfloat16, dict(sliding_window=9)),
]


@needs_kernel
@pytest.mark.parametrize("kinds,kv_heads,group,head_dim,page_size,dtype,options", CASES)
def test_kernel_matches_the_oracle(rng, kinds, kv_heads, group, head_dim, page_size, dtype, options):  # noqa: F811
    """Through the entry (`backend="cpu"`: the kernel reads a token-major cache; the entry writes it)."""
    lens = random_lens(rng, page_size, kinds)
    # Long enough that a query block (16 tokens) and several pages are crossed.
    lens = [(cached * 3, new * 2 if new > 1 else new) for cached, new in lens]
    num_tokens = sum(n for _, n in lens) + 3
    pages_per_seq = max(-(-(c + n) // page_size) for c, n in lens) + 2
    case = make_case(rng, lens, max_seqs=len(lens) + 2, num_tokens=num_tokens, num_kv_heads=kv_heads, group=group,
                     head_dim=head_dim, page_size=page_size, pages_per_seq=pages_per_seq,
                     num_pages=pages_per_seq * (len(lens) + 1), dtype=dtype)
    options = dict(sm_scale=float(head_dim) ** -0.5, **options)
    out, cache = jax.jit(functools.partial(ragged_paged_attention, backend="cpu", **options))(*case.args())
    f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
    expected = check(case, f32(out), f32(cache), **options, what="cpu kernel")
    # The read-only, head-major entry the CPU serving path uses, against the jnp reference's.
    clean = case.clean_args()
    head_major = clean[3].transpose(0, 1, 3, 2, 4)
    args = (*clean[:3], head_major, *clean[4:])
    got = f32(jax.jit(functools.partial(cpu.attend, **options))(*args))
    want = f32(jax.jit(functools.partial(attend, **options))(*args))
    tol = TOLERANCE[dtype]
    assert np.abs(got - want).max() <= tol, f"seed={case.seed}"
    assert np.abs(got - expected).max() <= tol, f"seed={case.seed}"


@needs_kernel
def test_kernel_under_a_layer_scan_and_padding(rng):  # noqa: F811
    """The layer index comes in traced (the model's scan); padding sequences and tokens read nothing."""
    page_size = 8
    lens = random_lens(rng, page_size, ["decode", "chunk"])
    num_tokens = sum(n for _, n in lens) + 5
    case = make_case(rng, lens, max_seqs=4, num_tokens=num_tokens, num_kv_heads=2, group=2, head_dim=64,
                     page_size=page_size, pages_per_seq=8, num_pages=20, dtype=jnp.float32, num_layers=3)
    q, k, v, cache, _, kv_lens, pages, cu, num_seqs = case.clean_args()
    cache = cache.transpose(0, 1, 3, 2, 4)
    options = dict(sm_scale=0.125)

    def per_layer(read):
        def body(_, layer):
            return None, read(q, k, v, cache, layer, kv_lens, pages, cu, num_seqs, **options)
        return jax.jit(lambda: jax.lax.scan(body, None, jnp.arange(3, dtype=jnp.int32))[1])()

    got, want = per_layer(cpu.attend), per_layer(attend)
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOLERANCE[jnp.float32], f"seed={case.seed}"
    assert (np.asarray(got)[:, int(case.cu_q_lens[case.num_seqs]):] == 0).all()
    empty = jax.jit(functools.partial(cpu.attend, **options))(q, k, v, cache, 0, kv_lens, pages, cu,
                                                               jnp.zeros((1,), jnp.int32))
    assert (np.asarray(empty) == 0).all()


@needs_kernel
@pytest.mark.parametrize("page_size,dtype,length", [(8, jnp.float32, "short"), (16, jnp.float32, "short"),
                                                    (32, jnp.float32, "short"), (16, jnp.bfloat16, "short"),
                                                    (16, jnp.float32, "long"), (16, jnp.bfloat16, "long"),
                                                    (16, jnp.float32, "long window")])
def test_serving_layout_with_transposed_keys(rng, page_size, dtype, length):  # noqa: F811
    """The CPU serving path: `write_kv_layers(k_transposed=True)` writes, `attend(k_transposed=True)` reads
    (in place for pages of 16 or more tokens, through a copy below that); same outputs as the reference
    reading the plain head-major cache written from the same K/V. "long": a prompt chunk on a few hundred
    cached tokens, a decode and a fresh prompt of several query blocks, so the kernel's 64-key blocks come
    whole (every query row sees every key), on the diagonal and, with a window, cut at both ends."""
    from kernels.attention.cache_layout import cache_values, storage_dtype, token_layout, write_kv_layers

    num_layers, kv_heads, group, head_dim = 2, 2, 3, 64
    pages_per_seq = 10
    if length == "short":
        lens = random_lens(rng, page_size, ["decode", "chunk", "prefill", "aligned"])
    else:
        lens = [(int(rng.integers(260, 400)), int(rng.integers(40, 100))), (int(rng.integers(200, 300)), 1),
                (0, int(rng.integers(70, 130)))]
        pages_per_seq = 32
    num_tokens = sum(n for _, n in lens) + 2
    case = make_case(rng, lens, max_seqs=5, num_tokens=num_tokens, num_kv_heads=kv_heads, group=group,
                     head_dim=head_dim, page_size=page_size, pages_per_seq=pages_per_seq,
                     num_pages=pages_per_seq * 5, dtype=jnp.float32, num_layers=num_layers)
    q, k, v, cache, _, kv_lens, pages, cu, num_seqs = case.clean_args()
    # As the runner stores it (bfloat16 as uint16 bits), under float32 q / k / v.
    head_major = jnp.zeros(cache.transpose(0, 1, 3, 2, 4).shape, storage_dtype(dtype))
    # Every cached position of every layer gets random K/V through the writer under test.
    context_tokens = max(num_tokens, sum(c for c, _ in lens))
    context = jnp.asarray(rng.standard_normal((num_layers, context_tokens, 2 * kv_heads, head_dim)), jnp.float32)
    prior_q = jnp.asarray([c for c, _ in lens] + [0] * (5 - len(lens)), jnp.int32)
    prior_cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(prior_q)]).astype(jnp.int32)
    layout = token_layout(prior_q, prior_cu, num_seqs, context_tokens)
    written = {kt: write_kv_layers(head_major, context, pages, *layout, k_transposed=kt) for kt in (False, True)}
    window = {"short": int(rng.integers(3, 40)), "long": None, "long window": int(rng.integers(60, 250))}[length]
    options = dict(sm_scale=0.125, sliding_window=window)
    for layer in range(num_layers):
        want = attend(q, k, v, written[False], layer, kv_lens, pages, cu, num_seqs, **options)
        got = cpu.attend(q, k, v, written[True], layer, kv_lens, pages, cu, num_seqs, k_transposed=True, **options)
        err = np.abs(np.asarray(got) - np.asarray(want)).max()
        assert err <= TOLERANCE[jnp.float32], f"layer {layer}: {err} seed={case.seed}"
    # V is stored as in the plain layout; K blocks hold the same values, transposed.
    plain, kt = (np.asarray(cache_values(written[kt])) for kt in (False, True))
    np.testing.assert_array_equal(plain[:, :, 1::2], kt[:, :, 1::2])
    shape = plain[:, :, 0::2].shape
    np.testing.assert_array_equal(plain[:, :, 0::2].swapaxes(-1, -2).reshape(shape), kt[:, :, 0::2])
