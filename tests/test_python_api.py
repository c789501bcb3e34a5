"""`Engine.encode` / `async_encode` (serving/python_api.py), the offline notebook's embeddings: the same
vectors as transformers on a tiny random Qwen2 checkpoint, the `/encode` response shapes (a list for a
list), called from plain code and from inside a running event loop (as a notebook cell is), and `/encode`'s
400 messages as exceptions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import transformers

from serving.protocol import RequestError
from tests.conftest import CORPUS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from serving.engine import Engine

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("python-api-embed"), "qwen2")
    engine = Engine(model_path=str(path), is_embedding=True, precompile=False, page_size=4, max_total_tokens=512,
                    max_running_requests=4, chunked_prefill_size=64)
    yield path, engine
    engine.shutdown()


def transformers_embedding(path, text: str) -> np.ndarray:
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    ids = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json")).encode(text)
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
    return hidden / np.linalg.norm(hidden)


def test_encode_matches_transformers_and_route_shapes(embedder, one_torch_thread):
    path, engine = embedder
    texts = CORPUS[:3]
    single = engine.encode(texts[0])
    assert set(single) == {"embedding", "meta_info"} and single["meta_info"]["prompt_tokens"] > 0
    batch = engine.encode(texts)
    assert isinstance(batch, list) and len(batch) == 3
    assert isinstance(engine.encode([texts[1]]), list)  # a list of one is a list, as on /encode
    for text, item in zip(texts, batch, strict=True):
        np.testing.assert_allclose(item["embedding"], transformers_embedding(path, text), atol=2e-5)
    np.testing.assert_allclose(single["embedding"], batch[0]["embedding"], atol=1e-6)
    by_ids = engine.encode(input_ids=[5, 6, 7])
    assert len(by_ids["embedding"]) == len(single["embedding"])


def test_encode_inside_a_running_loop_and_errors(embedder):
    _, engine = embedder

    async def in_a_notebook_cell():
        blocking = engine.encode("Hello world")  # the caller's loop is running: runs on a thread's own loop
        awaited = await engine.async_encode(text="Hello world")
        return blocking, awaited

    blocking, awaited = asyncio.run(in_a_notebook_cell())
    np.testing.assert_allclose(blocking["embedding"], awaited["embedding"], atol=1e-6)
    with pytest.raises(RequestError, match="text cannot be empty or whitespace only"):
        engine.encode("   ")
    with pytest.raises(RequestError, match="At least one of text, input_ids"):
        engine.encode()
