"""The plain-jnp dense product: the contract every dense kernel is tested against, and the path off CPU.

`dense(x, w, bias, transposed=False)`: `x[..., K] @ w[K, N] (+ bias[N])`, or with `transposed`,
`x @ w[N, K].T` (a tied LM head reading the `[vocab, hidden]` embedding table). The result has the
promoted dtype of `x` and `w` (bfloat16 in, bfloat16 out, as transformers computes a bf16 Linear: products
accumulated in float32, rounded once).
"""

from __future__ import annotations

import jax.numpy as jnp


def dense(x, w, bias=None, *, transposed: bool = False):
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    # bfloat16 x bfloat16 accumulates in float32 and is rounded once at the end, as a bf16 Linear is;
    # asked for explicitly, XLA:CPU runs it as a bfloat16 GEMM (AVX512-BF16 / AMX where the CPU has them:
    # 4.6x the plain bf16 dot on a 512-row prefill product here, which widened the weight to float32 first).
    accumulate = jnp.float32 if x.dtype == w.dtype == jnp.bfloat16 else None
    if transposed:
        # `W @ x.T` reads the [N, K] table row-major as it is stored; `x @ W.T` made XLA:CPU copy the
        # whole transposed table every step.
        y = (jnp.swapaxes(jnp.matmul(w, jnp.swapaxes(x, -1, -2), preferred_element_type=accumulate), -1, -2)
             if x.ndim == 2 else jnp.matmul(x, w.T, preferred_element_type=accumulate))
    else:
        y = jnp.matmul(x, w, preferred_element_type=accumulate)
    if bias is not None:
        y = y + bias
    return y.astype(out_dtype)
