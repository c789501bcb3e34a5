"""Embedding, reward and rerank models through the real server (`python -m serving.main`), against
transformers on tiny random checkpoints: /encode, /classify, /v1/embeddings, /v1/rerank, and their errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
import transformers

from tests.conftest import ServerProcess, make_tiny_checkpoint

FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--max-running-requests", "8",
         "--chunked-prefill-size", "64", "--random-seed", "0")
TEXTS = ["The capital of France is Paris.", "Hello", "def add(a, b):\n    return a + b\n",
         "Once upon a time there was a small model that answered questions about the world."]
IS_EMBEDDING = ("This model does not appear to be an embedding model by default. Please add `--is-embedding` "
                "when launching the server or try another model.")


def hf_tokenizer(path):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("embed-qwen2"), "qwen2")


@pytest.fixture(scope="module")
def embed_server(embed_dir):
    proc = ServerProcess(embed_dir, *FLAGS, "--is-embedding")
    yield proc
    assert proc.stop() == 0


def hf_embeddings(path, texts):
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tok = hf_tokenizer(path)
    out = []
    for text in texts:
        with torch.no_grad():
            hidden = model(torch.tensor([tok.encode(text)])).last_hidden_state[0, -1].numpy()
        out.append(hidden / np.linalg.norm(hidden))
    return out


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_encode_matches_transformers(embed_server, embed_dir, one_torch_thread):
    want = hf_embeddings(embed_dir, TEXTS)
    info = embed_server.get("/get_model_info").json()
    assert info["is_generation"] is False
    single = embed_server.post("/encode", json={"model": "x", "text": TEXTS[0]}).json()
    assert cosine(single["embedding"], want[0]) > 0.9999
    assert abs(np.linalg.norm(single["embedding"]) - 1) < 1e-5
    meta = single["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    assert "completion_tokens" not in meta and "cached_tokens" not in meta
    assert meta["prompt_tokens"] == len(hf_tokenizer(embed_dir).encode(TEXTS[0]))
    batch = embed_server.post("/encode", json={"text": TEXTS}).json()  # mixed lengths in one batch
    assert all(cosine(item["embedding"], w) > 0.9999 for item, w in zip(batch, want, strict=True))
    one = embed_server.post("/classify", json={"text": [TEXTS[1]]}).json()  # a list of one is a list
    assert isinstance(one, list) and len(one) == 1 and cosine(one[0]["embedding"], want[1]) > 0.9999
    ids = hf_tokenizer(embed_dir).encode(TEXTS[2])
    by_ids = embed_server.post("/encode", json={"input_ids": [ids, ids[:3]]}).json()
    assert cosine(by_ids[0]["embedding"], want[2]) > 0.9999 and len(by_ids) == 2


def test_v1_embeddings_shape_usage_and_base64(embed_server, embed_dir, one_torch_thread):
    want = hf_embeddings(embed_dir, TEXTS[:2])
    body = embed_server.post("/v1/embeddings", json={"model": "m", "input": TEXTS[:2]}).json()
    assert body["object"] == "list" and body["model"] == str(embed_dir)
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["object"] == "embedding"
    assert cosine(body["data"][1]["embedding"], want[1]) > 0.9999
    tokens = sum(len(hf_tokenizer(embed_dir).encode(t)) for t in TEXTS[:2])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None, "reasoning_tokens": 0}
    packed = embed_server.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    assert cosine(vector, want[0]) > 0.9999


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/embeddings", {"input": ""}, "Input cannot be empty"),
    ("/v1/embeddings", {"input": "  "}, "Input cannot be empty or whitespace only"),
    ("/v1/embeddings", {"input": ["a", " "]}, "Input at index 1 cannot be empty or whitespace only"),
    ("/v1/embeddings", {"input": ["a", 3]}, "All items in input list must be strings"),
    ("/v1/embeddings", {"input": [3, -1]}, "Token ID at index 1 must be non-negative"),
    ("/v1/embeddings", {"input": "a", "dimensions": 8},
     "does not support matryoshka representation, changing output dimensions will lead to poor results."),
    ("/encode", {"text": "   "}, "text cannot be empty or whitespace only"),
    ("/encode", {"text": "a", "input_ids": [1]}, "text and input_ids cannot be provided at the same time"),
    ("/encode", {"model": "x"}, "At least one of text, input_ids, or image should be provided"),
    ("/encode", {"text": [["what?", "a document"]]}, "This model is not a cross-encoder"),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}, "This model is not a cross-encoder"),
    ("/encode", {"text": ["a", "b"], "rid": ["x", "x"]}, "Duplicate request ID detected: x"),
])
def test_bad_input_is_400_and_the_server_keeps_serving(embed_server, path, body, message):
    response = embed_server.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    text = error["message"] if path.startswith("/v1") else error["error"]["message"]
    assert message in text
    if path.startswith("/v1"):
        assert error["object"] == "error" and error["type"] == "BadRequestError" and error["code"] == 400
    assert embed_server.post("/encode", json={"text": "still here"}).status_code == 200


def test_generate_on_an_embedding_model_is_400(embed_server):
    response = embed_server.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert response.status_code == 400 and "generate requests are not supported" in response.json()["error"]["message"]


def test_reward_model_scores_like_transformers(tmp_path_factory, one_torch_thread):
    """The walk-through's reward flow: chat-templated conversations to /classify, `embedding[0]` is the reward."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("reward"), "llama-reward")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = hf_tokenizer(path)
    tok.chat_template = transformers.AutoTokenizer.from_pretrained(path).chat_template
    convs = [[{"role": "user", "content": "Hello world!"}, {"role": "assistant", "content": answer}]
             for answer in ("The capital of France is Paris.", "Rome", "def add(a, b): return a + b")]
    prompts = tok.apply_chat_template(convs, tokenize=False)
    proc = ServerProcess(path, *FLAGS)  # a sequence classifier needs no --is-embedding
    try:
        assert proc.get("/get_model_info").json()["is_generation"] is False
        responses = proc.post("/classify", json={"model": "m", "text": prompts}).json()
        single = proc.post("/classify", json={"text": prompts[1]}).json()
        for prompt, response in zip(prompts, responses, strict=True):
            with torch.no_grad():
                want = hf(torch.tensor([tok.encode(prompt)])).logits[0].tolist()
            assert len(response["embedding"]) == 1 and abs(response["embedding"][0] - want[0]) < 1e-4
        # The same prompt alone: its rows may take another product path than in the batch (XLA's dot above
        # 64 rows, the native kernel below; the radix cache may hold its prefix, leaving one row), so the
        # two agree to float32 rounding (seen up to 1.05e-5 on a reward of 1.65), not bit for bit.
        assert single["embedding"][0] == pytest.approx(responses[1]["embedding"][0], rel=2e-5, abs=1e-5)
    finally:
        assert proc.stop() == 0


def test_rerank_matches_transformers_cross_encoder(tmp_path_factory, one_torch_thread):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("reranker"), "xlm-roberta")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = hf_tokenizer(path)
    query, documents = "what is the capital of France?", TEXTS
    want = []
    for doc in documents:
        with torch.no_grad():
            want.append(hf(**tok(query, doc, return_tensors="pt")).logits[0, 0].item())
    proc = ServerProcess(path, *FLAGS, "--is-embedding")
    try:
        ranked = proc.post("/v1/rerank", json={"model": "m", "query": query, "documents": documents}).json()
        assert [item["index"] for item in ranked] == sorted(range(4), key=lambda i: -want[i])
        for item in ranked:
            assert abs(item["score"] - want[item["index"]]) < 1e-4
            assert item["document"] == documents[item["index"]] and item["meta_info"]["prompt_tokens"] > 0
        top = proc.post("/v1/rerank", json={"query": query, "documents": documents, "top_n": 2,
                                            "return_documents": False}).json()
        assert [t["index"] for t in top] == [r["index"] for r in ranked[:2]] and "document" not in top[0]
        pairs = proc.post("/encode", json={"text": [[query, documents[0]]]}).json()
        assert abs(pairs[0]["embedding"][0] - want[0]) < 1e-4
        for body, message in [({"query": "", "documents": ["a"]}, "Query cannot be empty"),
                              ({"query": " ", "documents": ["a"]}, "Query cannot be empty or whitespace only"),
                              ({"query": "q", "documents": []}, "Documents cannot be empty"),
                              ({"query": "q", "documents": ["a", ""]}, "Each document must be a non-empty string"),
                              ({"query": "q", "documents": [" "]}, "Each document cannot be empty or whitespace only")]:
            response = proc.post("/v1/rerank", json=body)
            assert response.status_code == 400 and response.json()["message"] == message
    finally:
        assert proc.stop() == 0


def test_pooled_routes_on_a_generation_model_are_400(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    try:
        encode = proc.post("/encode", json={"text": "hi"})
        assert encode.status_code == 400 and encode.json() == {"error": {"message": IS_EMBEDDING}}
        for path, body in [("/v1/embeddings", {"input": "hi"}), ("/v1/rerank", {"query": "q", "documents": ["d"]})]:
            response = proc.post(path, json=body)
            assert response.status_code == 400 and response.json()["message"] == IS_EMBEDDING
        assert proc.get("/get_model_info").json()["is_generation"] is True
    finally:
        assert proc.stop() == 0
