"""The sampler's greedy argmax (`argmax_rows`) against `jnp.argmax`, on fresh random logits each run
(SAMPLER_TEST_SEED replays): ties go to the first index, -inf entries and whole -inf rows behave alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.sampler import argmax_rows
from tests.conftest import replayable_seed


@pytest.mark.parametrize("rows,vocab,lanes", [(64, 49152, 4096), (5, 49157, 4096), (3, 100, 4096), (7, 1000, 64)])
def test_argmax_rows_is_jnp_argmax(rows, vocab, lanes):
    rng = np.random.default_rng(replayable_seed("SAMPLER_TEST_SEED"))
    # Few distinct values, so rows have many tied maxima, some at the vocabulary's end.
    logits = rng.integers(-5, 5, size=(rows, vocab)).astype(np.float32)
    logits[0, -1] = 10.0
    logits[1 % rows, rng.integers(0, vocab, size=20)] = -np.inf
    logits[-1] = -np.inf  # a row whose every token is banned
    got = jax.jit(lambda x: argmax_rows(x, lanes))(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(jnp.asarray(logits), axis=-1)))
    assert got.dtype == jnp.int32
