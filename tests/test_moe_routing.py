"""The MoE layer's routing pieces (model/qwen2_moe.py) and the expert recorder (serving/expert_stats.py),
on random inputs: ties, renormalisation, padding never counted, no capacity limit, the circular buffer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels.moe import select_experts
from model.config import ConfigError, ModelConfig
from model.qwen2_moe import ExpertWeights, Qwen2MoeForCausalLM, expert_counts, routed_experts
from serving.expert_stats import ExpertDistributionRecorder, aux_outputs_for, write_dump
from serving.runner import HostBatch
from tests.conftest import replayable_seed


@pytest.fixture
def seed():
    return replayable_seed("MOE_TEST_SEED")


def test_ties_pick_the_lowest_expert_ids_and_renormalised_weights_sum_to_one():
    logits = jnp.zeros((3, 8)).at[1, 5].set(1.0)  # rows 0 and 2 all tied; row 1 one winner, then ties
    weights, ids = select_experts(logits, 3, renormalize=True)
    assert np.asarray(ids).tolist() == [[0, 1, 2], [5, 0, 1], [0, 1, 2]]
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
    plain, _ = select_experts(logits, 3, renormalize=False)
    np.testing.assert_allclose(np.asarray(plain)[0], [1 / 8] * 3, rtol=1e-6)


def test_expert_counts_skip_padding(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 6, size=(17, 2)).astype(np.int32)
    valid = np.arange(17) < 11
    counts = np.asarray(expert_counts(jnp.asarray(ids), jnp.asarray(valid), 6))
    np.testing.assert_array_equal(counts, np.bincount(ids[:11].ravel(), minlength=6))
    assert counts.dtype == np.int32 and counts.sum() == 22


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("crowded", [False, True])
def test_routed_experts_equal_a_dense_loop(fused, crowded, seed):
    """Grouped matmul path == the per-token, per-choice loop; every token routed to one expert is still
    computed (no capacity limit, nothing dropped); padding rows are zeros."""
    rng = np.random.default_rng(seed)
    tokens, hidden, inter, num_experts, top_k = 12, 16, 8, 5, 2
    experts = ExpertWeights(num_experts, hidden, inter, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in
                      (experts.gate_proj, experts.up_proj, experts.down_proj))
    if fused:
        experts.fuse_projections()
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    ids = np.tile([3, 1], (tokens, 1)) if crowded else rng.integers(0, num_experts, size=(tokens, top_k))
    weights = rng.random((tokens, top_k)).astype(np.float32)
    valid = np.arange(tokens) < tokens - 2
    out = np.asarray(routed_experts(experts, jnp.asarray(x), jnp.asarray(weights), jnp.asarray(ids, jnp.int32),
                                    jnp.asarray(valid), backend="reference"))
    dense = np.zeros((tokens, hidden))
    for t in np.flatnonzero(valid):
        for j, e in enumerate(ids[t]):
            g, u = x[t] @ gate[e], x[t] @ up[e]
            dense[t] += weights[t, j] * ((g / (1 + np.exp(-g)) * u) @ down[e])
    np.testing.assert_allclose(out, dense, rtol=1e-4, atol=1e-4)
    assert (out[~valid] == 0).all()


def test_mixed_dense_and_moe_layers_are_refused_by_name():
    raw = {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "vocab_size": 32,
           "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
           "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8, "decoder_sparse_step": 2}
    config = ModelConfig.from_dict(raw)
    assert config.sparse_layers == (False, True, False, True)
    with pytest.raises(ConfigError, match=r"dense MLP layers \[0, 2\].*decoder_sparse_step=2"):
        Qwen2MoeForCausalLM(config)
    with pytest.raises(ConfigError, match="num_experts_per_tok must be in"):
        ModelConfig.from_dict({**raw, "num_experts_per_tok": 5})


def _host(n):
    return HostBatch(np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), np.array([n], np.int32), [[0]],
                     np.array([n], np.int32), {})


def _aux(value, n=3, layers=2, experts=4):
    return {"expert_counts": np.full((layers, experts), value, np.int32),
            "expert_ids": np.full((layers, n, 2), value, np.int32)}


def test_stat_recorder_circular_buffer_start_stop_and_dump(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path / "dumps"))
    assert aux_outputs_for(None) == () and aux_outputs_for("per_token") == ("expert_counts", "expert_ids")
    rec = ExpertDistributionRecorder("stat", 2, num_layers=2, num_experts=4)
    rec.record(_aux(9), _host(3))  # not recording yet
    rec.start()
    for value in (1, 2, 3):  # the third pass overwrites the first slot
        rec.record(_aux(value), _host(3))
    rec.stop()
    rec.record(_aux(9), _host(3))
    dump = rec.dump()
    assert dump.arrays["logical_count"][:, 0, 0].tolist() == [3, 2]
    assert (dump.totals == 6).all()  # the CSV sums every recorded pass, the buffer keeps the last two
    npz, csv = write_dump(dump)
    assert np.load(npz)["logical_count"].shape == (2, 2, 4)
    lines = csv.read_text().splitlines()
    assert lines[0] == "layer_id,expert_id,count" and lines[1:3] == ["0,0,6", "0,1,6"] and len(lines) == 9
    assert rec.dump().arrays["logical_count"].sum() == 0  # a dump resets
    unbounded = ExpertDistributionRecorder("stat", -1, num_layers=2, num_experts=4)
    unbounded.start()
    for value in range(5):
        unbounded.record(_aux(value), _host(3))
    assert unbounded.dump().arrays["logical_count"].shape == (5, 2, 4)


def test_per_token_recorder_keeps_the_last_passes_with_their_tokens():
    rec = ExpertDistributionRecorder("per_token", 2, num_layers=2, num_experts=4)
    rec.start()
    for n in (3, 5, 4):
        rec.record(_aux(n, n=n), _host(n))
    arrays = rec.dump().arrays
    assert arrays["forward_pass_id"].tolist() == [1, 2]
    assert arrays["num_tokens"].tolist() == [5, 4] and arrays["input_ids"].shape == (9,)
    assert arrays["topk_ids_of_layer"].shape == (2, 9, 2)
    assert arrays["global_physical_count"][:, 0, 0].tolist() == [5, 4]
