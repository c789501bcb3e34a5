"""The device mesh a server runs on, built once from `--tp-size` / `--ep-size` and `jax.devices()`.

Axes `("data", "tensor", "expert")` (`model.sharding.MESH_AXES`): params carry PartitionSpecs over
`tensor` and `expert` (`model.sharding.param_spec`), the KV cache is split by KV head over `tensor`, and
XLA SPMD partitions the step; attention and the routed experts run per shard under `shard_map`. Each
data-parallel replica (`--dp-size`, serving/replicas.py) has a placement of its own on its own device
group, so a replica's mesh has `data` 1; the server reports the number of replicas as `data`. A model
that does not divide evenly over the mesh is refused here, at start-up, with the reason.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from checkpoints.name_maps import weight_name_map_for
from model.config import ModelConfig
from model.sharding import MESH_AXES, kv_cache_spec, param_spec


class MeshError(ValueError):
    """A parallelism request this model or these devices cannot take; the message says why."""


@dataclass(frozen=True)
class Placement:
    """Where params and the KV cache live: on `mesh` when one is used, else on the first device.

    `kv_replication`: with more tensor shards than KV heads, each KV head is held by this many shards
    (the one its shard's query heads read): the served model has `num_kv_heads * kv_replication` KV heads,
    K/V projections with each head's columns repeated (`replicate_kv_heads`), and a cache to match."""

    mesh: Mesh | None
    kv_replication: int = 1
    device: Any = None  # without a mesh, the one device (None: the first of `jax.devices()`)

    @property
    def devices(self) -> list[Any]:
        return list(self.mesh.devices.flat) if self.mesh is not None else [self._device]

    @property
    def _device(self) -> Any:
        return jax.devices()[0] if self.device is None else self.device

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
            out[key] = (jax.sharding.SingleDeviceSharding(self._device) if self.mesh is None
                        else NamedSharding(self.mesh, spec))
        return out

    def kv_cache_sharding(self, head_major: bool) -> jax.sharding.Sharding:
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self._device)
        return NamedSharding(self.mesh, kv_cache_spec(head_major))

    @property
    def kv_head_shards(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tensor"])

    def served_config(self, config: ModelConfig) -> ModelConfig:
        """The config the step runs: the checkpoint's, with the KV heads replicated as this placement needs."""
        if self.kv_replication == 1:
            return config
        return dataclasses.replace(config, num_kv_heads=config.num_kv_heads * self.kv_replication)

    def load_shardings(self, served: dict[tuple[str, ...], jax.sharding.Sharding]) -> dict:
        """Where the loaders put each checkpoint tensor: the served sharding, except K/V projections that
        get their heads replicated after loading (they load whole onto every device: their columns split
        `tp` ways would cut heads apart)."""
        if self.kv_replication == 1:
            return served
        whole = NamedSharding(self.mesh, PartitionSpec())
        return {path: whole if _is_kv_projection(path) else sharding for path, sharding in served.items()}

    def replicate_kv_heads(self, state: nnx.State, served: dict[tuple[str, ...], jax.sharding.Sharding],
                           head_dim: int) -> nnx.State:
        """Each K/V projection's head columns (kernel and bias) repeated `kv_replication` times in place,
        head by head, placed onto the served sharding: tensor shard `i` then holds KV head
        `i // kv_replication`, the one its query heads belong to."""
        if self.kv_replication == 1:
            return state
        for path, leaf in nnx.to_flat_state(state):
            key = tuple(str(k) for k in path)
            if _is_kv_projection(key):
                repeat = jax.jit(functools.partial(_repeat_heads, head_dim=head_dim, times=self.kv_replication),
                                 out_shardings=served[key])
                leaf.set_value(repeat(leaf.get_value()))
        return state

    def checkpoint_value(self, path: tuple[str, ...], value: jax.Array, head_dim: int) -> jax.Array:
        """A served param's value as the checkpoint holds it: `replicate_kv_heads` undone."""
        if self.kv_replication == 1 or not _is_kv_projection(path):
            return value
        heads = value.shape[-1] // head_dim
        split = value.reshape(*value.shape[:-1], heads, head_dim)
        return split[..., :: self.kv_replication, :].reshape(*value.shape[:-1], -1)


def _is_kv_projection(path: tuple[str, ...]) -> bool:
    return len(path) >= 2 and path[-2] in ("k_proj", "v_proj")


def _repeat_heads(value: jax.Array, *, head_dim: int, times: int) -> jax.Array:
    """`[..., heads * head_dim]` -> `[..., heads * times * head_dim]`, each head's columns `times` in a row."""
    heads = value.shape[-1] // head_dim
    split = value.reshape(*value.shape[:-1], heads, head_dim)
    return jax.numpy.repeat(split, times, axis=-2).reshape(*value.shape[:-1], heads * times * head_dim)


def plan_placement(config: ModelConfig, *, tp_size: int, ep_size: int, is_encoder: bool = False,
                   devices: list[Any] | None = None) -> Placement:
    """The placement for `--tp-size` / `--ep-size` on `devices` (default: all; a data-parallel replica passes
    its group) with no mesh when both are 1 (the first of `devices`), checked against the model and the
    devices: every sharded dimension must divide evenly, and the mesh must fit the devices there are."""
    if tp_size == 1 and ep_size == 1:
        return Placement(None, device=None if devices is None else devices[0])
    devices = list(jax.devices()) if devices is None else devices
    needed = tp_size * ep_size
    if needed > len(devices):
        raise MeshError(f"--tp-size {tp_size} x --ep-size {ep_size} needs {needed} devices; "
                        f"{jax.default_backend()} has {len(devices)}")
    if is_encoder:
        raise MeshError(f"--tp-size / --ep-size with an encoder model ({config.architecture}) is not supported yet")
    if tp_size > 1:
        _check_divides(config, tp_size)
    if ep_size > 1 and not config.num_experts:
        raise MeshError(f"--ep-size {ep_size} needs a mixture-of-experts model; {config.architecture} has no experts")
    if config.num_experts % needed:  # the experts go over every device (model.sharding.EXPERT_DEVICES)
        raise MeshError(f"--tp-size {tp_size} x --ep-size {ep_size} must divide the number of experts "
                        f"({config.num_experts})")
    grid = np.array(devices[:needed], dtype=object).reshape(1, tp_size, ep_size)
    return Placement(Mesh(grid, MESH_AXES), kv_replication=max(tp_size // config.num_kv_heads, 1))


def _check_divides(config: ModelConfig, tp_size: int) -> None:
    kv_heads = config.num_kv_heads
    if kv_heads % tp_size and (tp_size < kv_heads or tp_size % kv_heads):
        raise MeshError(f"--tp-size {tp_size} must divide the number of KV heads ({kv_heads}) or be a multiple "
                        "of it (KV heads are then replicated)")
    sizes = {"the number of attention heads": config.num_heads}
    if not config.num_experts:  # a MoE model's dense MLP width is unused (every layer is a MoE layer)
        sizes["intermediate_size"] = config.intermediate_size
    if config.shared_expert_intermediate_size:
        sizes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    for what, size in sizes.items():
        if size % tp_size:
            raise MeshError(f"--tp-size {tp_size} must divide {what} ({size})")


def device_memory(placement: Placement, params: Any, kv_pages: jax.Array | None) -> list[dict[str, Any]]:
    """One entry per device of the placement that this process owns: the bytes of param and KV-cache shards
    that live on it, summed from the arrays' addressable shards (released arrays count nothing). With
    `--nnodes` > 1 that is node 0's devices only: another host's shards are not addressable here."""
    weights = _bytes_per_device(jax.tree_util.tree_leaves(params))
    kv_cache = _bytes_per_device([] if kv_pages is None else [kv_pages])
    return [{"device": str(device), "weights_bytes": weights.get(device, 0), "kv_cache_bytes": kv_cache.get(device, 0)}
            for device in placement.devices if device.process_index == jax.process_index()]


def _bytes_per_device(arrays: list[jax.Array]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for array in arrays:
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out

