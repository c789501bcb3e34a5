"""Ragged paged attention: the Pallas kernels (in interpret mode) and the reference against a float64
numpy oracle, on fresh random inputs each run.

Every case poisons the cache with NaN wherever a correct kernel must not look (pages no live sequence
owns, slots past a sequence's length, the slots the new tokens are about to be written to) and fills
page-table entries past each sequence's pages with garbage indices. The written cache must equal the
poisoned input except for exactly the new tokens' slots; outputs must be finite, and zero on padding
rows. The reference gets the same inputs with the NaNs replaced by zeros and the garbage indices by 0
(it does not mask V, see the report in its module). Set KERNEL_TEST_SEED to replay a failing draw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.attention import (
    AttentionInputError,
    dynamic_validate,
    gpu,
    ragged_paged_attention,
    reference_attention,
    resolve_backend,
    static_validate,
    tpu,
    tuning,
)
from tests.conftest import replayable_seed, tpu_abstract_mesh

TOLERANCE = {jnp.float32: 2e-4, jnp.bfloat16: 4e-2}


class SeededGenerator:
    """A numpy Generator that remembers its seed, for failure messages."""

    def __init__(self, seed: int):
        self.seed_value = seed
        self._generator = np.random.default_rng(seed)

    def __getattr__(self, name):
        return getattr(self._generator, name)


@pytest.fixture
def rng():
    return SeededGenerator(replayable_seed("KERNEL_TEST_SEED"))


@dataclasses.dataclass
class Case:
    q: np.ndarray  # float32 values representable in `dtype`
    k: np.ndarray
    v: np.ndarray
    cache: np.ndarray  # float32, NaN-poisoned
    layer: int
    kv_lens: np.ndarray
    page_indices: np.ndarray  # garbage past each sequence's pages
    cu_q_lens: np.ndarray
    num_seqs: int
    dtype: type
    seed: int

    def args(self):
        """Arguments of the entry, poisoned, in the case dtype."""
        return (jnp.asarray(self.q, self.dtype), jnp.asarray(self.k, self.dtype), jnp.asarray(self.v, self.dtype),
                jnp.asarray(self.cache, self.dtype), jnp.int32(self.layer), jnp.asarray(self.kv_lens),
                jnp.asarray(self.page_indices), jnp.asarray(self.cu_q_lens),
                jnp.asarray([self.num_seqs], jnp.int32))

    def clean_args(self):
        """The same inputs without NaN poison, garbage page indices or non-monotone cu_q_lens padding."""
        q, k, v, cache, layer, kv_lens, _, _, num_seqs = self.args()
        cache = jnp.where(jnp.isnan(cache), 0, cache)
        page_size = self.cache.shape[2]
        used = np.arange(self.page_indices.shape[1])[None, :] < -(-self.kv_lens[:, None] // page_size)
        pages = np.where(used, self.page_indices, 0).astype(np.int32)
        cu = self.cu_q_lens.copy()
        cu[self.num_seqs + 1:] = cu[self.num_seqs]
        return q, k, v, cache, layer, kv_lens, jnp.asarray(pages), jnp.asarray(cu), num_seqs


def make_case(rng, lens, *, max_seqs, num_tokens, num_kv_heads, group, head_dim, page_size, pages_per_seq,
              num_pages, dtype, num_layers=2, monotone_padding=True) -> Case:
    """`lens`: (cached tokens, new tokens) per live sequence."""
    kv_lens = np.zeros(max_seqs, np.int32)
    cu = np.zeros(max_seqs + 1, np.int32)
    page_indices = rng.integers(-(2**20), 2**20, size=(max_seqs, pages_per_seq)).astype(np.int32)
    free = rng.permutation(num_pages)
    taken = 0
    for s, (cached, new) in enumerate(lens):
        kv_lens[s] = cached + new
        cu[s + 1] = cu[s] + new
        n = -(-int(kv_lens[s]) // page_size)
        assert n <= pages_per_seq and taken + n <= num_pages, "case does not fit its cache"
        page_indices[s, :n] = free[taken:taken + n]
        taken += n
    num_live = len(lens)
    # Padding sequences: garbage lengths, and cu_q_lens that repeat the end (or fall back to 0).
    kv_lens[num_live:] = rng.integers(0, 10**6, size=max_seqs - num_live)
    cu[num_live + 1:] = cu[num_live] if monotone_padding else 0
    assert cu[num_live] <= num_tokens
    num_q_heads = num_kv_heads * group

    def draw(*shape):
        return np.array(jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype).astype(jnp.float32))

    q, k, v = draw(num_tokens, num_q_heads, head_dim), draw(num_tokens, num_kv_heads, head_dim), draw(
        num_tokens, num_kv_heads, head_dim)
    cache = draw(num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim)
    layer = int(rng.integers(0, num_layers))
    cached_slot = np.zeros((num_pages, page_size), bool)
    for s, (cached, _) in enumerate(lens):
        for pos in range(cached):
            cached_slot[page_indices[s, pos // page_size], pos % page_size] = True
    cache[layer][~cached_slot] = np.nan
    return Case(q, k, v, cache, layer, kv_lens, page_indices, cu, num_live, dtype, rng.seed_value)


def oracle(case: Case, *, sm_scale, sliding_window=None, soft_cap=None):
    """(out, written cache) in float64 numpy, straight from docs/architecture.md."""
    cache = case.cache.astype(np.float64).copy()
    q = case.q.astype(np.float64)
    num_tokens, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = cache.shape[2], cache.shape[3] // 2
    group = num_q_heads // num_kv_heads
    out = np.zeros_like(q)
    for s in range(case.num_seqs):
        begin, end = case.cu_q_lens[s], case.cu_q_lens[s + 1]
        kv_len = int(case.kv_lens[s])
        for i, t in enumerate(range(begin, end)):
            pos = kv_len - (end - begin) + i
            page, slot = case.page_indices[s, pos // page_size], pos % page_size
            cache[case.layer, page, slot, 0::2] = case.k[t]
            cache[case.layer, page, slot, 1::2] = case.v[t]
    for s in range(case.num_seqs):
        begin, end = case.cu_q_lens[s], case.cu_q_lens[s + 1]
        kv_len = int(case.kv_lens[s])
        positions = np.arange(kv_len)
        rows = cache[case.layer, case.page_indices[s, positions // page_size], positions % page_size]
        for i, t in enumerate(range(begin, end)):
            pos = kv_len - (end - begin) + i
            visible = positions <= pos
            if sliding_window is not None:
                visible &= positions > pos - sliding_window
            for h in range(num_q_heads):
                keys, values = rows[:, 2 * (h // group)], rows[:, 2 * (h // group) + 1]
                logits = keys @ q[t, h] * sm_scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                logits = np.where(visible, logits, -np.inf)
                weights = np.exp(logits - logits.max())
                out[t, h] = weights @ values / weights.sum()
    return out, cache


def run_kernel(kernel: str, case: Case, *, entry: bool = False, **options):
    if entry:
        fn = functools.partial(ragged_paged_attention, backend=f"pallas_{kernel}", **options)
    else:
        fn = functools.partial((tpu if kernel == "tpu" else gpu).ragged_paged_attention, interpret=True, **options)
    out, cache = jax.jit(fn)(*case.args())
    return np.asarray(out.astype(jnp.float32)), np.asarray(cache.astype(jnp.float32))


def check(case: Case, out, cache, *, sm_scale, sliding_window=None, soft_cap=None, what=""):
    tol = TOLERANCE[case.dtype]
    expected_out, expected_cache = oracle(case, sm_scale=sm_scale, sliding_window=sliding_window,
                                          soft_cap=soft_cap)
    context = f"{what} seed={case.seed}"
    assert np.isfinite(out).all(), f"non-finite output ({context})"
    valid_rows = case.cu_q_lens[case.num_seqs]
    assert (out[valid_rows:] == 0).all(), f"padding rows not zero ({context})"
    err = np.abs(out - expected_out).max()
    assert err <= tol, f"output off by {err} > {tol} ({context})"
    # Exactly the new tokens' slots changed; NaN poison elsewhere survives untouched.
    np.testing.assert_array_equal(cache, expected_cache.astype(np.float32), err_msg=f"cache ({context})")
    return expected_out


def random_lens(rng, page_size, kinds):
    """One (cached, new) pair per kind: decode, prefill, chunk (prefill with context), edge-aligned."""
    out = []
    for kind in kinds:
        if kind == "decode":
            out.append((int(rng.integers(1, 4 * page_size)), 1))
        elif kind == "prefill":
            out.append((0, int(rng.integers(2, 3 * page_size))))
        elif kind == "chunk":
            out.append((int(rng.integers(1, 3 * page_size)), int(rng.integers(2, 2 * page_size))))
        elif kind == "aligned":  # cached tokens end on a page boundary, new ones end mid-page
            out.append((page_size * int(rng.integers(1, 3)), int(rng.integers(2, page_size))))
        elif kind == "aligned_end":  # ends exactly on a page boundary
            out.append((page_size - 1, 1))
    return out


KERNELS = ("tpu", "gpu")


def check_all(case: Case, options, *, tpu_blocks=None, gpu_blocks=None, entry=False, reference=True):
    """Both kernels against the oracle (output and written cache), and against the reference."""
    tol = TOLERANCE[case.dtype]
    outs = {}
    for kernel, blocks in zip(KERNELS, (tpu_blocks, gpu_blocks), strict=True):
        out, cache = run_kernel(kernel, case, entry=entry, **(blocks or {}), **options)
        expected = check(case, out, cache, **options, what=kernel)
        outs[kernel] = out
    if reference:
        ref_out = np.asarray(reference_attention(*case.clean_args(), **options)[0].astype(jnp.float32))
        assert np.abs(ref_out - expected).max() <= tol, f"reference vs oracle, seed={case.seed}"
        for kernel, out in outs.items():
            assert np.abs(ref_out - out).max() <= tol, f"{kernel} vs reference, seed={case.seed}"


def test_mixed_batch_float32_gqa3(rng):
    page_size = 8
    lens = random_lens(rng, page_size, ["decode", "prefill", "chunk", "aligned", "aligned_end"])
    total = sum(n for _, n in lens)
    case = make_case(rng, lens, max_seqs=7, num_tokens=total + 3, num_kv_heads=2, group=3, head_dim=64,
                     page_size=page_size, pages_per_seq=8, num_pages=48, dtype=jnp.float32)
    # Small blocks: several query blocks per sequence and several KV blocks (both DMA buffers) per item.
    blocks = dict(q_tokens=4, block_pages=2)
    check_all(case, dict(sm_scale=0.125), tpu_blocks=blocks, gpu_blocks=blocks)


def test_decode_only_bfloat16_gqa8_through_entry(rng):
    page_size = 16
    lens = random_lens(rng, page_size, ["decode"] * 4)
    case = make_case(rng, lens, max_seqs=4, num_tokens=4, num_kv_heads=1, group=8, head_dim=128,
                     page_size=page_size, pages_per_seq=5, num_pages=24, dtype=jnp.bfloat16)
    # The public entry with the tuned block sizes (decode: the GPU kernel splits the KV range).
    check_all(case, dict(sm_scale=128**-0.5), entry=True)


def test_prefill_only_float32_mha_softcap_window(rng):
    page_size = 16
    lens = random_lens(rng, page_size, ["prefill", "prefill"])
    total = sum(n for _, n in lens)
    # cu_q_lens padding falls back to 0: the kernels must read only entries 0 ..= num_seqs.
    case = make_case(rng, lens, max_seqs=4, num_tokens=total + 5, num_kv_heads=2, group=1, head_dim=128,
                     page_size=page_size, pages_per_seq=4, num_pages=16, dtype=jnp.float32,
                     monotone_padding=False)
    blocks = dict(q_tokens=8, block_pages=1)
    options = dict(sm_scale=0.09, soft_cap=5.0, sliding_window=int(rng.integers(3, 20)))
    check_all(case, options, tpu_blocks=blocks, gpu_blocks=blocks)


def test_single_token_bfloat16(rng):
    page_size = 8
    case = make_case(rng, random_lens(rng, page_size, ["decode"]), max_seqs=1, num_tokens=1, num_kv_heads=2,
                     group=2, head_dim=64, page_size=page_size, pages_per_seq=4, num_pages=6,
                     dtype=jnp.bfloat16)
    check_all(case, dict(sm_scale=0.125), entry=True, reference=False)


def test_mixed_bfloat16_window_split_kv(rng):
    page_size = 8
    lens = random_lens(rng, page_size, ["chunk", "decode", "prefill", "decode"])
    total = sum(n for _, n in lens)
    case = make_case(rng, lens, max_seqs=6, num_tokens=total + 2, num_kv_heads=2, group=3, head_dim=64,
                     page_size=page_size, pages_per_seq=6, num_pages=30, dtype=jnp.bfloat16)
    options = dict(sm_scale=0.125, sliding_window=int(rng.integers(2, 12)))
    # GPU: partial softmax states of 4 KV splits merged by the epilogue.
    check_all(case, options, tpu_blocks=dict(q_tokens=4, block_pages=1),
              gpu_blocks=dict(q_tokens=4, block_pages=1, num_splits=4))


def test_all_padding_batch_writes_and_reads_nothing(rng):
    """num_seqs = 0 (a warm-up bucket, say): zero output, cache untouched, garbage metadata unread."""
    case = make_case(rng, [(5, 3)], max_seqs=2, num_tokens=4, num_kv_heads=1, group=2, head_dim=64,
                     page_size=8, pages_per_seq=2, num_pages=4, dtype=jnp.float32)
    case.num_seqs = 0
    for kernel in KERNELS:
        out, cache = run_kernel(kernel, case, sm_scale=0.1)
        assert (out == 0).all(), kernel
        np.testing.assert_array_equal(cache, case.cache, err_msg=kernel)


def test_reference_and_fallback_head_dim(rng):
    """head_dim 96 is not a kernel size: `pallas` falls back to the reference, which matches the oracle."""
    page_size = 4
    lens = random_lens(rng, page_size, ["chunk", "decode"])
    case = make_case(rng, lens, max_seqs=3, num_tokens=sum(n for _, n in lens) + 1, num_kv_heads=1,
                     group=3, head_dim=96, page_size=page_size, pages_per_seq=8, num_pages=12,
                     dtype=jnp.float32)
    assert resolve_backend("pallas", head_dim=96, page_size=4, dtype=jnp.float32, platform="cpu") == (
        "reference", False)
    clean = case.clean_args()
    out, _ = jax.jit(functools.partial(ragged_paged_attention, sm_scale=0.1, backend="pallas"))(*clean)
    expected, _ = oracle(dataclasses.replace(case, cache=np.asarray(clean[3]), page_indices=np.asarray(clean[6]),
                                             cu_q_lens=np.asarray(clean[7])), sm_scale=0.1)
    assert np.abs(np.asarray(out) - expected).max() <= TOLERANCE[jnp.float32], f"seed={case.seed}"


def test_backend_resolution():
    cases = {
        ("auto", "cpu"): ("cpu", False),  # the native CPU kernel (tests/test_cpu_attention.py)
        ("reference", "tpu"): ("reference", False),
        ("auto", "tpu"): ("tpu", False),
        ("auto", "gpu"): ("gpu", False),
        ("pallas", "cpu"): ("gpu", True),
        ("pallas_tpu", "cpu"): ("tpu", True),
        ("pallas_gpu", "tpu"): ("gpu", True),
    }
    for (backend, platform), expected in cases.items():
        got = resolve_backend(backend, head_dim=128, page_size=16, dtype=jnp.bfloat16, platform=platform)
        assert got == expected, (backend, platform, got)
    # Kernel limits: GPU needs a power-of-two page, TPU whole sublane tiles (page and 2 * kv heads);
    # float16 is not a kernel dtype.
    assert resolve_backend("auto", head_dim=128, page_size=12, dtype=jnp.float32, platform="gpu")[0] == "reference"
    assert resolve_backend("auto", head_dim=128, page_size=8, dtype=jnp.bfloat16, platform="tpu")[0] == "reference"
    assert resolve_backend("auto", head_dim=128, page_size=16, num_kv_heads=4, dtype=jnp.bfloat16,
                           platform="tpu")[0] == "reference"
    assert resolve_backend("auto", head_dim=128, page_size=16, num_kv_heads=4, dtype=jnp.float32,
                           platform="tpu")[0] == "tpu"
    assert resolve_backend("auto", head_dim=64, page_size=16, dtype=jnp.float16, platform="gpu")[0] == "reference"
    with pytest.raises(AttentionInputError):
        resolve_backend("triton", head_dim=128, page_size=16, dtype=jnp.float32, platform="cpu")


def _entry_shapes(num_tokens=8, max_seqs=4, num_kv_heads=2, group=2, head_dim=64, page_size=8, pages_per_seq=4,
                  num_pages=8, dtype=jnp.float32):
    return (
        jnp.zeros((num_tokens, num_kv_heads * group, head_dim), dtype),
        jnp.zeros((num_tokens, num_kv_heads, head_dim), dtype),
        jnp.zeros((num_tokens, num_kv_heads, head_dim), dtype),
        jnp.zeros((2, num_pages, page_size, 2 * num_kv_heads, head_dim), dtype),
        jnp.int32(0),
        jnp.zeros((max_seqs,), jnp.int32),
        jnp.zeros((max_seqs, pages_per_seq), jnp.int32),
        jnp.zeros((max_seqs + 1,), jnp.int32),
        jnp.zeros((1,), jnp.int32),
    )


def test_static_validation_names_the_argument():
    good = _entry_shapes()
    static_validate(*good, sm_scale=0.1)
    broken = {
        1: jnp.zeros((8, 3, 64)),  # k heads do not match the cache
        3: jnp.zeros((2, 8, 8, 3, 64)),  # odd combined heads
        5: jnp.zeros((4,), jnp.float32),  # kv_lens dtype
        7: jnp.zeros((4,), jnp.int32),  # cu_q_lens must have seqs + 1 entries
        8: jnp.zeros((2,), jnp.int32),  # num_seqs shape
    }
    for index, value in broken.items():
        args = list(good)
        args[index] = value
        with pytest.raises(AttentionInputError):
            static_validate(*args, sm_scale=0.1)
    for options in (dict(sm_scale=0.0), dict(sm_scale=0.1, sliding_window=0), dict(sm_scale=0.1, soft_cap=-1.0)):
        with pytest.raises(AttentionInputError):
            static_validate(*good, **options)


def test_dynamic_validation_catches_bad_metadata(rng):
    case = make_case(rng, [(3, 2), (0, 4)], max_seqs=3, num_tokens=7, num_kv_heads=1, group=1, head_dim=64,
                     page_size=4, pages_per_seq=3, num_pages=8, dtype=jnp.float32)
    args = list(case.args())
    dynamic_validate(*args, sm_scale=0.1)

    def broken(index, value):
        bad = list(args)
        bad[index] = jnp.asarray(value)
        with pytest.raises(AttentionInputError):
            dynamic_validate(*bad, sm_scale=0.1)

    kv_lens = case.kv_lens.copy()
    kv_lens[1] = 3  # fewer KV positions than new tokens
    broken(5, kv_lens)
    pages = case.page_indices.copy()
    pages[0, 0] = 8  # out of range
    broken(6, pages)
    pages = case.page_indices.copy()
    pages[1, 0] = pages[0, 1]  # two sequences write the same slot
    broken(6, pages)
    broken(7, np.array([0, 5, 12, 12], np.int32))  # more new tokens than query rows
    broken(4, np.int32(2))  # layer out of range


def test_schedule_covers_every_token_once(rng):
    q_lens = rng.integers(0, 13, size=6)
    num_seqs = 4
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cu[num_seqs + 1:] = 0
    num_tokens = int(cu[num_seqs]) + 3
    q_tokens = 4
    items = tuning.max_work_items(num_tokens, 6, q_tokens)
    seq, block, live = (np.asarray(x) for x in tuning.query_block_schedule(
        jnp.asarray(cu), jnp.asarray([num_seqs], jnp.int32), q_tokens=q_tokens, num_items=items))
    covered = []
    for w in range(int(live[0])):
        first = cu[seq[w]] + block[w] * q_tokens
        covered.extend(range(first, min(first + q_tokens, cu[seq[w] + 1])))
    assert covered == list(range(int(cu[num_seqs])))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_their_platform(platform):
    """The Pallas -> Triton / Mosaic lowering (not the final compile) runs on this CPU machine."""
    module = gpu if platform == "cuda" else tpu
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _entry_shapes(
        num_tokens=32, max_seqs=8, num_kv_heads=8, group=4, head_dim=128, page_size=16, pages_per_seq=16,
        num_pages=64, dtype=jnp.bfloat16)]
    fn = jax.jit(functools.partial(module.ragged_paged_attention, sm_scale=0.1, sliding_window=64, soft_cap=30.0))
    context = contextlib.nullcontext()
    if platform == "tpu":
        context = tpu_abstract_mesh()
    with context:
        text = fn.trace(*shapes).lower(lowering_platforms=(platform,)).as_text()
    assert ("__gpu$xla.gpu.triton" in text) if platform == "cuda" else ("tpu_custom_call" in text)
