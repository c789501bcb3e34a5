"""Orbax checkpoints of the param pytree: written by `checkpoints.convert`, read by the server.

Layout (what `save_state` writes and `restore_state` reads): the model's NNX param state as a nested
dict of arrays keyed by our param paths (`layers/self_attn/q_proj/kernel`, stacked per-layer params with
a leading layer axis, Linear kernels `[in, out]`), saved with orbax's `StandardCheckpointer`, with the
Hugging Face `config.json` and tokenizer files copied beside it so a server can start from the directory.
A `CheckpointManager` root (one numbered directory per step) is read from its newest step.

Restoring builds an abstract pytree of `jax.ShapeDtypeStruct`s carrying each param's target sharding and
dtype, so orbax reads every array straight onto its devices (a sharded model never has a full host copy),
cast to the served dtype as it is read. Shapes are checked against the checkpoint's metadata first: a
checkpoint that does not fit names the first Hugging Face tensor that differs before anything is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from checkpoints.name_maps import weight_name_map_for
from checkpoints.safetensors import CheckpointError

# Files and folders orbax itself writes into a checkpoint directory (never copied as "model files").
ORBAX_OWNED = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "manifest.ocdbt", "array_metadatas", "d",
               "ocdbt.process_0", "commit_success.txt", "descriptor")
ShardingFor = Callable[[tuple[str, ...]], jax.sharding.Sharding]


def _checkpointer():
    import orbax.checkpoint as ocp  # imported on use: serving a safetensors model never loads orbax

    return ocp.StandardCheckpointer()


def pytree_dir(directory: Path) -> Path:
    """The directory that holds the saved pytree: `directory` itself, or the newest numbered step of a
    CheckpointManager root (its single item folder, e.g. `default/`, when the step has one)."""
    directory = Path(directory)
    if (directory / "_METADATA").exists():
        return directory
    steps = [c for c in directory.iterdir() if c.is_dir() and c.name.isdigit() and (c / "_CHECKPOINT_METADATA").exists()]
    if not steps:
        raise CheckpointError(f"{directory} is not an Orbax checkpoint (no _METADATA and no numbered steps)")
    step = max(steps, key=lambda c: int(c.name))
    if (step / "_METADATA").exists():
        return step
    items = [c for c in step.iterdir() if c.is_dir() and (c / "_METADATA").exists()]
    if len(items) != 1:
        raise CheckpointError(f"{step} holds {len(items)} saved items; expected exactly one param pytree")
    return items[0]


def save_state(state: nnx.State, directory: Path) -> None:
    """Write `state` (an NNX param state) to `directory`, which must not exist yet."""
    with _checkpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute(), nnx.to_pure_dict(state))


def _flatten(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def stored_arrays(directory: Path) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """`{param path: (shape, dtype)}` of the checkpoint, from its metadata (no array is read)."""
    with _checkpointer() as checkpointer:
        tree = checkpointer.metadata(pytree_dir(directory)).item_metadata.tree
    return {path: (tuple(meta.shape), np.dtype(meta.dtype)) for path, meta in _flatten(dict(tree)).items()}


def restore_state(model: nnx.Module, directory: Path, dtype, *, sharding_for: ShardingFor | None = None) -> nnx.State:
    """Read the checkpoint in `directory` into a state shaped like `model`'s params, in `dtype`, each
    array placed directly onto `sharding_for(path)` (default: the first device). Missing, unexpected and
    mis-shaped tensors are CheckpointErrors naming the Hugging Face tensor."""
    name_map = weight_name_map_for(model)
    state = nnx.state(model, nnx.Param)
    ours = {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}
    stored = stored_arrays(directory)
    for path, leaf in ours.items():
        if path not in stored:
            raise CheckpointError(f"missing tensor {name_map.to_hf_name(path)!r} in {directory}")
        if stored[path][0] != tuple(leaf.shape):
            raise CheckpointError(f"tensor {name_map.to_hf_name(path)!r} has shape "
                                  f"{name_map.to_hf_shape(path, stored[path][0])} in {directory}, expected "
                                  f"{name_map.to_hf_shape(path, leaf.shape)}")
    extra = sorted(set(stored) - set(ours))
    if extra:
        raise CheckpointError(f"unexpected tensor {'.'.join(extra[0])!r} in {directory} for {model.config.architecture}")
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = _unflatten({
        path: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding_for(path) if sharding_for else default)
        for path, leaf in ours.items()})
    with _checkpointer() as checkpointer:
        restored = _flatten(checkpointer.restore(pytree_dir(directory), abstract))
    for path, leaf in nnx.to_flat_state(state):
        leaf.set_value(restored.pop(tuple(str(k) for k in path)))
    return state
