"""Time one dense product on the native CPU kernel against XLA's dot, by rows of `x` (not a test).

    python benchmarks/dense_rows.py                      # float32 and bfloat16, the default model's shapes
    python benchmarks/dense_rows.py --rows 1 64 256 --repeats 30

Shapes are the default model's (SmolLM2-135M): fused q/k/v 576 -> 960, fused gate/up 576 -> 3072, down
1536 -> 576, and the tied LM head (49152 x 576, transposed). Per row count it prints the median ms of
the kernel, of XLA's dot on the weights as stored, for bfloat16 of XLA's float32 dot on a float32 copy
(what `--dtype float32` runs), plus the kernel's weight read rate. The runs alternate, so a busy machine
slows all of them alike. `kernels/dense/tuning.py` takes its row thresholds from this table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import median_seconds  # noqa: E402
from kernels.dense import cpu, reference  # noqa: E402

SHAPES = {"qkv": (576, 960, False), "gate_up": (576, 3072, False), "down": (1536, 576, False),
          "lm_head": (576, 49152, True)}


def median_ms(fn, args, repeats: int) -> float:
    return median_seconds(fn, *args, repeats=repeats, warmup=1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if cpu.unavailable_reason():
        sys.exit(f"the CPU dense kernel is unavailable: {cpu.unavailable_reason()}")
    rng = np.random.default_rng(0)
    print("| dtype | shape | rows | kernel ms | XLA dot ms | XLA f32 copy ms | kernel GB/s |\n|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = jnp.dtype(name)
        for shape in args.shapes:
            k, n, transposed = SHAPES[shape]
            w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)) / np.sqrt(k), dtype)
            w32 = w.astype(jnp.float32)
            kernel = jax.jit(lambda x, w, t=transposed: cpu.dense(x, w, transposed=t))
            xla = jax.jit(lambda x, w, t=transposed: reference.dense(x, w, transposed=t))
            for rows in args.rows:
                x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
                ms = median_ms(kernel, (x, w), args.repeats)
                xla_ms = median_ms(xla, (x, w), args.repeats)
                copy_ms = xla_ms if name == "float32" else median_ms(xla, (x.astype(jnp.float32), w32), args.repeats)
                print(f"| {name} | {shape} | {rows} | {ms:.3f} | {xla_ms:.3f} | "
                      f"{copy_ms:.3f} | {w.nbytes / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
