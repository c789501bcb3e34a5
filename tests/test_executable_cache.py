"""Step executables saved on disk (serving/executable_cache.py): a second start loads them instead of
compiling, they compute what the jit computes on whatever weights are loaded, and they are not reused
when the sources or the model's shapes change."""

from __future__ import annotations

import numpy as np
import pytest

from serving.config import resolve_runtime_config
from serving.executable_cache import source_digest
from serving.runner import HostBatch, ModelRunner
from serving.server_args import ServerArgs
from tests.conftest import make_tiny_checkpoint


def _runner(model_dir, executables=None) -> ModelRunner:
    args = ServerArgs(model_path=str(model_dir), dtype="float32", page_size=4, max_running_requests=2,
                      chunked_prefill_size=8, context_length=64, max_total_tokens=128)
    return ModelRunner(model_dir, resolve_runtime_config(args), executable_cache_dir=executables)


def _tokens(runner: ModelRunner) -> np.ndarray:
    host = HostBatch(np.array([5, 9, 11, 3, 7], np.int32), np.array([0, 1, 2, 0, 1], np.int32),
                     np.array([3, 2], np.int32), [[0], [1]], np.array([3, 2], np.int32), {})
    runner.reset_kv_cache()
    return runner.run(host)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("executable-cache")
    # Fresh random weights (CHECKPOINT_SEED); `initializer_range`, which the served model never reads, only
    # makes the second checkpoint's weights differ from the first's.
    return (root, make_tiny_checkpoint(root / "first"),
            make_tiny_checkpoint(root / "second", initializer_range=0.05),
            make_tiny_checkpoint(root / "wider", intermediate_size=96))


def test_second_start_loads_and_computes_what_the_jit_does(checkpoints):
    root, first, second, wider = checkpoints
    executables = root / "executables"
    cold = _runner(first, executables)
    cold.precompile(progress=False)
    assert cold._executables.misses > 0  # (buckets that share a resampler shape hit the first one's file)
    saved = sorted(executables.iterdir())
    assert saved
    # A fresh random checkpoint of the same shapes: every executable comes from disk, none is compiled,
    # and the tokens are the jit's on the new weights (weights are arguments, never baked in).
    warm = _runner(second, executables)
    warm.precompile(progress=False)
    assert warm._executables.misses == 0
    assert warm._executables.hits == cold._executables.hits + cold._executables.misses
    assert sorted(executables.iterdir()) == saved
    np.testing.assert_array_equal(_tokens(warm), _tokens(_runner(second)))
    # Other shapes (a wider MLP) miss and are compiled afresh; nothing saved before is loaded for them.
    other = _runner(wider, executables)
    other.precompile(progress=False)
    assert other._executables.misses == cold._executables.misses


def test_source_digest_follows_the_sources(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "layers.py").write_text("x = 1\n")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.cc").write_text("int f();\n")
    before = source_digest(tmp_path)
    (tmp_path / "kernels" / "k.cc").write_text("int g();\n")
    changed = source_digest.__wrapped__(tmp_path)
    (tmp_path / "model" / "notes.txt").write_text("not a source")
    assert changed != before and source_digest.__wrapped__(tmp_path) == changed
