"""Dense products (`x @ W + b`) for the model's linear layers and LM head: the jnp reference and a native
CPU kernel behind one entry, `dense`.

Why a kernel: XLA:CPU widens a bfloat16 weight to float32 before every dot (a weight-sized convert per
call), and reads float32 weights for a matrix-vector product well below the memory's copy rate; the
native kernel (`cpu_dense.cc`) streams each weight once, in its stored dtype, with both cores.

Which runs is decided in two steps:

1. Once per server: `resolve_dense_backend` turns `--dense-backend` (auto | cpu | reference) into
   'cpu' or 'reference'. 'cpu' needs the CPU platform, the kernel built and loaded here, and the params
   on one device (a mesh spans several, which only XLA's dot partitions); "auto" falls back to the
   reference with one warning giving the reason, "cpu" refuses to start.
2. Per product, at trace time, inside `dense_scope(name)` (the runner enters it in each jitted step):
   the kernel takes float32 / bfloat16 weights and at most `tuning.max_rows(dtype, transposed)` rows of
   `x` (above that XLA's blocked matmul is faster, measured in `tuning.py`: for bfloat16 it depends on
   whether the CPU has AMX); anything else runs the reference.

Every model step the runner compiles (sampling, logprobs, pooling, encoders) is in a scope; outside one
(tests, tools that call a model directly) the reference runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import jax.numpy as jnp

from kernels.backends import DENSE_BACKENDS
from kernels.dense import reference, tuning

_log = logging.getLogger(__name__)
_active: contextvars.ContextVar[str] = contextvars.ContextVar("dense_backend", default="reference")


class DenseBackendError(ValueError):
    """`--dense-backend cpu` asked for where the kernel cannot run."""


def resolve_dense_backend(backend: str, *, platform: str, num_devices: int) -> str:
    """'cpu' or 'reference' for the server's `--dense-backend` flag (see the module docstring)."""
    if backend not in DENSE_BACKENDS:
        raise DenseBackendError(f"dense backend must be one of {DENSE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = None
    if platform != "cpu":
        reason = f"it runs on the CPU, not {platform}"
    elif num_devices != 1:
        reason = f"the params span {num_devices} devices (the kernel takes them on one)"
    else:
        from kernels.dense import cpu

        reason = cpu.unavailable_reason()
    if reason is None:
        return "cpu"
    if backend == "cpu":
        raise DenseBackendError(f"--dense-backend cpu: the native CPU dense kernel cannot run: {reason}")
    if platform == "cpu":
        _log.warning("dense backend 'auto': the native CPU dense kernel is not used: %s; using XLA's dot", reason)
    return "reference"


@contextlib.contextmanager
def dense_scope(backend: str):
    """Products traced inside run on `backend` ('cpu' or 'reference', as `resolve_dense_backend` says)."""
    token = _active.set(backend)
    try:
        yield
    finally:
        _active.reset(token)


def in_dense_scope(backend: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` inside `dense_scope(backend)`; `partial(in_dense_scope, backend, fn)` is what the
    runner jits, so the backend is fixed per compiled step (a static part of the traced function)."""
    with dense_scope(backend):
        return fn(*args, **kwargs)


def dense(x, w, bias=None, *, transposed: bool = False):
    """`x[..., K] @ w[K, N] (+ bias)`, or `x @ w[N, K].T` with `transposed`; `reference.dense`'s contract."""
    if _active.get() != "cpu" or jnp.dtype(w.dtype) not in tuning.WEIGHT_DTYPES:
        return reference.dense(x, w, bias, transposed=transposed)
    if math.prod(x.shape[:-1]) <= tuning.max_rows(w.dtype, transposed):
        from kernels.dense import cpu

        return cpu.dense(x, w, bias, transposed=transposed)
    return reference.dense(x, w, bias, transposed=transposed)


__all__ = ["DenseBackendError", "dense", "dense_scope", "in_dense_scope", "reference", "resolve_dense_backend", "tuning"]
