"""Time the native CPU attention kernel on one layer, by step shape (not a test).

    python benchmarks/cpu_attention.py                  # the shapes below, float32 and bfloat16 cache
    python benchmarks/cpu_attention.py --reference      # and the jnp reference beside it, alternating

Shapes are the default model's attention (9 query heads, 3 KV heads, head_dim 64, pages of 16, the
serving layout with K^T pages): `chunk` is one prompt's 512 new tokens on `--prior` cached ones (the
last chunk of a 4,096-token prompt under the CPU's 512-token chunked prefill: the quadratic part of a
long prefill), `prefill` 4 fresh prompts of 128, `decode` 64 sequences of one token on 200 cached, `single`
one sequence's token on 250 (a single stream's decode step; not run unless asked).
Each row gives the median ms of one layer's call, the attention GFLOP/s (4 * head_dim flops per visible
(query head, key) pair) and, with `--reference`, the same for the jnp reference (`reference.attend`, what
the kernel is tested against) on the same inputs; the two alternate, so a busy machine slows both alike.
(A second build of the kernel, from another source file, registered under another FFI target in the
same process did not run its own code here, so an A/B of two kernel sources needs two processes.)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.attention import cpu  # noqa: E402
from kernels.attention.cache_layout import storage_dtype  # noqa: E402
from kernels.attention.reference import attend  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 9, 3, 64, 16


def shape(name: str, prior: int) -> tuple[list[int], list[int]]:
    """(new tokens, cached tokens) per sequence."""
    if name == "chunk":
        return [512], [prior]
    if name == "prefill":
        return [128] * 4, [0] * 4
    if name == "single":
        return [1], [250]
    return [1] * 64, [200] * 64


def case(name: str, prior: int, dtype, rng):
    q_lens, cached = shape(name, prior)
    kv_lens = [c + q for c, q in zip(cached, q_lens, strict=True)]
    tokens = sum(q_lens)
    pages_each = -(-max(kv_lens) // PAGE)
    pages = np.arange(len(q_lens) * pages_each, dtype=np.int32).reshape(len(q_lens), pages_each)
    rng.shuffle(pages.reshape(-1))  # scattered, as a served cache's pages are
    plain = rng.standard_normal((1, pages.size, 2 * KV_HEADS, PAGE, HEAD_DIM), np.float32)
    transposed = plain.copy()  # the serving layout: each page's K block holds K^T
    transposed[:, :, 0::2] = plain[:, :, 0::2].swapaxes(-1, -2).reshape(plain[:, :, 0::2].shape)

    def stored(cache):
        cache = jnp.asarray(cache, dtype).copy()  # XLA-owned, as a served cache is (not numpy memory aliased)
        return jax.lax.bitcast_convert_type(cache, storage_dtype(dtype)) if dtype == jnp.bfloat16 else cache
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v = f32(tokens, Q_HEADS, HEAD_DIM), f32(tokens, KV_HEADS, HEAD_DIM), f32(tokens, KV_HEADS, HEAD_DIM)
    rest = (0, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(pages), jnp.asarray(np.cumsum([0, *q_lens]), jnp.int32),
            jnp.asarray([len(q_lens)], jnp.int32))
    pairs = sum(q * c + q * (q + 1) // 2 for q, c in zip(q_lens, cached, strict=True))
    # (the kernel's arguments: K^T pages; the reference's: the same values in the plain layout)
    return (q, k, v, stored(transposed), *rest), (q, k, v, stored(plain), *rest), 4 * HEAD_DIM * Q_HEADS * pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["chunk", "prefill", "decode"],
                        choices=["chunk", "prefill", "decode", "single"])
    parser.add_argument("--prior", type=int, default=3584)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reference", action="store_true", help="time the jnp reference beside the kernel")
    args = parser.parse_args(argv)
    if not cpu.available():
        sys.exit(f"the CPU attention kernel is unavailable: {cpu._load()}")
    kernels = ["kernel", "reference"] if args.reference else ["kernel"]
    rng = np.random.default_rng(0)
    print(f"| shape | cache dtype | {' | '.join(f'{k} ms | {k} GFLOP/s' for k in kernels)} |"
          + (" kernel speed-up |" if args.reference else "") + "\n|---|---|" + "---|---|" * len(kernels)
          + ("---|" if args.reference else ""))
    for name in args.shapes:
        for dtype_name in args.dtypes:
            kernel_args, plain_args, flops = case(name, args.prior, jnp.dtype(dtype_name), rng)
            call_args = {"kernel": kernel_args, "reference": plain_args}
            runs = {"kernel": jax.jit(functools.partial(cpu.attend, sm_scale=HEAD_DIM ** -0.5, k_transposed=True)),
                    "reference": jax.jit(functools.partial(attend, sm_scale=HEAD_DIM ** -0.5))}
            runs = {k: runs[k] for k in kernels}
            outs = {k: jax.block_until_ready(run(*call_args[k])) for k, run in runs.items()}
            if args.reference:
                err = float(jnp.abs(outs["kernel"] - outs["reference"]).max())
                if err > 1e-3:
                    sys.exit(f"{name} {dtype_name}: the kernel and the reference disagree by {err}")
            times = {k: [] for k in runs}
            for _ in range(args.repeats):
                for k, run in runs.items():
                    start = time.perf_counter()
                    jax.block_until_ready(run(*call_args[k]))
                    times[k].append(time.perf_counter() - start)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            cells = " | ".join(f"{ms[k]:.2f} | {flops / ms[k] / 1e6:.1f}" for k in kernels)
            ratio = f" {ms['reference'] / ms['kernel']:.2f}x |" if args.reference else ""
            label = f"{name} {shape(name, args.prior)[0][0]} on {shape(name, args.prior)[1][0]}"
            print(f"| {label} x {len(shape(name, args.prior)[0])} | {dtype_name} | {cells} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
