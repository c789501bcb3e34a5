"""Zeroed arrays whose memory is not written at allocation: on one CPU device, a native op
(`cpu_zeros.cc`, XLA FFI) returns an XLA-owned buffer whose pages the OS zero-fills on first touch;
elsewhere (an accelerator, a mesh, no compiler) XLA's own zeros.

Why: the KV cache is allocated at every start and on `reset_kv_cache`; XLA's zeros write all of it (the
default model's 5.8 GB took ~3 s of memset and page faults here), though a fresh cache is mostly unused.
The result is an ordinary jitted output, so the step that writes the cache can donate it and update it in
place; a buffer XLA made from host memory it does not own (numpy zero-copy) could not be donated, and the
first write copied all of it.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from kernels import native_build

_SOURCE = Path(__file__).with_name("cpu_zeros.cc")
_TARGET = "pallas_serve_lazy_zeros_cpu"


def unavailable_reason() -> str | None:
    """Why the native op cannot run in this process (built and registered on the first call), or None."""
    return native_build.load(_SOURCE, {_TARGET: "LazyZeros"})


def lazy_zeros_apply(sharding: jax.sharding.Sharding) -> bool:
    """Whether `zeros` on `sharding` leaves the pages untouched: one CPU device, the op built here."""
    devices = sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu" and unavailable_reason() is None


def zeros(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding) -> jax.Array:
    """A zeroed `shape` / `dtype` array created on `sharding` (each device zeroes only its own shard)."""
    if lazy_zeros_apply(sharding):
        make = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(shape, dtype))
    else:
        def make():
            return jnp.zeros(shape, dtype)
    return jax.jit(make, out_shardings=sharding)()
