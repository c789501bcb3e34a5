"""Arranged params kept on disk (serving/params_cache.py): a second start maps them instead of reading and
arranging the checkpoint, gets exactly the params and tokens a fresh read gives, and never uses a file
that no longer matches the checkpoint or that is damaged."""

from __future__ import annotations

import jax
import numpy as np

from serving.config import resolve_runtime_config
from serving.params_cache import KEEP, ParamsCache
from serving.runner import HostBatch, ModelRunner
from serving.server_args import ServerArgs
from tests.conftest import make_tiny_checkpoint


def _runner(model_dir, params_dir=None, dtype="float32") -> ModelRunner:
    args = ServerArgs(model_path=str(model_dir), dtype=dtype, page_size=4, max_running_requests=2,
                      chunked_prefill_size=8, context_length=64, max_total_tokens=128)
    runner = ModelRunner(model_dir, resolve_runtime_config(args), params_cache_dir=params_dir)
    if runner.params_saving is not None:
        runner.params_saving.join()
    return runner


def _tokens(runner: ModelRunner) -> np.ndarray:
    host = HostBatch(np.array([5, 9, 11, 3, 7], np.int32), np.array([0, 1, 2, 0, 1], np.int32),
                     np.array([3, 2], np.int32), [[0], [1]], np.array([3, 2], np.int32), {})
    runner.reset_kv_cache()
    return runner.run(host)


def _assert_same_params(a: ModelRunner, b: ModelRunner) -> None:
    assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_start_maps_what_the_checkpoint_gives(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    params_dir = tmp_path / "params"
    first = _runner(model, params_dir)
    assert first.params_file is None  # read from the checkpoint, then written
    files = sorted(params_dir.glob("params-*.bin"))
    assert len(files) == 1
    second = _runner(model, params_dir)
    assert second.params_file == files[0] and second.params_saving is None
    _assert_same_params(first, second)
    np.testing.assert_array_equal(_tokens(second), _tokens(first))
    # Another dtype is another file, not a cast of this one; it replaces the model directory's older file.
    bf16 = _runner(model, params_dir, dtype="bfloat16")
    assert bf16.params_file is None
    (saved,) = params_dir.glob("params-*.bin")
    assert saved != files[0]
    again = _runner(model, params_dir, dtype="bfloat16")
    assert again.params_file == saved
    _assert_same_params(bf16, again)


def test_a_rewritten_checkpoint_is_read_again(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    params_dir = tmp_path / "params"
    _runner(model, params_dir)
    old = sorted(params_dir.glob("params-*.bin"))
    make_tiny_checkpoint(model, initializer_range=0.05)  # same path and shapes, other weights
    fresh = _runner(model, params_dir)
    assert fresh.params_file is None
    _assert_same_params(fresh, _runner(model))
    # The model directory's older file is pruned when its new one is written.
    new = sorted(params_dir.glob("params-*.bin"))
    assert len(new) == 1 and new != old
    assert _runner(model, params_dir).params_file == new[0]


def test_a_damaged_file_is_ignored(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    params_dir = tmp_path / "params"
    reference = _runner(model, params_dir)
    (path,) = params_dir.glob("params-*.bin")
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)
    damaged = _runner(model, params_dir)
    assert damaged.params_file is None
    _assert_same_params(reference, damaged)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert _runner(model, params_dir).params_file is None


def test_no_directory_means_no_file(tmp_path):
    model = make_tiny_checkpoint(tmp_path / "model")
    runner = _runner(model)
    assert runner.params_file is None and runner.params_saving is None
    assert ParamsCache(None, model, "").load({}, None) is None


def test_at_most_keep_files(tmp_path):
    params_dir = tmp_path / "params"
    for i in range(KEEP + 2):
        _runner(make_tiny_checkpoint(tmp_path / f"model{i}"), params_dir)
    assert len(list(params_dir.glob("params-*.bin"))) == KEEP
    assert not list(params_dir.glob(".params-*"))  # no temporary file left behind
