"""Mixture-of-experts kernels: the grouped matmul over expert-sorted tokens, and routing helpers.

`grouped_matmul(lhs[m, k], rhs[G, k, n], group_sizes[G])` multiplies each consecutive row range of
`lhs` by its group's matrix (`reference.py` states the contract). `backend` picks the implementation
exactly as for attention (the server's `--moe-backend`): "auto" (TPU kernel on TPU, GPU kernel on
NVIDIA GPUs, `jax.lax.ragged_dot` elsewhere), "pallas" (the platform's kernel; the GPU kernel in
interpret mode on CPU), "reference", or "pallas_tpu" / "pallas_gpu" (interpret mode off their platform).
Routing (`select_experts`, `sort_by_expert`, `combine`) lives in `routing.py`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from kernels.backends import ATTENTION_BACKENDS_FOR_TESTS, MOE_BACKENDS
from kernels.moe.reference import GroupedMatmulInputError, validate
from kernels.moe.reference import grouped_matmul as reference_grouped_matmul
from kernels.moe.routing import SortPlan, combine, select_experts, sort_by_expert

__all__ = [
    "BACKENDS",
    "GroupedMatmulInputError",
    "SortPlan",
    "combine",
    "grouped_matmul",
    "reference_grouped_matmul",
    "resolve_backend",
    "select_experts",
    "sort_by_expert",
]

BACKENDS = MOE_BACKENDS + ATTENTION_BACKENDS_FOR_TESTS
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def resolve_backend(backend: str, *, dtype, platform: str | None = None) -> tuple[str, bool]:
    """`(implementation, interpret)` with implementation 'reference', 'tpu' or 'gpu'."""
    if backend not in BACKENDS:
        raise GroupedMatmulInputError(f"moe backend must be one of {BACKENDS}, got {backend!r}")
    platform = platform or jax.default_backend()
    if backend == "reference" or (backend == "auto" and platform not in ("tpu", "gpu")):
        return "reference", False
    kernel = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}.get(backend) or (
        platform if platform in ("tpu", "gpu") else "gpu"
    )
    reason = None
    if jnp.dtype(dtype) not in _KERNEL_DTYPES:
        reason = f"dtype {jnp.dtype(dtype)}"
    elif kernel == "gpu":
        from kernels.moe import gpu

        if gpu.pltriton is None:
            reason = "this jax (no Pallas Triton lowering)"
    if reason is not None:
        message = f"moe backend {backend!r}: the {kernel.upper()} kernel does not take {reason}; using ragged_dot"
        if message not in _warned:
            _warned.add(message)
            _log.warning(message)
        return "reference", False
    return kernel, kernel != platform


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, backend: str = "auto"):
    """`out[m, n]`: row `i` of `lhs` times its group's `rhs`; rows past `sum(group_sizes)` are zeros."""
    validate(lhs, rhs, group_sizes)
    group_sizes = group_sizes.astype(jnp.int32)
    impl, interpret = resolve_backend(backend, dtype=lhs.dtype)
    if impl == "reference":
        return reference_grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
    if impl == "tpu":
        from kernels.moe import tpu

        return tpu.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                                  interpret=interpret)
    from kernels.moe import gpu

    return gpu.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type,
                              interpret=interpret)
