"""Up to how many rows of `x` the native CPU dense kernel runs a product; above, XLA's blocked matmul.

Measured with `python benchmarks/dense_rows.py` on the default model's shapes (2-core Xeon with AVX-512,
AVX512-BF16 and AMX, medians): against XLA's dot the kernel is ahead from 1 row to 32 in float32 (1.1x
at 1-32 rows on gate/up), level at 64, mixed at 128 and above (XLA ahead on the down projection), so
float32 stops at 64: a batch-64 decode step runs entirely on the kernel, prefill chunks on XLA.

bfloat16 depends on the CPU. Without bfloat16 matrix hardware XLA widens the weight to float32 before
its dot, and the kernel is 1.5-4.4x ahead up to 64 rows. With AMX (`amx_bf16` in /proc/cpuinfo), XLA's
bfloat16 GEMM (a bf16 x bf16 dot accumulated in float32, `reference.dense`) passes the kernel above 4
rows of the untransposed weights (8 rows: q/k/v 0.21 vs 0.23 ms, down 0.32 vs 0.46, gate/up 0.50 vs
0.46; 16 rows and more: 1.6-3x ahead); the tied LM head (`transposed`) stays on the kernel up to 64 rows
there too, since XLA's bf16 dot of `W @ x.T` is 10-25x slower than the kernel's. CPUs with AVX512-BF16
but no AMX (AMD Zen 4 / 5) keep the kernel to 64 rows: not measured here. Figures in docs/performance.md.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp

WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_MAX_ROWS = {jnp.dtype(jnp.float32): 64, jnp.dtype(jnp.bfloat16): 64}
_MAX_ROWS_BF16_WITH_AMX = 4


@functools.cache
def has_bf16_matrix_unit() -> bool:
    """Whether this CPU has AMX for bfloat16 (`amx_bf16`), which XLA's bf16 GEMM uses."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def max_rows(dtype, transposed: bool = False) -> int:
    """The row threshold for a weight of `dtype` in the given layout (see the module docstring)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and not transposed and has_bf16_matrix_unit():
        return _MAX_ROWS_BF16_WITH_AMX
    return _MAX_ROWS[dtype]
