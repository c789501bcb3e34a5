"""`shard_map` across the jax versions we support (0.10 to 0.12): `jax.shard_map` where it exists (0.7 on),
else `jax.experimental.shard_map.shard_map`, which later versions remove.

Replication checking is off: the bodies run custom calls (the native CPU attention kernel, Pallas kernels)
whose outputs the checker cannot type, and every caller states its out_specs exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


def shard_map(f: Callable, mesh: jax.sharding.Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`f` run once per device of `mesh` on its local blocks (`in_specs` / `out_specs` as jax's)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(f, mesh, in_specs, out_specs, check_rep=False)
