"""`python -m checkpoints.convert` and Orbax checkpoints (checkpoints/orbax_io.py), without a server."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints.convert import main as convert_main
from checkpoints.convert import read_state
from checkpoints.orbax_io import pytree_dir, restore_state
from checkpoints.resolve import resolve_model_dir
from checkpoints.safetensors import CheckpointError, iter_tensors
from tests.conftest import make_tiny_checkpoint


def _tensors(directory):
    return dict(iter_tensors(directory / "model.safetensors"))


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2_moe", {}), ("qwen3", {"tie_word_embeddings": True})])
def test_safetensors_orbax_safetensors_round_trip_is_bit_exact(tmp_path, arch, overrides):
    src = make_tiny_checkpoint(tmp_path / "src", arch, **overrides)
    assert convert_main([str(src), "--to", "orbax", str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "config.json").is_file() and (tmp_path / "orbax" / "tokenizer.json").is_file()
    assert not list((tmp_path / "orbax").glob("*.safetensors"))
    assert convert_main([str(tmp_path / "orbax"), "--to", "safetensors", str(tmp_path / "back")]) == 0
    original, back = _tensors(src), _tensors(tmp_path / "back")
    assert back.keys() == original.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
    # And the Orbax params are the safetensors params, read either way.
    _, from_orbax = read_state(tmp_path / "orbax")
    _, from_safetensors = read_state(src)
    for (path, a), (_, b) in zip(nnx.to_flat_state(from_orbax), nnx.to_flat_state(from_safetensors), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


def test_restore_places_arrays_on_the_sharding_and_dtype_asked(tmp_path):
    src = make_tiny_checkpoint(tmp_path / "src", "llama")
    convert_main([str(src), "--to", "orbax", str(tmp_path / "orbax")])
    model, _ = read_state(src)
    device = jax.devices()[-1]
    sharding = jax.sharding.SingleDeviceSharding(device)
    state = restore_state(model, tmp_path / "orbax", jnp.bfloat16, sharding_for=lambda path: sharding)
    for _, leaf in nnx.to_flat_state(state):
        value = leaf.get_value()
        assert value.dtype == jnp.bfloat16 and value.sharding == sharding


def test_restore_names_the_first_tensor_that_does_not_fit(tmp_path):
    convert_main([str(make_tiny_checkpoint(tmp_path / "a", "llama")), "--to", "orbax", str(tmp_path / "orbax")])
    wide, _ = read_state(make_tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=96))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.embed_tokens\.weight' has shape \(384, 64\) .*, "
                                              r"expected \(384, 96\)$"):
        restore_state(wide, tmp_path / "orbax", jnp.float32)


def test_convert_refuses_an_existing_destination_and_resolve_checks_the_format(tmp_path, capsys):
    src = make_tiny_checkpoint(tmp_path / "src", "llama")
    (tmp_path / "taken").mkdir()
    assert convert_main([str(src), "--to", "orbax", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    convert_main([str(src), "--to", "orbax", str(tmp_path / "orbax")])
    assert resolve_model_dir(str(tmp_path / "orbax"), load_format="orbax") == tmp_path / "orbax"
    with pytest.raises(ValueError, match="--load-format orbax needs an Orbax checkpoint directory"):
        resolve_model_dir(str(src), load_format="orbax")
    with pytest.raises(ValueError, match="--load-format safetensors needs a Hugging Face directory"):
        resolve_model_dir(str(tmp_path / "orbax"), load_format="safetensors")
    (tmp_path / "orbax" / "config.json").unlink()
    with pytest.raises(ValueError, match="needs the model's config.json beside it"):
        resolve_model_dir(str(tmp_path / "orbax"))


def test_a_checkpoint_manager_root_is_read_from_its_newest_step(tmp_path):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(tmp_path / "runs")
    for step in (3, 12):
        manager.save(step, args=ocp.args.StandardSave({"w": jnp.full(2, float(step))}))
    manager.wait_until_finished()
    assert pytree_dir(tmp_path / "runs").parent.name == "12"


SHARDED_RESTORE = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from checkpoints.convert import read_state
from checkpoints.orbax_io import restore_state

src, orbax_dir = sys.argv[1], sys.argv[2]
mesh = Mesh(np.array(jax.devices()), ("x",))
model, expected = read_state(src)

def sharding_for(path):  # split the last axis over the 4 devices where it divides, else replicate
    shape = dict((tuple(str(k) for k in p), v.shape) for p, v in nnx.to_flat_state(expected))[path]
    spec = [None] * len(shape)
    if shape[-1] % 4 == 0:
        spec[-1] = "x"
    return NamedSharding(mesh, P(*spec))

state = restore_state(model, orbax_dir, jnp.float32, sharding_for=sharding_for)
split = 0
for (path, leaf), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected), strict=True):
    value = leaf.get_value()
    key = tuple(str(k) for k in path)
    assert value.sharding == sharding_for(key), (key, value.sharding)
    assert np.array_equal(np.asarray(value), np.asarray(want.get_value())), key
    shard_shapes = {s.data.shape for s in value.addressable_shards}
    if value.sharding.spec[-1] == "x":
        assert shard_shapes == {(*value.shape[:-1], value.shape[-1] // 4)}, (key, shard_shapes)
        split += 1
assert split > 5, split
print("ok", split)
"""


def test_restore_onto_a_mesh_puts_each_shard_on_its_device(tmp_path):
    """Four simulated CPU devices (a subprocess: the device count is fixed when jax starts)."""
    import os
    import subprocess
    import sys

    src = make_tiny_checkpoint(tmp_path / "src", "llama")
    convert_main([str(src), "--to", "orbax", str(tmp_path / "orbax")])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, str(src), str(tmp_path / "orbax")],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
