"""The device side of the paged KV cache: its shape, its size in pages, and its allocation.

The cache is one array, K and V interleaved per head (see docs/architecture.md): token-major
`[layers, pages, page_size, 2 * kv_heads, head_dim]` for the Pallas kernels, head-major
`[layers, pages, 2 * kv_heads, page_size, head_dim]` for the CPU path; the attention backend
(`kernels.attention.AttentionBackend.head_major`) says which. The runner owns it and passes it through every
step as a donated value.
Which pages belong to whom is host state (`prefix_cache.py`).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from kernels.zeros import zeros
from model.config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype
    head_major: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        if self.head_major:
            return (self.num_layers, self.num_pages, 2 * self.num_kv_heads, self.page_size, self.head_dim)
        return (self.num_layers, self.num_pages, self.page_size, 2 * self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.num_pages * self.page_size

    @property
    def max_total_tokens(self) -> int:
        return self.num_pages * self.page_size


def device_memory_bytes() -> int:
    """Memory of the first device: HBM on accelerators, physical RAM on CPU."""
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_kv_cache(
    config: ModelConfig,
    *,
    page_size: int,
    dtype,
    weight_bytes: int,
    max_total_tokens: int | None,
    mem_fraction_static: float,
    max_running_requests: int,
    context_length: int,
    head_major: bool = False,
    kv_head_shards: int = 1,
) -> KVCacheSpec:
    """Size the pool: `--max-total-tokens` if given, else what `mem_fraction_static` of memory (the flag, or
    the platform default of `serving.config`) leaves after the weights, capped at what the running requests
    could ever use (no point zeroing more). `dtype` is the cache array's (storage) dtype. On a mesh
    `weight_bytes` is the most any one device holds and each device keeps `1 / kv_head_shards` of every
    token's K/V (the cache is split by KV head)."""
    spec = KVCacheSpec(config.num_layers, 1, page_size, config.num_kv_heads, config.head_dim, jnp.dtype(dtype))
    if max_total_tokens is None:
        fraction = mem_fraction_static
        budget = int(device_memory_bytes() * fraction) - weight_bytes
        if budget <= 0:
            raise ValueError(
                f"--mem-fraction-static {fraction} leaves no memory for the KV cache after "
                f"{weight_bytes / 2**30:.2f} GiB of weights"
            )
        per_device_token = -(-spec.bytes_per_token // kv_head_shards)
        max_total_tokens = min(budget // per_device_token, max_running_requests * context_length)
    num_pages = max(int(max_total_tokens) // page_size, 2)
    return KVCacheSpec(config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim, spec.dtype,
                       head_major)


def allocate_kv_pages(spec: KVCacheSpec, sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """A zeroed cache, created in place on `sharding` (default: the first device; each device zeroes only
    its own shard). On one CPU device its pages are zero-filled by the OS on first touch, not written
    here (`kernels.zeros`): a start no longer pays for memsetting gigabytes it has not used yet."""
    return zeros(spec.shape, spec.dtype, sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def kv_pages_future(spec: KVCacheSpec, sharding: jax.sharding.Sharding | None) -> Future:
    """`allocate_kv_pages` on a thread of its own: where XLA writes the zeros (a mesh, an accelerator), the
    writing overlaps the rest of start-up; the caller waits on the future at the cache's first use."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="kv-alloc")
    pending = pool.submit(allocate_kv_pages, spec, sharding)
    pool.shutdown(wait=False)
    return pending


def params_bytes(params) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))
