"""Model features beyond the plain decoder, against transformers: rope scaling (linear, llama3, yarn) and
sliding windows (Qwen2's `use_sliding_window` + `max_window_layers`, Mistral's window on every layer).

Each variant is a tiny random checkpoint. Logits are compared over two steps through the default attention
path (the native CPU kernel where it builds): a ragged prefill, then one more token per sequence read back
from the paged cache, at positions past the window. Greedy tokens are compared through the engine, and for
the mixed-window Qwen2 also through the real server.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from checkpoints.safetensors import load_params
from kernels.attention import resolve_attention_backend
from model.config import ModelConfig
from model.interface import AttentionMetadata, StepInputs
from model.registry import model_class_for
from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy

VARIANTS = {
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64}}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
}
PAGE = 4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    arch, overrides = VARIANTS[request.param]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, path, hf


def test_config_reads_the_variant(variant):
    name, path, hf = variant
    config = ModelConfig.from_dir(path)
    if name == "qwen2-window":
        assert config.layer_windows == (None, 8)  # layers from max_window_layers (1) on
    elif name == "mistral-window":
        assert config.layer_windows == (8, 8)
    else:
        assert config.layer_windows == (None, None) and config.rope_scaling["rope_type"] == name.split("-")[1]


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].numpy()


def test_logits_match_transformers_through_the_default_attention(variant, one_torch_thread):
    name, path, hf = variant
    rng = np.random.default_rng(replayable_seed("FIDELITY_SEED"))
    config = ModelConfig.from_dir(path)
    abstract = nnx.eval_shape(lambda: model_class_for(config)(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    model = nnx.merge(nnx.split(abstract)[0], load_params(abstract, path, jnp.float32, progress=False))
    backend = resolve_attention_backend("auto", head_dim=config.head_dim, page_size=PAGE,
                                        num_kv_heads=config.num_kv_heads, cache_dtype=jnp.float32)
    prompts = [rng.integers(1, config.vocab_size, size=n).tolist() for n in (5, 23, 41)]  # windows are 8
    lens = np.array([len(p) for p in prompts], np.int32)
    pages_per_seq = 12
    page_table = rng.permutation(64)[: 3 * pages_per_seq].reshape(3, pages_per_seq).astype(np.int32)
    cache = jnp.zeros((config.num_layers, 64, 2 * config.num_kv_heads, PAGE, config.head_dim), backend.storage_dtype)

    def step(ids, positions, kv_lens, q_lens, cache):
        cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        meta = AttentionMetadata(jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.asarray(cu), jnp.array([3], jnp.int32))
        out = model.forward(StepInputs(jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), meta, None),
                            cache, backend)
        return np.asarray(model.logits(out.hidden[cu[1:] - 1])), backend.write_layers(cache, out.kv)

    first, cache = step(np.concatenate(prompts), np.concatenate([np.arange(n) for n in lens]), lens, lens, cache)
    nxt = [int(np.argmax(_hf_logits(hf, p))) for p in prompts]
    second, _ = step(np.array(nxt), lens, lens + 1, np.ones(3, np.int32), cache)
    for i, prompt in enumerate(prompts):
        for ours, ids in ((first[i], prompt), (second[i], prompt + [nxt[i]])):
            expected = _hf_logits(hf, ids)
            rel = np.abs(ours - expected).max() / np.abs(expected).max()
            assert rel < 1e-4, f"{name} ({backend.label}) prompt {i} at {len(ids)} tokens: relative error {rel}"


def test_greedy_tokens_match_transformers_through_the_engine(variant, one_torch_thread):
    from serving.engine import Engine

    name, path, hf = variant
    rng = np.random.default_rng(replayable_seed("FIDELITY_SEED"))
    engine = Engine(model_path=str(path), page_size=PAGE, max_total_tokens=1024, max_running_requests=4,
                    chunked_prefill_size=16, precompile=False, disable_compilation_cache=True)
    try:
        prompts = [rng.integers(1, 384, size=n).tolist() for n in (6, 27)]  # 27 > chunk: chunked prefill
        outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 24,
                                                                   "ignore_eos": True})
        for prompt, out in zip(prompts, outs, strict=True):
            assert_greedy(hf, prompt, out["output_ids"], 24, label=name)
    finally:
        engine.shutdown()


SERVED = {
    # A full-attention first layer and a windowed second one.
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norms
}


@pytest.mark.parametrize("name", list(SERVED))
def test_through_the_server_with_default_flags(tmp_path, one_torch_thread, name):
    arch, overrides = SERVED[name]
    path = make_tiny_checkpoint(tmp_path / name, arch, **overrides)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(replayable_seed("FIDELITY_SEED"))
    server = ServerProcess(path, "--page-size", "4", "--max-total-tokens", "1024", "--chunked-prefill-size", "16")
    try:
        prompts = [rng.integers(1, 384, size=n).tolist() for n in (4, 30)]
        out = server.post("/generate", json={"input_ids": prompts, "sampling_params": {
            "temperature": 0, "max_new_tokens": 20, "ignore_eos": True}}).json()
        for prompt, result in zip(prompts, out, strict=True):
            assert_greedy(hf, prompt, result["output_ids"], 20, label=name)
    finally:
        assert server.stop() == 0
