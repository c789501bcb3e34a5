"""Resolving a backend name to an implementation, and the per-call kernel entry (`ragged_paged_attention`).

The server resolves once, into an `AttentionBackend` (backend.py); tests and benchmarks call
`ragged_paged_attention(..., backend=...)`, which resolves per call.
"""

from __future__ import annotations

import logging

import jax

from kernels.attention import reference
from kernels.attention.validate import AttentionInputError, kernel_supports, static_validate
from kernels.backends import ATTENTION_BACKENDS, ATTENTION_BACKENDS_FOR_TESTS

BACKENDS = ATTENTION_BACKENDS + ATTENTION_BACKENDS_FOR_TESTS

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
        return reference.ragged_paged_attention(*args, **options)
    if impl == "cpu":
        from kernels.attention import cpu

        return cpu.ragged_paged_attention(*args, **options)
    if impl == "tpu":
        from kernels.attention import tpu

        return tpu.ragged_paged_attention(*args, **options, interpret=interpret)
    from kernels.attention import gpu

    return gpu.ragged_paged_attention(*args, **options, interpret=interpret)
