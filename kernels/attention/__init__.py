"""Ragged paged attention: one entry, the jnp reference, two Pallas kernels and a native CPU kernel behind it.

`ragged_paged_attention` (signature and semantics in docs/architecture.md) writes the new tokens' K/V
into their pages and attends every new token causally to its sequence's cache. `backend` picks the
implementation (the server's `--attention-backend`):

- "auto": the TPU kernel on TPU, the GPU kernel on NVIDIA GPUs, the native CPU kernel elsewhere (the
  reference where that kernel does not build or take the configuration);
- "pallas": the platform's kernel; on CPU the GPU kernel in interpret mode (slow, for debugging);
- "cpu": the native CPU kernel (`cpu_attention.cc`, built on first use, see `cpu.py`), float32 or bfloat16 caches;
- "reference": the plain-jnp reference (`reference.py`);
- "pallas_tpu" / "pallas_gpu": that kernel, in interpret mode off its own platform (tests, benchmarks).

A configuration the Pallas kernels do not take (head_dim other than 64 / 128, other dtypes, see
`validate.kernel_supports`), or a CPU without the native kernel, runs the reference, with one warning
per reason.
"""

from __future__ import annotations

import functools
import logging

import jax

from kernels.attention.reference import attend
from kernels.attention.reference import ragged_paged_attention as reference_attention
from kernels.attention.validate import AttentionInputError, dynamic_validate, kernel_supports, static_validate

__all__ = [
    "BACKENDS",
    "AttentionInputError",
    "cache_k_transposed",
    "dynamic_validate",
    "ragged_paged_attention",
    "read_only_attention",
    "reference_attention",
    "resolve_backend",
    "static_validate",
]

BACKENDS = ("auto", "pallas", "cpu", "reference", "pallas_tpu", "pallas_gpu")

_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def resolve_backend(backend: str, *, head_dim: int, page_size: int, dtype, num_kv_heads: int = 8,
                    platform: str | None = None) -> tuple[str, bool]:
    """`(implementation, interpret)`: implementation is 'reference', 'cpu', 'tpu' or 'gpu'; interpret says
    whether the kernel runs in Pallas interpret mode (off its own platform)."""
    if backend not in BACKENDS:
        raise AttentionInputError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    platform = platform or jax.default_backend()
    if backend == "reference":
        return "reference", False
    if backend == "cpu" or (backend == "auto" and platform not in ("tpu", "gpu")):
        from kernels.attention import cpu

        reason = cpu.unsupported_reason(page_size=page_size, dtype=dtype, platform=platform)
        if reason is None:
            return "cpu", False
        _warn_once(f"attention backend {backend!r}: the native CPU kernel is not used: {reason}; using the reference")
        return "reference", False
    if backend == "pallas_tpu":
        kernel = "tpu"
    elif backend == "pallas_gpu":
        kernel = "gpu"
    else:
        kernel = platform if platform in ("tpu", "gpu") else "gpu"
    interpret = kernel != platform
    reason = kernel_supports(head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads, dtype=dtype,
                             platform="interpret" if interpret else kernel)
    if reason is None and kernel == "gpu":
        from kernels.attention import gpu

        if not gpu.available():
            reason = "this jax has no Pallas Triton lowering"
    if reason is not None:
        _warn_once(f"attention backend {backend!r}: the {kernel.upper()} kernel does not take {reason}; "
                   "using the reference")
        return "reference", False
    return kernel, interpret


def cache_k_transposed(impl: str) -> bool:
    """Whether the read-only (CPU) path's cache stores K transposed per page for a resolved `impl`: what
    `write_kv_layers(k_transposed=...)` must write and `read_only_attention(impl)` reads."""
    return impl == "cpu"


def read_only_attention(impl: str):
    """The CPU path's attention for a resolved `impl` ('cpu' or 'reference'): reads a head-major cache in
    the layout `cache_k_transposed(impl)` says, never writes it (signature of `reference.attend`)."""
    if impl == "cpu":
        from kernels.attention import cpu

        return functools.partial(cpu.attend, k_transposed=cache_k_transposed(impl))
    return attend


def ragged_paged_attention(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, sliding_window=None, soft_cap=None, backend: str = "auto"):
    """Write the new K/V into `kv_pages[layer]` and attend; returns `(out [T, q_heads, head_dim], kv_pages)`.

    Rows of `out` past `cu_q_lens[num_seqs]` are zeros. `kv_pages` should be donated by the caller.
    """
    static_validate(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                    sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    impl, interpret = resolve_backend(backend, head_dim=q.shape[-1], page_size=kv_pages.shape[2],
                                      num_kv_heads=kv_pages.shape[3] // 2, dtype=kv_pages.dtype)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    args = (q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs)
    if impl == "reference":
        return reference_attention(*args, **options)
    if impl == "cpu":
        from kernels.attention import cpu

        return cpu.ragged_paged_attention(*args, **options)
    if impl == "tpu":
        from kernels.attention import tpu

        return tpu.ragged_paged_attention(*args, **options, interpret=interpret)
    from kernels.attention import gpu

    return gpu.ragged_paged_attention(*args, **options, interpret=interpret)
