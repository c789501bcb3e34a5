"""The model/runner contract: attention backends as values, the layer loop's auxiliary outputs, the heads
(poolers) and the encoder attention, each against an independent numpy computation; the runner's pooling
step against transformers' hidden states."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kernels.attention import AttentionBackend, resolve_attention_backend
from kernels.attention.encoder import segment_attention
from model.config import ModelConfig
from model.decoder import run_layers
from model.heads import pool
from model.interface import AttentionMetadata, KVWrite, StepInputs
from model.registry import model_task
from tests.conftest import replayable_seed


@pytest.fixture
def rng():
    return np.random.default_rng(replayable_seed("MODEL_INTERFACE_SEED"))


def test_attention_backend_knows_its_layout():
    bf16 = jnp.dtype(jnp.bfloat16)
    cases = {  # (requested, platform): (label, writes in step, head-major, K transposed, storage dtype)
        ("reference", "cpu"): ("reference", False, True, False, jnp.uint16),
        ("pallas", "cpu"): ("pallas_gpu_interpret", True, False, False, bf16),
        ("auto", "tpu"): ("reference", False, True, False, jnp.uint16),  # head_dim 32: the kernel declines
        ("pallas_tpu", "cpu"): ("pallas_tpu_interpret", True, False, False, bf16),
    }
    for (requested, platform), (label, in_step, head_major, k_t, storage) in cases.items():
        backend = resolve_attention_backend(requested, head_dim=32 if platform == "tpu" else 64, page_size=16,
                                            num_kv_heads=2, cache_dtype=bf16, platform=platform)
        assert (backend.label, backend.writes_in_step, backend.head_major, backend.k_transposed,
                backend.storage_dtype) == (label, in_step, head_major, k_t, jnp.dtype(storage)), (requested, platform)
        assert backend.requested == requested
    native = AttentionBackend("cpu", cache_dtype=jnp.dtype(jnp.float32))
    assert native.k_transposed and native.head_major and native.storage_dtype == jnp.float32
    token_major = native.with_in_step_write()
    assert not token_major.k_transposed and not token_major.head_major
    assert hash(native) != hash(token_major)  # a static jit argument: distinct values, distinct programs


def numpy_pool(hidden, lens, method, normalize):
    out, start = [], 0
    for n in lens:
        rows = hidden[start:start + n]
        vec = {"last": rows[-1], "cls": rows[0], "mean": rows.mean(axis=0)}[method]
        out.append(vec / np.linalg.norm(vec) if normalize else vec)
        start += n
    return np.stack(out)


@pytest.mark.parametrize("method", ["last", "mean", "cls"])
@pytest.mark.parametrize("normalize", [False, True])
def test_pool_matches_numpy(rng, method, normalize):
    lens = rng.integers(1, 9, size=3).tolist()
    hidden = rng.standard_normal((sum(lens) + 5, 16)).astype(np.float32)  # 5 padding rows
    cu = np.zeros(6, np.int32)  # 5 sequence slots, 3 used; unused entries repeat the last offset
    cu[1:4] = np.cumsum(lens)
    cu[4:] = cu[3]
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(cu), jnp.array([3], jnp.int32), method=method,
                          normalize=normalize))
    np.testing.assert_allclose(got[:3], numpy_pool(hidden, lens, method, normalize), rtol=1e-5, atol=1e-6)
    assert not got[3:].any()
    with pytest.raises(ValueError, match="pooling method"):
        pool(jnp.asarray(hidden), jnp.asarray(cu), jnp.array([3], jnp.int32), method="max")


@pytest.mark.parametrize("causal", [False, True])
def test_segment_attention_matches_numpy(rng, causal):
    segments = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, -1], np.int32)  # the last row is padding
    num_tokens, kv_heads, group, head_dim = len(segments), 2, 3, 8
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim)).astype(np.float32)
    k = rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_tokens, kv_heads, head_dim)).astype(np.float32)
    got = np.asarray(segment_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(segments),
                                       sm_scale=0.3, causal=causal))
    want = np.zeros_like(q)
    for i in range(num_tokens):
        if segments[i] < 0:
            continue
        keys = [j for j in range(num_tokens) if segments[j] == segments[i] and (not causal or j <= i)]
        for h in range(kv_heads * group):
            s = np.array([q[i, h] @ k[j, h // group] for j in keys], np.float64) * 0.3
            p = np.exp(s - s.max())
            want[i, h] = (p / p.sum()) @ v[keys, h // group]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _RouterLayer(nnx.Module):
    """A layer that declares an auxiliary output (as a MoE router would) and writes zeros as its K/V."""

    def __init__(self, config, *, dtype, rngs):
        self.scale = nnx.Param(jnp.ones((config.hidden_size,), dtype) * 2)

    def fuse_projections(self):
        pass

    def __call__(self, x, inputs, kv_pages, layer, backend, layout, sliding_window=None):
        kv = jnp.zeros((x.shape[0], kv_pages.shape[2], kv_pages.shape[4]), kv_pages.dtype) + (sliding_window or 0)
        return x * self.scale[...], kv, {"choice": jnp.argmax(x, axis=-1).astype(jnp.int32) + layer}


@pytest.mark.parametrize("windows", [(None, None, None), (None, 4, 4), (4, None, 4)])
@pytest.mark.parametrize("unrolled", [False, True])
def test_layer_loop_collects_auxiliary_outputs_per_layer(rng, unrolled, windows):
    """Aux outputs stack along the layer axis, and each layer gets its own sliding window, in the scan
    (one scan per stretch of equal windows) and in the unrolled loop alike."""
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 4,
                                    "intermediate_size": 8, "num_hidden_layers": 3, "num_attention_heads": 1})

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(layer_rngs):
        return _RouterLayer(config, dtype=jnp.float32, rngs=layer_rngs)

    stacked = make(nnx.Rngs(0))
    layers = stacked
    if unrolled:
        graphdef, state = nnx.split(stacked)
        layers = [nnx.merge(nnx.split(_RouterLayer(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))[0],
                            jax.tree.map(lambda a, i=i: a[i], state)) for i in range(3)]
    x = jnp.asarray(rng.standard_normal((5, 4)).astype(np.float32))
    meta = AttentionMetadata(jnp.array([5], jnp.int32), jnp.zeros((1, 2), jnp.int32), jnp.array([0, 5], jnp.int32),
                             jnp.array([1], jnp.int32))
    inputs = StepInputs(jnp.zeros(5, jnp.int32), jnp.arange(5, dtype=jnp.int32), meta, None)
    kv_pages = jnp.zeros((3, 2, 2, 4, 1))  # head-major, one KV head of dim 1
    out, kv, aux = run_layers(layers, x, inputs, kv_pages, AttentionBackend("reference"), windows)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) * 8, rtol=1e-6)
    assert isinstance(kv, KVWrite) and kv.new_kv.shape == (3, 5, 2, 1)
    np.testing.assert_array_equal(np.asarray(kv.new_kv)[:, 0, 0, 0], [w or 0 for w in windows])
    expected = np.stack([np.argmax(np.asarray(x) * 2**i, axis=-1) + i for i in range(3)])
    np.testing.assert_array_equal(np.asarray(aux["choice"]), expected)


def test_pooling_step_matches_transformers_hidden_states(tiny_llama_dir, rng, one_torch_thread):
    """The runner's pooling step (last token, and mean) on a causal LM = transformers' final hidden states."""
    from serving.config import resolve_runtime_config
    from serving.runner import HostBatch, ModelRunner
    from serving.server_args import ServerArgs

    args = ServerArgs(model_path=str(tiny_llama_dir), dtype="float32", page_size=4, max_running_requests=4,
                      chunked_prefill_size=32, context_length=64, max_total_tokens=256)
    runner = ModelRunner(tiny_llama_dir, resolve_runtime_config(args))
    assert runner.task == model_task(runner.config) == "generate"
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 11)]
    pages = [[0, 1, 2], [3, 4, 5]]
    host = HostBatch(np.array(prompts[0] + prompts[1], np.int32),
                     np.array(list(range(3)) + list(range(11)), np.int32), np.array([3, 11], np.int32), pages,
                     np.array([3, 11], np.int32), {})
    last = runner.run_pool(host, method="last")
    mean = runner.run_pool(host, method="mean", normalize=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            hidden = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0].numpy()
        scale = np.abs(hidden).max()
        assert np.abs(last[i] - hidden[-1]).max() / scale < 1e-4
        want = hidden.mean(axis=0) / np.linalg.norm(hidden.mean(axis=0))
        assert np.abs(mean[i] - want).max() < 1e-4
