"""Up to how many rows of `x` the native CPU dense kernel beats XLA's dot, per weight dtype.

Measured with `python benchmarks/dense_rows.py` on the default model's shapes (docs/performance.md,
"Dense layers on CPU"); above these XLA's blocked matmul wins.
"""

from __future__ import annotations

import jax.numpy as jnp

WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_MAX_ROWS = {jnp.dtype(jnp.float32): 64, jnp.dtype(jnp.bfloat16): 64}


def max_rows(dtype, *, transposed: bool = False) -> int:
    del transposed  # one threshold for both layouts so far
    return _MAX_ROWS[jnp.dtype(dtype)]
