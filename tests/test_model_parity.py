"""Parity with transformers on tiny random checkpoints: logits over a ragged batch, and greedy decoding
through the engine's paged cache (page size 4, so every sequence crosses page boundaries)."""

from __future__ import annotations

import asyncio

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from checkpoints.safetensors import load_params
from kernels.attention import AttentionBackend
from model.config import ModelConfig
from model.interface import AttentionMetadata, StepInputs
from model.registry import model_class_for
from tests.conftest import make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy

ARCHS = {
    "llama": {},
    "qwen2": {"tie_word_embeddings": True},
    "qwen3": {"head_dim": 32},
    "qwen2_moe": {},  # the routed experts through kernels/moe, plus the sigmoid-gated shared expert
    "qwen3_moe": {"norm_topk_prob": True},
}


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    arch = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, **ARCHS[arch])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return arch, path, hf


def load_ours(path):
    config = ModelConfig.from_dir(path)
    model = nnx.eval_shape(lambda: model_class_for(config)(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(model)
    return config, nnx.merge(graphdef, load_params(model, path, jnp.float32, progress=False))


def test_ragged_batch_logits_match_transformers(checkpoint):
    arch, path, hf = checkpoint
    config, model = load_ours(path)
    rng = np.random.default_rng(replayable_seed("PARITY_SEED"))
    prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in rng.integers(1, 20, size=4)]
    page_size, pages_per_seq = 4, 8
    kv_pages = jnp.zeros((config.num_layers, 64, page_size, 2 * config.num_kv_heads, config.head_dim))
    lens = np.array([len(p) for p in prompts], np.int32)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    num_tokens = 96  # padded: the tail rows are padding and must not disturb anything
    ids = np.zeros(num_tokens, np.int32)
    ids[: cu[-1]] = np.concatenate(prompts)
    positions = np.zeros(num_tokens, np.int32)
    positions[: cu[-1]] = np.concatenate([np.arange(n) for n in lens])
    page_table = rng.permutation(64)[: 4 * pages_per_seq].reshape(4, pages_per_seq).astype(np.int32)
    meta = AttentionMetadata(jnp.array(lens), jnp.array(page_table), jnp.array(cu), jnp.array([4], jnp.int32))
    inputs = StepInputs(jnp.array(ids), jnp.array(positions), meta, None)
    last_rows = jnp.array(cu[1:] - 1)
    # The reference writing a token-major cache inside the step, layer by layer through the scan.
    in_step = AttentionBackend("reference").with_in_step_write()
    out = model.forward(inputs, kv_pages, in_step)
    logits, written = model.logits(out.hidden[last_rows]), out.kv
    # The jnp serving path through the layer scan: head-major cache, read only, K/V handed back.
    read_only = AttentionBackend("reference")
    deferred = model.forward(inputs, kv_pages.transpose(0, 1, 3, 2, 4), read_only)
    deferred_logits, kv_write = model.logits(deferred.hidden[last_rows]), deferred.kv
    np.testing.assert_allclose(np.asarray(deferred_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    head_major = read_only.write_layers(kv_pages.transpose(0, 1, 3, 2, 4), kv_write)
    np.testing.assert_allclose(np.asarray(head_major), np.asarray(written.transpose(0, 1, 3, 2, 4)),
                               rtol=1e-6, atol=1e-6)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        rel = np.abs(np.asarray(logits[i]) - expected).max() / np.abs(expected).max()
        assert rel < 1e-4, f"{arch} prompt {i}: relative error {rel}"


@pytest.mark.parametrize("attention", ["reference", "auto"])  # auto: the default (the native kernel on CPU)
def test_greedy_decoding_through_engine_matches_transformers(checkpoint, attention):
    from serving.engine import Engine
    from serving.protocol import RequestError
    from serving.request import Task

    arch, path, hf = checkpoint
    engine = Engine(model_path=str(path), page_size=4, max_total_tokens=1024, max_running_requests=4,
                    chunked_prefill_size=16, precompile=False, disable_compilation_cache=True,
                    attention_backend=attention)
    try:
        rng = np.random.default_rng(replayable_seed("PARITY_SEED"))
        prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 9, 21)]  # 21 > chunk: chunked prefill
        outs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0, "max_new_tokens": 32, "ignore_eos": True})
        for prompt, out in zip(prompts, outs, strict=True):
            assert_greedy(hf, prompt, out["output_ids"], 32, label=arch)
            assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 32}
        # Only the served model's task is reachable: an embed request of a causal LM is refused.
        assert engine.task is Task.GENERATE and engine.model_info()["is_generation"] is True
        async def embed():
            async for _ in engine.stream_outputs(engine.parse({"input_ids": prompts[0]}), task=Task.EMBED):
                pass

        with pytest.raises(RequestError, match="embed requests are not supported"):
            asyncio.run(embed())
        counts = engine.page_counts()
        assert counts["free"] + counts["evictable"] + counts["locked"] == counts["total"]
        assert counts["locked"] == 0
    finally:
        engine.shutdown()
