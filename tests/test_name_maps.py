"""The safetensors loader's name maps and dtype handling (checkpoints/name_maps.py, checkpoints/safetensors.py).

A bfloat16 load casts tensor by tensor and must give exactly the float32 load rounded to bfloat16; a
model class that declares another `weight_name_map` loads a checkpoint named its way; expert rules
stack per-expert tensors into one `[layers, experts, ...]` param.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from checkpoints.name_maps import (
    DEFAULT_DECODER_MAP,
    ExpertRule,
    PrefixRule,
    WeightNameMap,
    weight_name_map_for,
)
from checkpoints.safetensors import CheckpointError, load_params
from model.config import ModelConfig
from model.registry import model_class_for
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


def abstract_model(model_dir: Path, dtype, cls=None):
    config = ModelConfig.from_dir(model_dir)
    cls = cls or model_class_for(config)
    return nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))


def flat_values(state) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(str(k) for k in path): np.asarray(leaf.get_value()) for path, leaf in nnx.to_flat_state(state)}


def test_bfloat16_load_equals_float32_load_cast(tiny_dir):
    f32 = flat_values(load_params(abstract_model(tiny_dir, jnp.float32), tiny_dir, jnp.float32, progress=False))
    bf16 = flat_values(load_params(abstract_model(tiny_dir, jnp.bfloat16), tiny_dir, jnp.bfloat16, progress=False))
    assert f32.keys() == bf16.keys()
    for path, value in f32.items():
        assert value.dtype == np.float32, path
        assert bf16[path].dtype == ml_dtypes.bfloat16, path
        expected = np.asarray(jnp.asarray(value, dtype=jnp.bfloat16))
        np.testing.assert_array_equal(bf16[path].view(np.uint16), expected.view(np.uint16), err_msg=str(path))


def test_default_map_is_used_without_a_class_attribute(tiny_dir):
    assert weight_name_map_for(abstract_model(tiny_dir, jnp.float32)) is DEFAULT_DECODER_MAP


@pytest.mark.parametrize(
    ("path", "index", "hf_name"),
    [
        (("embed_tokens",), (), "model.embed_tokens.weight"),
        (("norm", "weight"), (), "model.norm.weight"),
        (("lm_head", "kernel"), (), "lm_head.weight"),
        (("layers", "mlp", "up_proj", "kernel"), (1,), "model.layers.1.mlp.up_proj.weight"),
        (("layers", "self_attn", "q_proj", "bias"), (0,), "model.layers.0.self_attn.q_proj.bias"),
    ],
)
def test_default_map_names_round_trip(path, index, hf_name):
    assert DEFAULT_DECODER_MAP.to_hf_name(path, index) == hf_name
    params = {path}
    target = DEFAULT_DECODER_MAP.to_param(hf_name, params)
    assert target is not None and (target.path, target.index) == (path, index)
    assert target.transpose == (path[-1] == "kernel")


def test_default_map_skips_buffers_and_tied_head():
    assert DEFAULT_DECODER_MAP.skips("model.layers.0.self_attn.rotary_emb.inv_freq", tie_word_embeddings=False)
    assert DEFAULT_DECODER_MAP.skips("lm_head.weight", tie_word_embeddings=True)
    assert not DEFAULT_DECODER_MAP.skips("lm_head.weight", tie_word_embeddings=False)


RENAMED_MAP = WeightNameMap(
    prefixes=(
        PrefixRule("transformer.h.{layer}.", "layers."),
        PrefixRule("output.", "lm_head."),
        PrefixRule("transformer.", ""),
    ),
    stacked=("layers",),
    renames=(("wte.weight", "embed_tokens"),),
)


def rename_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json",):
        (dst / name).write_bytes((src / name).read_bytes())
    renamed = {}
    for name, value in load_file(src / "model.safetensors").items():
        name = name.replace("model.embed_tokens.", "transformer.wte.").replace("model.layers.", "transformer.h.")
        name = name.replace("model.", "transformer.").replace("lm_head.", "output.")
        renamed[name] = value
    save_file(renamed, dst / "model.safetensors")
    return dst


def test_custom_name_map_loads(tiny_dir, tmp_path):
    renamed_dir = rename_checkpoint(tiny_dir, tmp_path / "renamed")
    expected = flat_values(load_params(abstract_model(tiny_dir, jnp.float32), tiny_dir, jnp.float32, progress=False))

    # Passed explicitly ...
    abstract = abstract_model(renamed_dir, jnp.float32)
    got = flat_values(load_params(abstract, renamed_dir, jnp.float32, progress=False, name_map=RENAMED_MAP))
    assert got.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))

    # ... or declared by the model class, as a model class does.
    base = model_class_for(ModelConfig.from_dir(renamed_dir))
    declaring = type("RenamedLlama", (base,), {"weight_name_map": RENAMED_MAP})
    abstract = abstract_model(renamed_dir, jnp.float32, cls=declaring)
    assert weight_name_map_for(abstract) is RENAMED_MAP
    got = flat_values(load_params(abstract, renamed_dir, jnp.float32, progress=False))
    for path in expected:
        np.testing.assert_array_equal(got[path], expected[path], err_msg=str(path))

    # The default naming does not fit this checkpoint, and says which tensor.
    with pytest.raises(CheckpointError, match="unexpected tensor 'output.weight'|unexpected tensor 'transformer"):
        load_params(abstract_model(renamed_dir, jnp.float32), renamed_dir, jnp.float32, progress=False)
    # A missing tensor is named in the checkpoint's own spelling.
    tensors = load_file(renamed_dir / "model.safetensors")
    del tensors["transformer.h.1.mlp.up_proj.weight"]
    save_file(tensors, renamed_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'transformer.h.1.mlp.up_proj.weight'"):
        load_params(abstract, renamed_dir, jnp.float32, progress=False)


# -- expert stacking ---------------------------------------------------------------------------------

LAYERS, EXPERTS, HIDDEN, INTERMEDIATE = 2, 3, 4, 6


class _Linear(nnx.Module):
    def __init__(self, shape):
        self.kernel = nnx.Param(jnp.zeros(shape))


class _Experts(nnx.Module):
    def __init__(self):
        self.gate_proj = _Linear((LAYERS, EXPERTS, HIDDEN, INTERMEDIATE))


class _MLP(nnx.Module):
    def __init__(self):
        self.experts = _Experts()
        self.gate = _Linear((LAYERS, HIDDEN, EXPERTS))  # the router: per layer, not per expert


class _Layers(nnx.Module):
    def __init__(self):
        self.mlp = _MLP()


class _Norm(nnx.Module):
    def __init__(self):
        self.weight = nnx.Param(jnp.zeros((HIDDEN,)))


class ToyMoE(nnx.Module):
    weight_name_map = WeightNameMap(
        prefixes=(PrefixRule("model.layers.{layer}.", "layers."), PrefixRule("model.", "")),
        stacked=("layers",),
        experts=(ExpertRule("mlp.experts.{expert}.", "mlp.experts."),),
    )

    def __init__(self):
        self.config = SimpleNamespace(num_layers=LAYERS, tie_word_embeddings=False, architecture="ToyMoE")
        self.layers = _Layers()
        self.norm = _Norm()


def test_expert_rule_stacks_per_expert_tensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"model.norm.weight": rng.standard_normal(HIDDEN).astype(np.float32)}
    for layer in range(LAYERS):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = rng.standard_normal((EXPERTS, HIDDEN)).astype(np.float32)
        for expert in range(EXPERTS):
            tensors[f"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"] = (
                rng.standard_normal((INTERMEDIATE, HIDDEN)).astype(np.float32))
    save_file(tensors, tmp_path / "model.safetensors")

    got = flat_values(load_params(ToyMoE(), tmp_path, jnp.bfloat16, progress=False))
    kernel = got[("layers", "mlp", "experts", "gate_proj", "kernel")]
    assert kernel.shape == (LAYERS, EXPERTS, HIDDEN, INTERMEDIATE) and kernel.dtype == ml_dtypes.bfloat16
    for layer in range(LAYERS):
        np.testing.assert_array_equal(got[("layers", "mlp", "gate", "kernel")][layer],
                                      tensors[f"model.layers.{layer}.mlp.gate.weight"].T.astype(ml_dtypes.bfloat16))
        for expert in range(EXPERTS):
            np.testing.assert_array_equal(
                kernel[layer, expert],
                tensors[f"model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight"].T.astype(ml_dtypes.bfloat16))

    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.2.gate_proj.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.mlp.experts.2.gate_proj.weight'"):
        load_params(ToyMoE(), tmp_path, jnp.float32, progress=False)

    extra = dict(tensors)
    extra["model.layers.0.mlp.experts.3.gate_proj.weight"] = tensors["model.layers.0.mlp.experts.0.gate_proj.weight"]
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"names expert 3, but the model has 3"):
        load_params(ToyMoE(), tmp_path, jnp.float32, progress=False)


def test_a_map_whose_layer_rule_targets_no_stacked_container_is_refused():
    with pytest.raises(ValueError, match="stacked container"):
        WeightNameMap(prefixes=(PrefixRule("model.layers.{layer}.", "blocks."),), stacked=("layers",))
