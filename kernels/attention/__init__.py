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

The server resolves the flag once into an `AttentionBackend` (`backend.py`), which knows its cache layout,
storage dtype and how it attends and writes; the cache codec shared by all of them is `cache_layout.py`;
`encoder.py` is attention without a paged cache (bidirectional encoders).
"""

from __future__ import annotations

from kernels.attention.backend import AttentionBackend, resolve_attention_backend
from kernels.attention.dispatch import BACKENDS, ragged_paged_attention, resolve_backend
from kernels.attention.reference import ragged_paged_attention as reference_attention
from kernels.attention.validate import AttentionInputError, dynamic_validate, static_validate

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "AttentionInputError",
    "dynamic_validate",
    "ragged_paged_attention",
    "reference_attention",
    "resolve_attention_backend",
    "resolve_backend",
    "static_validate",
]
