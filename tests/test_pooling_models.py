"""Pooled model kinds through the runner's pooling step, against transformers: a bare `Qwen2Model`
checkpoint with a sentence-transformers mean-pooling config, a Qwen2 reward model; and the pooled
request bodies (jax-free parsing)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from serving.protocol import RequestError
from serving.protocol.pooling import parse_embeddings_request, parse_encode_request, parse_rerank_request
from tests.conftest import make_tiny_checkpoint, replayable_seed


def run_pooled(path, prompts, **args):
    from serving.config import resolve_runtime_config
    from serving.runner import HostBatch, ModelRunner
    from serving.server_args import ServerArgs

    server_args = ServerArgs(model_path=str(path), page_size=4, max_running_requests=4, chunked_prefill_size=64,
                             max_total_tokens=512, **args)
    runner = ModelRunner(path, resolve_runtime_config(server_args))
    lens = [len(p) for p in prompts]
    pages, first = [], 0
    for n in lens:
        pages.append(list(range(first, first + -(-n // 4))))
        first += len(pages[-1])
    host = HostBatch(np.array(sum(prompts, []), np.int32), np.concatenate([np.arange(n) for n in lens]).astype(np.int32),
                     np.array(lens, np.int32), pages, np.array(lens, np.int32), {})
    return runner, runner.run_pool(host)


@pytest.fixture
def prompts():
    rng = np.random.default_rng(replayable_seed("POOLING_MODELS_SEED"))
    return [rng.integers(3, 384, size=n).tolist() for n in (1, 7, 19)]


def test_bare_decoder_checkpoint_with_mean_pooling_config(tmp_path, prompts, one_torch_thread):
    """`Qwen2Model` names its tensors without `model.` and has no LM head; modules.json + 1_Pooling pick mean
    pooling and a Normalize module."""
    source = make_tiny_checkpoint(tmp_path / "causal", "qwen2")
    bare = transformers.Qwen2Model.from_pretrained(source, dtype=torch.float32).eval()
    path = tmp_path / "bare"
    bare.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((source / name).read_text())
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                 "pooling_mode_cls_token": False}))
    runner, got = run_pooled(path, prompts)
    assert runner.task == "embed" and runner.pooling == ("mean", True)
    for prompt, vector in zip(prompts, got, strict=True):
        with torch.no_grad():
            mean = bare(torch.tensor([prompt])).last_hidden_state[0].mean(0).numpy()
        assert float(vector @ mean / np.linalg.norm(mean)) > 0.9999 and abs(np.linalg.norm(vector) - 1) < 1e-5


def test_qwen2_reward_model_matches_transformers(tmp_path, prompts, one_torch_thread):
    path = make_tiny_checkpoint(tmp_path / "reward", "qwen2-reward", num_labels=3)
    runner, got = run_pooled(path, prompts)
    assert runner.task == "score" and got.shape == (3, 3)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    for prompt, scores in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = hf(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(scores, want, atol=1e-4, rtol=1e-4)


def test_encode_bodies():
    single = parse_encode_request({"text": "a", "model": "ignored", "sampling_params": {"max_new_tokens": 9}})
    assert not single.is_batch and single.items[0].text == "a"
    assert parse_encode_request({"text": ["a"]}).is_batch  # a list of one stays a list
    pairs = parse_encode_request({"text": [["q", "d"], "t"], "rid": ["r1", "r2"]})
    assert [i.pair for i in pairs.items] == [("q", "d"), None] and [i.rid for i in pairs.items] == ["r1", "r2"]
    ids = parse_encode_request({"input_ids": [[1, 2], [3]]})
    assert ids.is_batch and [i.input_ids for i in ids.items] == [[1, 2], [3]]
    for body, message in [({"text": ""}, "text cannot be empty"), ({"input_ids": []}, "input_ids cannot be empty"),
                          ({"text": ["a"], "rid": "r"}, "rid must be a list"),
                          ({"text": "a", "image_data": "x"}, "image_data is not supported yet")]:
        with pytest.raises(RequestError, match=message):
            parse_encode_request(body)


def test_openai_bodies():
    assert parse_embeddings_request({"input": [[1, 2], [3]]}).is_batch
    assert parse_embeddings_request({"input": [1, 2]}).items[0].input_ids == [1, 2]
    with pytest.raises(RequestError, match="encoding_format"):
        parse_embeddings_request({"input": "a", "encoding_format": "int8"})
    with pytest.raises(RequestError, match="Field 'input' is required"):
        parse_embeddings_request({"model": "m"})
    rerank = parse_rerank_request({"query": "q", "documents": ["a", "b"], "top_n": 1})
    assert [i.pair for i in rerank.encode_request().items] == [("q", "a"), ("q", "b")] and rerank.top_n == 1
    with pytest.raises(RequestError, match="top_n must be a positive integer"):
        parse_rerank_request({"query": "q", "documents": ["a"], "top_n": 0})
