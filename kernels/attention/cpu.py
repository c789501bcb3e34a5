"""The native CPU attention kernel (`cpu_attention.cc`), built on first use and called as an XLA FFI op.

`attend` has the contract of `reference.attend` (read-only, head-major cache, the step's own tokens
from `k` / `v`) and `ragged_paged_attention` that of the reference's (token-major cache, written). The
kernel reads each KV page once, in place, where XLA:CPU must gather pages into dense blocks and then
runs its tiny per-head dots at a few GFLOP/s (numbers in docs/performance.md).

Building: `kernels.native_build` compiles the C++ source on first use (with `-march=native`, into the
user's cache directory). `available()` says whether it builds and loads; when it does not (no compiler,
not x86 / ARM Linux, ...), the dispatch falls back to the jnp reference with one warning giving the reason.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels import native_build
from kernels.attention.cache_layout import token_layout, value_dtype, write_kv

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGET = "pallas_serve_paged_attention_cpu"

CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _load() -> str | None:
    """Build, load and register the kernel once per process; returns why it is unavailable, or None."""
    return native_build.load(_SOURCE, {_TARGET: "PagedAttentionF32"})


def unsupported_reason(*, page_size: int, dtype, platform: str) -> str | None:
    """None when the kernel is ready to take this configuration here, else why not."""
    if platform != "cpu":
        return f"it runs on the CPU, not {platform}"
    if value_dtype(dtype) not in CACHE_DTYPES:
        return f"it takes a float32 or bfloat16 KV cache, not {jnp.dtype(dtype).name}"
    return _load()


def available() -> bool:
    return _load() is None


# Cache layouts the kernel reads (its `layout` attribute); see `cpu_attention.cc`.
LAYOUTS = {"token_major": 0, "head_major": 1, "head_major_kt": 2}


def _call(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
          soft_cap, layout: str):
    if _load() is not None:
        raise RuntimeError(f"the CPU attention kernel is unavailable: {_load()}")
    cache_dtype = value_dtype(kv_pages.dtype)  # uint16 storage holds bfloat16
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"the CPU attention kernel takes a float32 or bfloat16 cache, got {kv_pages.dtype}")
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    # As the reference: the step's own K/V are rounded to the cache dtype (a no-op for float32).
    own = lambda x: x.astype(cache_dtype).astype(jnp.float32)  # noqa: E731
    out = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q.astype(jnp.float32), own(k), own(v), kv_pages, i32(layer).reshape(1), i32(kv_lens), i32(page_indices), i32(cu_q_lens),
        i32(num_seqs).reshape(1), sm_scale=np.float32(sm_scale), sliding_window=np.int64(sliding_window or 0),
        soft_cap=np.float32(soft_cap or 0.0), layout=np.int64(LAYOUTS[layout]))
    return out.astype(q.dtype)


def attend(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
           sliding_window: int | None = None, soft_cap: float | None = None, k_transposed: bool = False,
           **_reference_only):
    """`reference.attend` on the kernel: head-major cache `[layers, pages, 2 * kv_heads, page_size, D]`,
    read only. `k_transposed`: the serving layout, where each page's K block holds K^T (`[D, page_size]`
    in the same `page_size * D` floats, as `reference.write_kv_layers(k_transposed=True)` writes it), which
    the kernel reads in place. Keyword arguments only the reference uses (`layout`, `cache_is_finite`)
    are ignored: the kernel derives the token layout itself and never reads slots past a sequence's end."""
    return _call(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                 sliding_window=sliding_window, soft_cap=soft_cap,
                 layout="head_major_kt" if k_transposed else "head_major")


def ragged_paged_attention(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None):
    """The kernels' contract (token-major cache, new K/V written, returns `(out, kv_pages)`)."""
    out = _call(q, k, v, kv_pages, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                sliding_window=sliding_window, soft_cap=soft_cap, layout="token_major")
    layout = token_layout(kv_lens, cu_q_lens, num_seqs, q.shape[0])
    return out, write_kv(kv_pages, layer, k, v, page_indices, *layout)
