"""The sampler: its greedy argmax (`argmax_rows`) against `jnp.argmax`, on fresh random logits each run
(SAMPLER_TEST_SEED replays): ties go to the first index, -inf entries and whole -inf rows behave alike;
banned ids, however many a row has, are never sampled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.sampler import MAX_BANNED_IDS, SamplingBatch, argmax_rows, sample
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


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_bans_more_than_the_precompiled_width(temperature):
    """Twelve banned ids per row (wider than MAX_BANNED_IDS): none of them is ever chosen, even when
    they hold almost all the probability mass."""
    rows, vocab, width = 4, 64, 16
    logits = np.full((rows, vocab), -10.0, np.float32)
    logits[:, :12] = 10.0  # the banned ids are the most likely ones
    logits[:, 40] = 0.0
    banned = np.full((rows, width), -1, np.int32)
    banned[:, :12] = np.arange(12)
    arrays = SamplingBatch.host_arrays(rows, width)
    arrays.update(banned_ids=banned, temperature=np.full(rows, temperature, np.float32),
                  seeds=np.arange(rows, dtype=np.uint32))
    for step in range(8):
        arrays["steps"] = np.full(rows, step, np.int32)
        tokens = np.asarray(jax.jit(sample)(jnp.asarray(logits), SamplingBatch(**arrays)))
        assert not np.isin(tokens, np.arange(12)).any(), tokens
        if temperature == 0.0:
            assert (tokens == 40).all()


def test_pad_keeps_a_wider_banned_width():
    host = {"temperature": np.array([0.5], np.float32), "banned_ids": np.arange(16, dtype=np.int32)[None]}
    padded = SamplingBatch.pad(host, 4)
    assert padded["banned_ids"].shape == (4, 16) and padded["banned_ids"][0].tolist() == list(range(16))
    assert (padded["banned_ids"][1:] == -1).all() and padded["temperature"].tolist() == [0.5, 0, 0, 0]
    assert SamplingBatch.pad({}, 2)["banned_ids"].shape == (2, MAX_BANNED_IDS)
