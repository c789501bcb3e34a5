"""The plain-jnp dense product: the contract every dense kernel is tested against, and the path off CPU.

`dense(x, w, bias, transposed=False)`: `x[..., K] @ w[K, N] (+ bias[N])`, or with `transposed`,
`x @ w[N, K].T` (a tied LM head reading the `[vocab, hidden]` embedding table). The result has the
promoted dtype of `x` and `w` (bfloat16 in, bfloat16 out, as transformers computes a bf16 Linear).
"""

from __future__ import annotations

import jax.numpy as jnp


def dense(x, w, bias=None, *, transposed: bool = False):
    if transposed:
        # `W @ x.T` reads the [N, K] table row-major as it is stored; `x @ W.T` made XLA:CPU copy the
        # whole transposed table every step.
        y = jnp.swapaxes(w @ jnp.swapaxes(x, -1, -2), -1, -2) if x.ndim == 2 else x @ w.T
    else:
        y = x @ w
    if bias is not None:
        y = y + bias
    return y
