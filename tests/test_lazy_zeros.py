"""The KV cache's allocation on CPU (kernels/zeros): zeros that are not written at allocation, yet read as
zeros, even where the memory held other data before, and that a donating step updates in place."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import zeros as lazy
from serving.kv_cache import KVCacheSpec, allocate_kv_pages

ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


@pytest.fixture(scope="module", autouse=True)
def op_builds():
    assert lazy.unavailable_reason() is None, lazy.unavailable_reason()
    assert lazy.lazy_zeros_apply(ONE_DEVICE)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_large_zeros_are_not_touched_and_update_in_place():
    """256 MB of zeros leave the process's resident memory nearly unchanged, read as zeros, and a donated
    write lands in the same buffer (XLA owns it: no copy of the whole array)."""
    shape = (4, 64, 1024, 256)  # float32: 256 MiB
    before = _resident_bytes()
    cache = lazy.zeros(shape, jnp.float32, ONE_DEVICE).block_until_ready()
    assert cache.shape == shape and cache.dtype == jnp.float32
    assert _resident_bytes() - before < 64 << 20
    pointer = cache.unsafe_buffer_pointer()
    write = jax.jit(lambda c, v: c.at[1, 7].set(v), donate_argnums=0)
    row = jnp.arange(1024 * 256, dtype=jnp.float32).reshape(1024, 256)
    cache = write(cache, row).block_until_ready()
    assert cache.unsafe_buffer_pointer() == pointer
    assert _resident_bytes() - before < 64 << 20
    np.testing.assert_array_equal(np.asarray(cache[1, 7]), np.asarray(row))
    assert not np.asarray(cache[1, 6]).any() and not np.asarray(cache[3]).any()


@pytest.mark.parametrize("shape", [(3, 5), (300, 1000), (2, 1031, 517)], ids=["tiny", "1.2MB", "4.3MB"])
def test_reused_memory_reads_as_zeros(shape):
    """Arrays of the same size filled with ones and freed first: whatever memory the allocator hands back,
    every byte of the result is zero (the pages inside by the OS, the partial pages at the ends written)."""
    for _ in range(3):
        for _ in range(4):
            jnp.full(shape, -1, jnp.int32).block_until_ready().delete()
        out = lazy.zeros(shape, jnp.int32, ONE_DEVICE)
        assert not np.asarray(out).any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.uint16], ids=["f32", "bf16-bits"])
def test_kv_cache_allocation(dtype):
    spec = KVCacheSpec(num_layers=2, num_pages=64, page_size=16, num_kv_heads=2, head_dim=32, dtype=jnp.dtype(dtype),
                       head_major=True)
    cache = allocate_kv_pages(spec, ONE_DEVICE)
    assert cache.shape == spec.shape and cache.dtype == dtype and cache.sharding == ONE_DEVICE
    assert not np.asarray(cache).any()
