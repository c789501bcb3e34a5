"""The native CPU dense kernel (`cpu_dense.cc`), built on first use (`kernels.native_build`) and called as
an XLA FFI op with the contract of `reference.dense`.

The kernel takes float32 activations (a `[M, K]` copy, small next to the weight; `x_is_bf16` says they
hold bfloat16 values, which lets AVX512-BF16 take them in pairs) and float32 or bfloat16 weights as stored, accumulates in float32 and returns float32; the result is rounded to the
promoted dtype of `x` and `w` here, once, as a bfloat16 Linear in transformers rounds its output.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels import native_build

_SOURCE = Path(__file__).with_name("cpu_dense.cc")
_TARGET = "pallas_serve_dense_cpu"
WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process (it is built and registered on the first call), or None."""
    return native_build.load(_SOURCE, {_TARGET: "DenseF32"})


def dense(x, w, bias=None, *, transposed: bool = False):
    if unavailable_reason() is not None:
        raise RuntimeError(f"the CPU dense kernel is unavailable: {unavailable_reason()}")
    if jnp.dtype(w.dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"the CPU dense kernel takes float32 or bfloat16 weights, got {w.dtype}")
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    k = x.shape[-1]
    n = w.shape[0] if transposed else w.shape[1]
    rows = x.reshape(-1, k).astype(jnp.float32)
    b = jnp.zeros((0,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((rows.shape[0], n), jnp.float32),
                         vmap_method="sequential")(rows, w, b, transposed=np.int64(transposed),
                                                   x_is_bf16=np.int64(x.dtype == jnp.bfloat16))
    return y.reshape(*x.shape[:-1], n).astype(out_dtype)
