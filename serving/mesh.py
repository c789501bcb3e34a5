"""The device mesh a server runs on, built once from `--tp-size` / `--ep-size` and `jax.devices()`.

Axes `("data", "tensor", "expert")` (`model.sharding.MESH_AXES`): params carry PartitionSpecs over
`tensor` and `expert` (`model.sharding.param_spec`), the KV cache is split by KV head over `tensor`, and
XLA SPMD partitions the step; attention and the routed experts run per shard under `shard_map`. The
`data` axis is 1: data-parallel replicas (`--dp-size`) are not served yet. A model that does not divide
evenly over the mesh is refused here, at start-up, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from checkpoints.name_maps import weight_name_map_for
from model.config import ModelConfig
from model.sharding import MESH_AXES, kv_cache_spec, param_spec


class MeshError(ValueError):
    """A parallelism request this model or these devices cannot take; the message says why."""


@dataclass(frozen=True)
class Placement:
    """Where params and the KV cache live: on `mesh` when one is used, else on the first device."""

    mesh: Mesh | None

    @property
    def devices(self) -> list[Any]:
        return list(self.mesh.devices.flat) if self.mesh is not None else [jax.devices()[0]]

    @property
    def axis_sizes(self) -> dict[str, int]:
        """`/get_server_info`'s `mesh`: axis name -> size (all 1 on one device)."""
        if self.mesh is None:
            return dict.fromkeys(MESH_AXES, 1)
        return {name: int(size) for name, size in self.mesh.shape.items()}

    def param_shardings(self, abstract_model: nnx.Module) -> dict[tuple[str, ...], jax.sharding.Sharding]:
        """Param path -> where the loaders place it (`model.sharding.param_spec` on the mesh)."""
        stacked = weight_name_map_for(abstract_model).stacked
        out = {}
        for path, leaf in nnx.to_flat_state(nnx.state(abstract_model, nnx.Param)):
            key = tuple(str(k) for k in path)
            spec = param_spec(key, len(leaf.shape), stacked_axes=int(key[0] in stacked))
            out[key] = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if self.mesh is None
                        else NamedSharding(self.mesh, spec))
        return out

    def kv_cache_sharding(self, head_major: bool) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, kv_cache_spec(head_major))

    @property
    def kv_head_shards(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tensor"])


def plan_placement(config: ModelConfig, *, tp_size: int, ep_size: int, is_encoder: bool = False,
                   devices: list[Any] | None = None) -> Placement:
    """The placement for `--tp-size` / `--ep-size` (no mesh when both are 1), checked against the model and
    the devices: every sharded dimension must divide evenly, and the mesh must fit the devices there are."""
    if tp_size == 1 and ep_size == 1:
        return Placement(None)
    devices = list(jax.devices()) if devices is None else devices
    needed = tp_size * ep_size
    if needed > len(devices):
        raise MeshError(f"--tp-size {tp_size} x --ep-size {ep_size} needs {needed} devices; "
                        f"{jax.default_backend()} has {len(devices)}")
    if is_encoder:
        raise MeshError(f"--tp-size / --ep-size with an encoder model ({config.architecture}) is not supported yet")
    if tp_size > 1:
        _check_divides(config, tp_size)
    if ep_size > 1:
        if not config.num_experts:
            raise MeshError(f"--ep-size {ep_size} needs a mixture-of-experts model; {config.architecture} has no experts")
        if config.num_experts % ep_size:
            raise MeshError(f"--ep-size {ep_size} must divide the number of experts ({config.num_experts})")
    grid = np.array(devices[:needed], dtype=object).reshape(1, tp_size, ep_size)
    return Placement(Mesh(grid, MESH_AXES))


def _check_divides(config: ModelConfig, tp_size: int) -> None:
    if config.num_kv_heads % tp_size:
        if tp_size > config.num_kv_heads:
            raise MeshError(f"--tp-size {tp_size} above the number of KV heads ({config.num_kv_heads}) needs the "
                            "KV heads replicated, which is not supported yet")
        raise MeshError(f"--tp-size {tp_size} must divide the number of KV heads ({config.num_kv_heads})")
    sizes = {"attention heads": config.num_heads, "intermediate_size": config.intermediate_size}
    if config.shared_expert_intermediate_size:
        sizes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    for what, size in sizes.items():
        if size % tp_size:
            raise MeshError(f"--tp-size {tp_size} must divide the number of {what} ({size})")


def device_memory(placement: Placement, params: Any, kv_pages: jax.Array | None) -> list[dict[str, Any]]:
    """One entry per device of the placement: the bytes of param and KV-cache shards that live on it,
    summed from the arrays' addressable shards (released arrays count nothing)."""
    weights = _bytes_per_device(jax.tree_util.tree_leaves(params))
    kv_cache = _bytes_per_device([] if kv_pages is None else [kv_pages])
    return [{"device": str(device), "weights_bytes": weights.get(device, 0), "kv_cache_bytes": kv_cache.get(device, 0)}
            for device in placement.devices]


def _bytes_per_device(arrays: list[jax.Array]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for array in arrays:
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out

