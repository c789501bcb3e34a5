"""Loaders place each tensor straight onto the serving shardings (`serving.mesh`) of a 4-device tensor-
parallel mesh: safetensors through `jax.make_array_from_callback`, each device's block read alone from the
files, and Orbax through its sharded restore. Values are checked against the checkpoint read by the
`safetensors` library; the blocks read and the shards held are 1/4 of every sharded param."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from checkpoints.convert import main as convert_main
from tests.conftest import make_tiny_checkpoint

SHARDED_LOAD = r"""
import sys
import jax.numpy as jnp, numpy as np
from flax import nnx
from safetensors.numpy import load_file
import checkpoints.safetensors as st
from checkpoints.load import load_checkpoint
from checkpoints.name_maps import weight_name_map_for
from model.config import ModelConfig
from model.registry import model_class_for
from serving.mesh import plan_placement

src, orbax_dir = sys.argv[1], sys.argv[2]
config = ModelConfig.from_dir(src)
cls = model_class_for(config, False)
model = nnx.eval_shape(lambda: cls(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
shardings = plan_placement(config, tp_size=4, ep_size=1).param_shardings(model)
blocks = {}  # param shape -> the sizes of the blocks the callbacks read (no replicated param shares a shape)
original = st._read_block
def recording(sources, stacked, dtype, shape, index):
    out = original(sources, stacked, dtype, shape, index)
    blocks.setdefault(shape, set()).add(out.size)
    return out
st._read_block = recording

name_map = weight_name_map_for(model)
tensors = load_file(f"{src}/model.safetensors")
for directory in (src, orbax_dir):
    state = load_checkpoint(model, directory, jnp.float32, sharding_for=shardings.__getitem__, progress=False)
    values = {tuple(str(k) for k in p): leaf.get_value() for p, leaf in nnx.to_flat_state(state)}
    split = 0
    for key, value in values.items():
        assert value.sharding == shardings[key], (key, value.sharding)
        shard_shapes = {s.data.shape for s in value.addressable_shards}
        spec = value.sharding.spec
        if "tensor" in spec:
            axis = list(spec).index("tensor")
            quarter = tuple(n // 4 if a == axis else n for a, n in enumerate(value.shape))
            assert shard_shapes == {quarter}, (key, shard_shapes)
            if directory == src:
                assert blocks[value.shape] == {value.size // 4}, (key, blocks[value.shape])
            split += 1
    for name, tensor in tensors.items():
        if name_map.skips(name, tie_word_embeddings=config.tie_word_embeddings):
            continue
        path, index, transpose = name_map.to_param(name, values)
        got = np.asarray(values[path])[index]
        assert np.array_equal(got, tensor.T if transpose else tensor), name
    assert split == 7, split  # q, k, v, o, gate, up, down (stacked over the layers)
print("ok")
"""


def test_loaders_place_each_block_on_its_device(tmp_path):
    """A subprocess: the simulated device count is fixed when jax starts."""
    src = make_tiny_checkpoint(tmp_path / "src", "llama", num_attention_heads=8, num_key_value_heads=4)
    convert_main([str(src), "--to", "orbax", str(tmp_path / "orbax")])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(src), str(tmp_path / "orbax")],
                            cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
