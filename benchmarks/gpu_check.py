"""GPU check for the Pallas kernels: correctness on the GPU, timings against the reference, and a
greedy-generation comparison of the kernel and reference paths.

    python benchmarks/gpu_check.py               # on an NVIDIA GPU
    python benchmarks/gpu_check.py --interpret   # anywhere: tiny shapes, kernels in interpret mode

1. Correctness: the attention kernel (mixed prefill / decode batches, float32 and bfloat16, several GQA
   ratios, sliding window, soft cap) and the grouped matmul against their references on fresh random
   inputs; the written cache must match exactly.
2. Timings (median of many runs after warm-up, each run a device-side loop so host dispatch does not
   count, cycling through layers so the KV is read from HBM, not L2): decode at batch 1, 16 and 64
   with 2k-token contexts and a 2k-token prefill, Llama-3-8B attention shapes (32 q / 8 kv heads,
   head_dim 128, bfloat16, page size 16). Achieved bandwidth is reported as a fraction of a
   device-to-device copy measured in the same run (bytes read + written).
3. `check_generation`: a small random Llama-shaped model from `model/`, greedy generation with the
   kernel path and the reference path.

Prints a table; exits nonzero if any check fails.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels.attention import gpu as attention_gpu  # noqa: E402
from kernels.attention import ragged_paged_attention, reference_attention  # noqa: E402
from kernels.moe import grouped_matmul, reference_grouped_matmul  # noqa: E402

FAILURES: list[str] = []


def fail(message: str) -> None:
    FAILURES.append(message)
    print(f"FAIL: {message}", flush=True)


def guarded(name):
    """Run a check; an exception (a kernel that does not compile, say) is a failure, not a crash."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported and counted
                traceback.print_exc()
                fail(f"{name}: {type(exc).__name__}: {exc}")
                return None

        return run

    return wrap


# ---------------------------------------------------------------------------------------------------
# Batches


def make_batch(rng, lens, *, num_kv_heads, group, head_dim, page_size, dtype, num_layers=1,
               num_tokens=None, max_seqs=None, spare_pages=4):
    """A ragged batch over a paged cache. `lens`: (cached, new) per sequence. Pages are shuffled."""
    max_seqs = max_seqs or len(lens)
    kv_lens = np.zeros(max_seqs, np.int32)
    cu = np.zeros(max_seqs + 1, np.int32)
    per_seq = [-(-(c + n) // page_size) for c, n in lens]
    pages_per_seq = max(per_seq)
    num_pages = sum(per_seq) + spare_pages
    order = rng.permutation(num_pages)
    page_indices = np.zeros((max_seqs, pages_per_seq), np.int32)
    taken = 0
    for s, (cached, new) in enumerate(lens):
        kv_lens[s], cu[s + 1] = cached + new, cu[s] + new
        page_indices[s, :per_seq[s]] = order[taken:taken + per_seq[s]]
        taken += per_seq[s]
    cu[len(lens) + 1:] = cu[len(lens)]
    num_tokens = num_tokens or int(cu[len(lens)])
    num_q_heads = num_kv_heads * group
    key = jax.random.key(int(rng.integers(2**31)))
    kq, kk, kv, kc = jax.random.split(key, 4)
    q = jax.random.normal(kq, (num_tokens, num_q_heads, head_dim), dtype)
    k = jax.random.normal(kk, (num_tokens, num_kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (num_tokens, num_kv_heads, head_dim), dtype)
    cache = jax.random.normal(kc, (num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim), dtype)
    meta = (jnp.asarray(kv_lens), jnp.asarray(page_indices), jnp.asarray(cu),
            jnp.asarray([len(lens)], jnp.int32))
    return q, k, v, cache, meta


# ---------------------------------------------------------------------------------------------------
# 1. Correctness


@guarded("attention correctness")
def check_attention(rng, *, interpret: bool):
    backend = "pallas_gpu" if interpret else "pallas"
    page_size = 16
    configs = [  # (dtype, kv heads, group, head_dim, sliding window, soft cap, kinds of sequence)
        (jnp.float32, 2, 3, 64, None, None, "mixed"),
        (jnp.bfloat16, 8, 4, 128, None, None, "mixed"),
        (jnp.bfloat16, 1, 8, 128, None, None, "decode"),
        (jnp.bfloat16, 4, 1, 64, 37, 30.0, "mixed"),
        (jnp.bfloat16, 8, 4, 128, None, None, "prefill"),
    ]
    scale = 1 if interpret else 8
    rows = []
    for dtype, num_kv_heads, group, head_dim, window, cap, kind in configs:
        if kind == "decode":
            lens = [(int(rng.integers(1, 300 * scale)), 1) for _ in range(6)]
        elif kind == "prefill":
            lens = [(0, int(rng.integers(1, 64 * scale))) for _ in range(3)]
        else:
            lens = [(int(rng.integers(0, 100 * scale)), int(rng.integers(1, 40 * scale))) for _ in range(3)]
            lens += [(int(rng.integers(1, 200 * scale)), 1) for _ in range(3)]
        q, k, v, cache, meta = make_batch(rng, lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                          page_size=page_size, dtype=dtype, num_layers=2,
                                          num_tokens=sum(n for _, n in lens) + 3, max_seqs=len(lens) + 1)
        options = dict(sm_scale=head_dim**-0.5, sliding_window=window, soft_cap=cap)
        with jax.default_matmul_precision("highest"):
            ref_out, ref_cache = jax.jit(functools.partial(reference_attention, **options))(
                q, k, v, cache, jnp.int32(1), *meta)
        out, new_cache = jax.jit(functools.partial(ragged_paged_attention, backend=backend, **options))(
            q, k, v, cache, jnp.int32(1), *meta)
        out, ref_out = np.asarray(out.astype(jnp.float32)), np.asarray(ref_out.astype(jnp.float32))
        err = float(np.abs(out - ref_out).max())
        tol = 2e-3 if dtype == jnp.float32 else 4e-2
        same_cache = bool(jnp.array_equal(new_cache, ref_cache))
        name = f"{jnp.dtype(dtype).name} {kind} kv{num_kv_heads}x{group} d{head_dim}" + (
            f" window {window} cap {cap}" if window else "")
        ok = err <= tol and same_cache and np.isfinite(out).all()
        rows.append((name, f"{err:.2e}", "yes" if same_cache else "NO", "ok" if ok else "MISMATCH"))
        if not ok:
            fail(f"attention {name}: max error {err:.3e} (tol {tol}), cache equal: {same_cache}")
    print_table("attention kernel vs reference", ("case", "max |diff|", "cache equal", "result"), rows)


@guarded("grouped matmul correctness")
def check_moe(rng, *, interpret: bool):
    backend = "pallas_gpu" if interpret else "pallas"
    rows = []
    shapes = [(64, 128, 256, 4)] if interpret else [(4096, 2048, 1536, 128), (512, 4096, 2816, 60)]
    for m, k, n, groups in shapes:
        for dtype in (jnp.float32, jnp.bfloat16):
            cuts = np.sort(rng.integers(0, m + 1, size=groups))
            sizes = jnp.asarray(np.diff(np.concatenate([[0], cuts])), jnp.int32)
            key = jax.random.key(int(rng.integers(2**31)))
            lhs = jax.random.normal(key, (m, k), dtype)
            rhs = jax.random.normal(jax.random.fold_in(key, 1), (groups, k, n), dtype) / math.sqrt(k)
            with jax.default_matmul_precision("highest"):
                ref = np.asarray(reference_grouped_matmul(lhs, rhs, sizes).astype(jnp.float32))
            out = np.asarray(jax.jit(functools.partial(grouped_matmul, backend=backend))(lhs, rhs, sizes)
                             .astype(jnp.float32))
            err = float(np.abs(out - ref).max())
            tol = (2e-3 if dtype == jnp.float32 else 3e-2) * max(1.0, float(np.abs(ref).max()))
            ok = err <= tol and np.isfinite(out).all()
            name = f"{jnp.dtype(dtype).name} m{m} k{k} n{n} G{groups}"
            rows.append((name, f"{err:.2e}", "ok" if ok else "MISMATCH"))
            if not ok:
                fail(f"grouped matmul {name}: max error {err:.3e} (tol {tol:.2e})")
    print_table("grouped matmul kernel vs ragged_dot", ("case", "max |diff|", "result"), rows)


# ---------------------------------------------------------------------------------------------------
# 2. Timings


def median_seconds(fn, *args, repeats: int, warmup: int = 2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes read + written per second by an elementwise pass (device-to-device copy rate)."""
    x = jnp.ones((num_bytes // 2,), jnp.bfloat16)
    negate = jax.jit(lambda a: -a)
    return 2 * x.nbytes / median_seconds(negate, x, repeats=repeats)


def matmul_flops(n: int, repeats: int) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    return 2 * n**3 / median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)


def attention_loop(backend: str, inner: int, num_layers: int, options):
    """`inner` dependent attention calls in one jitted loop, each on the next layer of the cache."""

    @functools.partial(jax.jit, donate_argnums=(3,))
    def run(q, k, v, cache, kv_lens, page_indices, cu_q_lens, num_seqs):
        def body(i, carry):
            total, cache = carry
            out, cache = ragged_paged_attention(q, k, v, cache, i % num_layers, kv_lens, page_indices, cu_q_lens,
                                                num_seqs, backend=backend, **options)
            return total + out[0, 0, 0].astype(jnp.float32), cache

        return jax.lax.fori_loop(0, inner, body, (jnp.float32(0), cache))

    return run


@guarded("attention timings")
def time_attention(rng, *, interpret: bool, copy_rate: float, flop_rate: float):
    kernel_backend = "pallas_gpu" if interpret else "pallas"
    num_kv_heads, group, head_dim, page_size, dtype = 8, 4, 128, 16, jnp.bfloat16
    itemsize = jnp.dtype(dtype).itemsize
    context = 64 if interpret else 2048
    batches = (1, 2) if interpret else (1, 16, 64)
    repeats, inner = (2, 2) if interpret else (15, 20)
    cases = [(f"decode b{b} ctx{context}", [(context - 1, 1)] * b) for b in batches]
    cases.append((f"prefill {context} tokens", [(0, context)]))
    rows = []
    for name, lens in cases:
        kv_bytes = sum(c + n for c, n in lens) * 2 * num_kv_heads * head_dim * itemsize
        # Enough layers that one pass over them does not fit in L2 (so each call reads HBM).
        num_layers = 1 if interpret else max(1, math.ceil(256e6 / kv_bytes))
        q, k, v, cache, meta = make_batch(rng, lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                                          page_size=page_size, dtype=dtype, num_layers=num_layers)
        tokens = q.shape[0]
        moved = kv_bytes + 2 * q.nbytes + 2 * (k.nbytes + v.nbytes)  # KV read, q in / out, new K/V in / out
        flops = 4 * num_kv_heads * group * head_dim * sum(
            sum(c + i + 1 for i in range(n)) for c, n in lens)
        options = dict(sm_scale=head_dim**-0.5)
        for impl, backend in (("kernel", kernel_backend), ("reference", "reference")):
            run = attention_loop(backend, inner, num_layers, options)
            state = {"cache": jnp.array(cache, copy=True)}  # each run donates (and replaces) its own

            def call(run=run, state=state, new=(q, k, v), meta=meta):
                total, state["cache"] = run(*new, state["cache"], *meta)
                return total

            seconds = median_seconds(call, repeats=repeats) / inner
            rate = moved / seconds
            rows.append((name, impl, f"{seconds * 1e6:9.1f}", f"{rate / 1e9:8.1f}", f"{rate / copy_rate:6.1%}",
                         f"{flops / seconds / 1e12:7.2f}", f"{flops / seconds / flop_rate:6.1%}"))
        del cache, tokens
    print_table(
        f"attention timings (32 q / 8 kv heads, d128, bf16, page 16; copy {copy_rate / 1e9:.0f} GB/s, "
        f"matmul {flop_rate / 1e12:.0f} TFLOP/s)",
        ("case", "impl", "us/call", "GB/s", "of copy", "TFLOP/s", "of mm"), rows)


@guarded("grouped matmul timings")
def time_moe(rng, *, interpret: bool, copy_rate: float, flop_rate: float):
    kernel_backend = "pallas_gpu" if interpret else "pallas"
    m, k, n, groups = (64, 128, 128, 4) if interpret else (4096, 2048, 1536, 128)
    repeats = 2 if interpret else 20
    cuts = np.sort(rng.integers(0, m + 1, size=groups))
    sizes = jnp.asarray(np.diff(np.concatenate([[0], cuts])), jnp.int32)
    lhs = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    rhs = jax.random.normal(jax.random.key(2), (groups, k, n), jnp.bfloat16)
    moved = lhs.nbytes + rhs.nbytes + m * n * 2
    flops = 2 * m * k * n
    rows = []
    for impl, backend in (("kernel", kernel_backend), ("ragged_dot", "reference")):
        fn = jax.jit(functools.partial(grouped_matmul, backend=backend))
        seconds = median_seconds(fn, lhs, rhs, sizes, repeats=repeats)
        rows.append((f"m{m} k{k} n{n} G{groups}", impl, f"{seconds * 1e6:9.1f}",
                     f"{moved / seconds / copy_rate:6.1%}", f"{flops / seconds / 1e12:7.2f}",
                     f"{flops / seconds / flop_rate:6.1%}"))
    print_table("grouped matmul timings (bf16)", ("case", "impl", "us/call", "of copy", "TFLOP/s", "of mm"), rows)


# ---------------------------------------------------------------------------------------------------
# 3. Generation


@guarded("greedy generation")
def check_generation(rng, *, interpret: bool):
    """Greedy decoding of a small random Llama-shaped model (Llama-3-8B layer sizes, fewer layers)
    with the kernel attention and the reference attention, from the same weights and prompts.

    Pass criterion: teacher-forced logits of the kernel path match the reference's (float32, highest
    matmul precision); the greedy token streams are reported and must agree except after a near-tie.
    """
    try:
        from flax import nnx

        from kernels.attention import resolve_attention_backend
        from model.config import ModelConfig
        from model.interface import AttentionMetadata, StepInputs
        from model.llama import LlamaForCausalLM
    except Exception as exc:  # noqa: BLE001 - the model package is optional for this script
        print(f"\ngeneration check skipped: model/ is not usable here ({type(exc).__name__}: {exc})")
        return
    tiny = interpret
    raw = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 512 if tiny else 32000, "hidden_size": 256 if tiny else 4096,
        "intermediate_size": 512 if tiny else 14336, "num_hidden_layers": 2,
        "num_attention_heads": 4 if tiny else 32, "num_key_value_heads": 2 if tiny else 8,
        "head_dim": 64 if tiny else 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": False,
    }
    config = ModelConfig.from_dict(raw)
    model = LlamaForCausalLM(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    kernel_backend = "pallas_gpu" if interpret else "pallas"
    page_size, batch, new_tokens = 16, 3, 4 if tiny else 12
    prompts = [rng.integers(0, config.vocab_size, size=int(rng.integers(5, 40))).tolist() for _ in range(batch)]
    pages_per_seq = -(-(max(map(len, prompts)) + new_tokens) // page_size)
    num_pages = batch * pages_per_seq
    page_indices = jnp.asarray(rng.permutation(num_pages).reshape(batch, pages_per_seq), jnp.int32)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(backend, state, input_ids, positions, kv_pages, meta, logits_indices):
        step_model = nnx.merge(graphdef, state)
        out = step_model.forward(StepInputs(input_ids, positions, meta, None), kv_pages, backend)
        return step_model.logits(out.hidden[logits_indices]), out.kv

    def run(name, forced=None):
        # Both write a token-major cache inside the step (the kernels' contract).
        backend = resolve_attention_backend(name, head_dim=config.head_dim, page_size=page_size,
                                            num_kv_heads=config.num_kv_heads, cache_dtype=jnp.float32)
        backend = backend.with_in_step_write()
        kv_pages = jnp.zeros((config.num_layers, num_pages, page_size, 2 * config.num_kv_heads, config.head_dim),
                             jnp.float32)
        lens = [0] * batch
        chunks = [list(p) for p in prompts]
        tokens, all_logits = [[] for _ in range(batch)], []
        for step in range(new_tokens + 1):
            ids = [t for chunk in chunks for t in chunk]
            pos = [lens[s] + i for s, chunk in enumerate(chunks) for i in range(len(chunk))]
            cu = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int32)
            for s, chunk in enumerate(chunks):
                lens[s] += len(chunk)
            meta = AttentionMetadata(jnp.asarray(lens, jnp.int32), page_indices, jnp.asarray(cu),
                                     jnp.asarray([batch], jnp.int32))
            with jax.default_matmul_precision("highest"):
                logits, kv_pages = forward(backend, state, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
                                           kv_pages, meta, jnp.asarray(cu[1:] - 1))
            logits = np.asarray(logits)
            all_logits.append(logits)
            if step == new_tokens:
                break
            picked = logits.argmax(-1) if forced is None else [forced[s][step] for s in range(batch)]
            for s in range(batch):
                tokens[s].append(int(picked[s]))
            chunks = [[tokens[s][-1]] for s in range(batch)]
        return tokens, np.stack(all_logits)

    ref_tokens, ref_logits = run("reference")
    kernel_tokens, _ = run(kernel_backend)
    _, forced_logits = run(kernel_backend, forced=ref_tokens)
    err = float(np.abs(forced_logits - ref_logits).max())
    scale = float(np.abs(ref_logits).max())
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    min_gap = float((top2[..., 1] - top2[..., 0]).min())
    same = kernel_tokens == ref_tokens
    rows = [("teacher-forced logits", f"max |diff| {err:.2e} (logits up to {scale:.2f})"),
            ("greedy tokens", "identical" if same else f"differ (smallest top-2 gap {min_gap:.2e})")]
    print_table(f"greedy generation, random Llama ({config.num_layers} layers, hidden {config.hidden_size})",
                ("check", "result"), rows)
    if err > 1e-3 * max(scale, 1.0):
        fail(f"generation: kernel-path logits differ from the reference by {err:.3e}")
    if not same and min_gap > 10 * err:
        fail("generation: greedy tokens differ without a near-tie in the reference logits")


# ---------------------------------------------------------------------------------------------------


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interpret", action="store_true",
                        help="tiny shapes, kernels in interpret mode (runs without a GPU)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    platform = jax.default_backend()
    if not args.interpret and (platform != "gpu" or not attention_gpu.available()):
        print(f"gpu_check needs an NVIDIA GPU and jax's Pallas Triton lowering (backend: {platform}); "
              "use --interpret to run the script's logic on tiny shapes without one")
        return 2
    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind}, seed {seed}"
          + (" (interpret mode)" if args.interpret else ""))
    check_attention(rng, interpret=args.interpret)
    check_moe(rng, interpret=args.interpret)
    copy_rate = copy_bandwidth(2**24 if args.interpret else 2**31, repeats=3 if args.interpret else 20)
    flop_rate = matmul_flops(256 if args.interpret else 8192, repeats=3 if args.interpret else 10)
    time_attention(rng, interpret=args.interpret, copy_rate=copy_rate, flop_rate=flop_rate)
    time_moe(rng, interpret=args.interpret, copy_rate=copy_rate, flop_rate=flop_rate)
    check_generation(rng, interpret=args.interpret)
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) FAILED:")
        for message in FAILURES:
            print(f"  - {message}")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
