"""Up to how many rows of `x` the native CPU dense kernel runs a product; above, XLA's blocked matmul.

Measured with `python benchmarks/dense_rows.py` on the default model's shapes (2-core Xeon with AVX-512,
busy machine, medians): against XLA's dot the kernel is ahead from 1 row to 32 (float32: 1.1x at 1-32
rows on gate/up; bfloat16: 1.5-4.4x, since XLA widens the weight first), level at 64, and mixed at
128 and above (XLA ahead on the down projection), so both dtypes stop at 64: a batch-64 decode step
runs entirely on the kernel, prefill chunks on XLA. Figures in docs/performance.md.
"""

from __future__ import annotations

import jax.numpy as jnp

WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_MAX_ROWS = {jnp.dtype(jnp.float32): 64, jnp.dtype(jnp.bfloat16): 64}


def max_rows(dtype) -> int:
    """The row threshold for a weight of `dtype` (one for both layouts: the tied head measured alike)."""
    return _MAX_ROWS[jnp.dtype(dtype)]
