"""Bad model paths, configs and checkpoints are clear errors, never tracebacks.

Each case breaks a copy of a tiny random checkpoint in one way. In process, the loading path the
engine takes (resolve -> config -> registry -> `load_params`) must raise the documented ValueError
subclass with a message that names the problem; through the real CLI, `python -m serving.main
--model-path X` must exit non-zero with exactly one ERROR line carrying that message and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from checkpoints.resolve import ModelNotFoundError, resolve_model_path
from checkpoints.safetensors import CheckpointError, load_params
from model.config import ConfigError, ModelConfig
from model.registry import MODEL_CLASSES, model_class_for
from tests.conftest import REPO, free_port, make_tiny_checkpoint

WEIGHTS = "model.safetensors"
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"  # [intermediate 128, hidden 64] in the tiny Llama


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("good-llama"), "llama")


@pytest.fixture(scope="module")
def good_tensors(good_dir) -> dict[str, np.ndarray]:
    return load_file(good_dir / WEIGHTS)


def load_like_the_engine(model_path: str | Path) -> nnx.State:
    """What `Engine` -> `ModelRunner` do before any device work: resolve, read config, pick the class,
    load every tensor."""
    model_dir = resolve_model_path(model_path).path
    config = ModelConfig.from_dir(model_dir)
    cls = model_class_for(config)
    abstract = nnx.eval_shape(
        lambda: cls(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    )
    return load_params(abstract, model_dir, jnp.float32, progress=False)


# -- ways to break a checkpoint (each gets a fresh copy of the good one) -------------------------------


def split_file(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + header_len]), blob[8 + header_len :]


def write_raw(path: Path, header: object, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def truncate_in_data(d: Path, tensors) -> None:
    blob = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(blob[: len(blob) // 2])


def truncate_in_header(d: Path, tensors) -> None:
    blob = (d / WEIGHTS).read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    (d / WEIGHTS).write_bytes(blob[: 8 + header_len // 2])


def truncate_to_four_bytes(d: Path, tensors) -> None:
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:4])


def empty_file(d: Path, tensors) -> None:
    (d / WEIGHTS).write_bytes(b"")


def garbage_header(d: Path, tensors) -> None:
    header, data = split_file(d / WEIGHTS)
    raw = json.dumps(header).encode()
    garbage = bytes((i * 37 + 128) % 256 for i in range(len(raw)))  # same length, not UTF-8 JSON
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + garbage + data)


def header_is_a_list(d: Path, tensors) -> None:
    _, data = split_file(d / WEIGHTS)
    write_raw(d / WEIGHTS, [1, 2, 3], data)


def entry_is_not_an_object(d: Path, tensors) -> None:
    header, data = split_file(d / WEIGHTS)
    header[UP_PROJ_1] = 7
    write_raw(d / WEIGHTS, header, data)


def entry_without_offsets(d: Path, tensors) -> None:
    header, data = split_file(d / WEIGHTS)
    del header[UP_PROJ_1]["data_offsets"]
    write_raw(d / WEIGHTS, header, data)


def entry_with_text_shape(d: Path, tensors) -> None:
    header, data = split_file(d / WEIGHTS)
    header[UP_PROJ_1]["shape"] = ["128", "sixty-four"]
    write_raw(d / WEIGHTS, header, data)


def unsupported_dtype(d: Path, tensors) -> None:
    header, data = split_file(d / WEIGHTS)
    header[UP_PROJ_1]["dtype"] = "F4"
    write_raw(d / WEIGHTS, header, data)


def index_names_a_missing_shard(d: Path, tensors) -> None:
    (d / WEIGHTS).unlink()
    half = sorted(tensors)[: len(tensors) // 2]
    save_file({name: tensors[name] for name in half}, d / "model-00001-of-00002.safetensors")
    weight_map = {name: ("model-00001-of-00002.safetensors" if name in half else
                         "model-00002-of-00002.safetensors") for name in tensors}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def rewrite(change: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def apply(d: Path, tensors) -> None:
        changed = dict(tensors)
        change(changed)
        save_file(changed, d / WEIGHTS)

    return apply


def set_architecture(name: str) -> Callable[[Path, dict], None]:
    def apply(d: Path, tensors) -> None:
        config = json.loads((d / "config.json").read_text())
        config["architectures"] = [name]
        (d / "config.json").write_text(json.dumps(config))

    return apply


@dataclass(frozen=True)
class Case:
    breaks: Callable[[Path, dict], None]
    error: type[ValueError]
    says: tuple[str, ...]  # substrings the message must contain; "{dir}" / "{file}" are filled in


CASES: dict[str, Case] = {
    # corrupt files
    "truncated-data": Case(truncate_in_data, CheckpointError, ("{file}", "corrupt", "truncated")),
    "truncated-header": Case(truncate_in_header, CheckpointError, ("{file}", "corrupt", "header length")),
    "truncated-to-4-bytes": Case(truncate_to_four_bytes, CheckpointError, ("{file}", "not a safetensors file")),
    "empty-file": Case(empty_file, CheckpointError, ("{file}",)),
    "garbage-header": Case(garbage_header, CheckpointError, ("{file}", "corrupt", "header")),
    "header-is-a-list": Case(header_is_a_list, CheckpointError, ("{file}", "header")),
    "entry-not-an-object": Case(entry_is_not_an_object, CheckpointError, ("{file}", UP_PROJ_1)),
    "entry-without-offsets": Case(entry_without_offsets, CheckpointError, ("{file}", UP_PROJ_1)),
    "entry-with-text-shape": Case(entry_with_text_shape, CheckpointError, ("{file}", UP_PROJ_1)),
    "unsupported-dtype": Case(unsupported_dtype, CheckpointError, ("{file}", UP_PROJ_1, "'F4'")),
    "index-names-missing-shard": Case(index_names_a_missing_shard, CheckpointError,
                                      ("model-00002-of-00002.safetensors",)),
    # tensors that do not fit the model
    "missing-layer-tensor": Case(rewrite(lambda t: t.pop(UP_PROJ_1)), CheckpointError,
                                 ("missing", "model.layers.1.mlp.up_proj.weight", "{dir}")),
    "missing-final-norm": Case(rewrite(lambda t: t.pop("model.norm.weight")), CheckpointError,
                               ("missing", "norm")),
    "missing-lm-head": Case(rewrite(lambda t: t.pop("lm_head.weight")), CheckpointError,
                            ("missing", "lm_head")),
    "unexpected-tensor": Case(
        rewrite(lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": t[UP_PROJ_1]})),
        CheckpointError, ("unexpected tensor", "model.layers.0.mlp.extra_proj.weight", "LlamaForCausalLM")),
    "unexpected-top-level-tensor": Case(
        rewrite(lambda t: t.update({"score.weight": t["lm_head.weight"]})),
        CheckpointError, ("unexpected tensor", "score.weight")),
    "tensor-for-a-layer-too-many": Case(
        rewrite(lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t[UP_PROJ_1]})),
        CheckpointError, ("model.layers.2.mlp.up_proj.weight", "layer 2", "has 2")),
    "shape-mismatch": Case(
        rewrite(lambda t: t.update({UP_PROJ_1: np.ascontiguousarray(t[UP_PROJ_1][:, :32])})),
        CheckpointError, (UP_PROJ_1, "(128, 32)", "(128, 64)")),
    "embedding-shape-mismatch": Case(
        rewrite(lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:300].copy()})),
        CheckpointError, ("model.embed_tokens.weight", "(300, 64)", "(384, 64)")),
    # configs this runtime cannot serve
    "unsupported-architecture": Case(set_architecture("MambaForCausalLM"), ConfigError,
                                     ("'MambaForCausalLM'", *sorted(MODEL_CLASSES))),
}


def broken_checkpoint(name: str, good_dir: Path, good_tensors, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(good_dir, target)
    CASES[name].breaks(target, good_tensors)
    return target


def expected_fragments(case: Case, model_dir: Path) -> list[str]:
    return [s.format(dir=model_dir, file=model_dir / WEIGHTS) for s in case.says]


# -- in process -------------------------------------------------------------------------------------


def test_the_unbroken_checkpoint_loads(good_dir, good_tensors):
    """The control: every case below breaks a copy of this checkpoint, which loads exactly."""
    state = load_like_the_engine(good_dir)
    flat = {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}
    np.testing.assert_array_equal(np.asarray(flat[("embed_tokens",)].get_value()),
                                  good_tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(flat[("layers", "mlp", "up_proj", "kernel")].get_value())[1],
                                  good_tensors[UP_PROJ_1].T)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_checkpoint_is_a_clear_error(name, good_dir, good_tensors, tmp_path):
    case = CASES[name]
    model_dir = broken_checkpoint(name, good_dir, good_tensors, tmp_path)
    with pytest.raises(ValueError) as caught:
        load_like_the_engine(model_dir)
    message = str(caught.value)
    assert isinstance(caught.value, case.error), f"{type(caught.value).__name__}: {message}"
    for fragment in expected_fragments(case, model_dir):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "\n" not in message


def test_unsupported_architecture_lists_the_supported_ones():
    config = ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "hidden_size": 8,
                                    "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ConfigError) as caught:
        model_class_for(config)
    prefix = "Unsupported architecture 'GPT2LMHeadModel'; supported architectures: "
    assert str(caught.value).startswith(prefix)
    listed = str(caught.value)[len(prefix):].split(", ")
    assert listed == sorted(listed) and {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                         "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
                                         "XLMRobertaForSequenceClassification"} <= set(listed)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def nothing_paths(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "no-config").mkdir()
    (tmp_path / "no-config" / WEIGHTS).write_bytes(b"")
    return {
        "missing-directory": str(tmp_path / "does-not-exist"),
        "directory-without-config": str(tmp_path / "no-config"),
        "unknown-hub-id": "qwen/qwen2.5-0.5b-instruct-wrong",
        "not-a-path-or-id": "no such model!",
    }


@pytest.mark.parametrize("which", ["missing-directory", "directory-without-config", "unknown-hub-id",
                                   "not-a-path-or-id"])
def test_model_path_that_resolves_to_nothing(which, tmp_path, empty_hub_cache):
    model_path = nothing_paths(tmp_path)[which]
    with pytest.raises(ModelNotFoundError) as caught:
        load_like_the_engine(model_path)
    assert str(caught.value) == f"{model_path} (repository not found)"


# -- through the real CLI ---------------------------------------------------------------------------


def run_cli(model_path: str | Path, env_overrides: dict[str, str] | None = None) -> tuple[int, str]:
    env = {**os.environ, **(env_overrides or {})}
    result = subprocess.run(
        [sys.executable, "-m", "serving.main", "--model-path", str(model_path), "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


def assert_one_line_error(returncode: int, output: str, fragments: list[str]) -> str:
    assert returncode != 0, output
    assert "Traceback" not in output, output
    error_lines = [line for line in output.splitlines() if "ERROR" in line]
    assert len(error_lines) == 1, output
    for fragment in fragments:
        assert fragment in error_lines[0], f"{fragment!r} not in {error_lines[0]!r}"
    return error_lines[0]


CLI_CASES = ["truncated-data", "garbage-header", "header-is-a-list", "entry-without-offsets",
             "unsupported-architecture", "missing-layer-tensor", "unexpected-tensor", "shape-mismatch"]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_reports_bad_checkpoint_in_one_line(name, good_dir, good_tensors, tmp_path):
    model_dir = broken_checkpoint(name, good_dir, good_tensors, tmp_path)
    returncode, output = run_cli(model_dir)
    assert_one_line_error(returncode, output, expected_fragments(CASES[name], model_dir))


@pytest.mark.parametrize("which", ["missing-directory", "unknown-hub-id"])
def test_cli_reports_model_path_that_resolves_to_nothing(which, tmp_path, empty_hub_cache):
    model_path = nothing_paths(tmp_path)[which]
    returncode, output = run_cli(model_path, {"HF_HUB_CACHE": str(empty_hub_cache)})
    line = assert_one_line_error(returncode, output, [])
    assert line.endswith(f"{model_path} (repository not found)"), line
