"""One entry for reading a model's params from a resolved directory, whatever its format.

A Hugging Face directory is read by `checkpoints.safetensors`, an Orbax checkpoint (with its
config.json beside it) by `checkpoints.orbax_io`; both return the same NNX param state, placed onto the
shardings the caller names.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from checkpoints.orbax_io import ShardingFor, restore_state
from checkpoints.resolve import is_orbax_checkpoint
from checkpoints.safetensors import load_params


def load_checkpoint(model: nnx.Module, model_dir: Path, dtype, *, sharding_for: ShardingFor | None = None,
                    progress: bool = True) -> nnx.State:
    """`model`'s params read from `model_dir` (safetensors or Orbax), in `dtype`, each param on
    `sharding_for(path)` (default: the first device)."""
    model_dir = Path(model_dir)
    if is_orbax_checkpoint(model_dir):
        return restore_state(model, model_dir, dtype, sharding_for=sharding_for)
    return load_params(model, model_dir, dtype, progress=progress, sharding_for=sharding_for)
