"""The real server (`python -m serving.main` subprocess) on a tiny random Llama, over plain HTTP."""

from __future__ import annotations

import json
import threading
import time
import uuid

import numpy as np
import pytest
import requests
import torch
import transformers

from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed, sse_lines
from tests.hf_reference import assert_greedy

SERVER_FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--max-running-requests", "8",
                "--chunked-prefill-size", "32", "--random-seed", "0")
# Sanic's own response timeout (60 s by default) read from the environment: set far below what a request
# here takes, so any HTTP-layer limit that could cut a generation short shows up in these tests.
SANIC_TIMEOUT_ENV = {"SANIC_RESPONSE_TIMEOUT": "0.2"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *SERVER_FLAGS, env=SANIC_TIMEOUT_ENV)
    yield proc
    assert proc.stop() == 0, "SIGTERM must end the server with exit code 0"


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_llama_dir):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tiny_llama_dir / "tokenizer.json"))


_RNG = None


def random_ids(n, rng=None):
    """Fresh random prompt ids; one generator per test session, seeded by SERVER_TEST_SEED (printed)."""
    global _RNG
    if rng is None:
        _RNG = _RNG or np.random.default_rng(replayable_seed("SERVER_TEST_SEED"))
        rng = _RNG
    return rng.integers(3, 384, size=n).tolist()


def page_counts(server):
    info = server.get("/get_server_info").json()
    return info["internal_states"][0]["kv_pages"]


def wait_idle(server, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = server.get("/get_load").json()[0]
        if load["num_reqs"] == 0:
            counts = page_counts(server)
            if counts["locked"] == 0:
                return counts
        time.sleep(0.2)
    raise AssertionError(f"server not idle: {server.get('/get_load').json()}")


def sse_events(response):
    events = []
    for line in sse_lines(response):
        if line:
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
    return events


def test_model_info_has_exactly_the_walkthrough_keys(server, tiny_llama_dir):
    info = server.get("/get_model_info").json()
    assert info.keys() == {"model_path", "is_generation", "tokenizer_path", "preferred_sampling_params",
                           "weight_version"}
    assert info["model_path"] == str(tiny_llama_dir)
    assert info["is_generation"] is True and info["preferred_sampling_params"] is None
    assert server.get("/model_info").json() == info


def test_server_info_and_models(server):
    info = server.get("/get_server_info").json()
    assert isinstance(info["max_total_num_tokens"], int) and info["max_total_num_tokens"] == 4096
    assert isinstance(info["version"], str) and info["max_req_input_len"] > 0
    assert info["page_size"] == 4 and info["api_key"] is None
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == info["model_path"]
    assert models["data"][0]["owned_by"] == "sglang" and models["data"][0]["parent"] is None
    assert server.get("/health").status_code == 200
    assert server.get("/health_generate").status_code == 200


def test_greedy_text_matches_transformers(server, hf_model, hf_tokenizer):
    prompt = "The capital of France is"
    out = server.post("/generate", json={"text": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}).json()
    ids = hf_tokenizer(prompt)["input_ids"]
    assert_greedy(hf_model, ids, out["output_ids"], 24)
    assert out["text"] == hf_tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 24
    assert meta["finish_reason"] == {"type": "length", "length": 24}
    assert meta["weight_version"] == "default" and meta["e2e_latency"] > 0


def test_long_request_is_not_cut_by_the_http_layer(server):
    """A non-streamed request that runs longer than Sanic's response timeout (0.2 s here, 60 s by default)
    still gets its whole answer (it used to be a 503 "Response Timeout")."""
    body = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 240, "ignore_eos": True}}
    resp = server.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    print("e2e_latency", out["meta_info"]["e2e_latency"])
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 240}
    assert len(out["output_ids"]) == 240


def test_stream_is_cumulative_and_ends_with_done(server):
    ids = random_ids(11)
    body = {"input_ids": ids, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                                  "ignore_eos": True}}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 12
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
        assert after["text"].startswith(before["text"].rstrip("\ufffd"))
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert "e2e_latency" in chunks[-1]["meta_info"] and "e2e_latency" not in chunks[0]["meta_info"]
    full = server.post("/generate", json={**body, "stream": False}).json()
    assert chunks[-1]["output_ids"] == full["output_ids"] and chunks[-1]["text"] == full["text"]


def test_stream_output_sends_only_new_ids(tiny_llama_dir, server):
    """With --stream-output each chunk's output_ids holds only the ids new since the previous chunk (per
    item in a batch); text stays cumulative (contract 3.7)."""
    delta_server = ServerProcess(tiny_llama_dir, *SERVER_FLAGS, "--stream-output")
    try:
        prompts = [random_ids(11), random_ids(6)]
        params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        full = server.post("/generate", json={"input_ids": prompts, "sampling_params": params}).json()
        body = {"input_ids": prompts[0], "stream": True, "sampling_params": params}
        with requests.post(delta_server.url + "/generate", json=body, stream=True, timeout=120) as r:
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert [len(c["output_ids"]) for c in chunks] == [1] * 12
        assert [i for c in chunks for i in c["output_ids"]] == full[0]["output_ids"]
        for before, after in zip(chunks, chunks[1:], strict=False):
            assert after["text"].startswith(before["text"].rstrip("\ufffd"))
        assert chunks[-1]["text"] == full[0]["text"]
        assert chunks[-1]["meta_info"]["completion_tokens"] == 12
        with requests.post(delta_server.url + "/generate", json={**body, "input_ids": prompts}, stream=True,
                           timeout=120) as r:
            batch = [json.loads(e) for e in sse_events(r)[:-1]]
        for index in (0, 1):
            ids = [i for c in batch if c["index"] == index for i in c["output_ids"]]
            assert ids == full[index]["output_ids"]
        plain = delta_server.post("/generate", json={**body, "stream": False}).json()
        assert plain["output_ids"] == full[0]["output_ids"]  # non-streamed responses are whole
    finally:
        assert delta_server.stop() == 0


def test_cached_tokens_cover_the_shared_prefix(server):
    ids = random_ids(41)
    params = {"temperature": 0, "max_new_tokens": 2}
    first = server.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    assert first["meta_info"]["cached_tokens"] == 0
    again = server.post("/generate", json={"input_ids": ids, "sampling_params": params}).json()
    assert again["meta_info"]["cached_tokens"] == 40  # page-aligned, the last prompt token recomputed
    assert again["output_ids"] == first["output_ids"]
    longer = server.post("/generate", json={"input_ids": ids + random_ids(10), "sampling_params": params}).json()
    assert longer["meta_info"]["cached_tokens"] >= 40


def test_batch_and_parallel_samples(server, hf_model):
    prompts = [random_ids(5), random_ids(17)]
    out = server.post("/generate", json={"input_ids": prompts, "rid": "batch", "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}).json()
    assert [o["meta_info"]["id"] for o in out] == ["batch_0", "batch_1"]
    for prompt, o in zip(prompts, out, strict=True):
        assert_greedy(hf_model, prompt, o["output_ids"], 6)
    samples = server.post("/generate", json={"text": "Once upon a time", "sampling_params": {
        "n": 3, "temperature": 1.0, "max_new_tokens": 5, "ignore_eos": True}}).json()
    assert isinstance(samples, list) and len(samples) == 3
    assert len({o["meta_info"]["id"] for o in samples}) == 3


def test_seeded_sampling_is_reproducible(server):
    body = {"text": "Hello world", "sampling_params": {"temperature": 0.9, "top_p": 0.9, "top_k": 50,
                                                       "max_new_tokens": 16, "sampling_seed": 1234,
                                                       "ignore_eos": True}}
    a = server.post("/generate", json=body).json()["output_ids"]
    b = server.post("/generate", json=body).json()["output_ids"]
    assert a == b


def test_stop_strings_and_stop_token_ids(server, hf_model, hf_tokenizer):
    ids = hf_tokenizer("Hello world")["input_ids"]
    expected = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}).json()["output_ids"]
    assert_greedy(hf_model, ids, expected, 16)
    stop_id = expected[5]
    out = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "stop_token_ids": [stop_id]}}).json()
    first = expected.index(stop_id)
    assert out["output_ids"] == expected[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    full_text = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}).json()["text"]
    stop = full_text[4:6]
    if not stop.strip("\ufffd"):
        pytest.skip("random tokens decoded to replacement characters only")
    cut = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "stop": [stop], "ignore_eos": True}}).json()
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert cut["text"] == full_text[: full_text.find(stop)]
    kept = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "stop": [stop], "no_stop_trim": True, "ignore_eos": True}}).json()
    assert kept["text"].startswith(cut["text"] + stop)  # the whole last token is kept


BAD_REQUESTS = [
    ({}, "Either text, input_ids or input_embeds should be provided."),
    ({"text": ""}, "texts cannot be empty and tokenizer must be initialized"),
    ({"input_ids": []}, "input_ids cannot be empty."),
    ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature must be non-negative, got -1."),
    ({"text": "hi", "sampling_params": {"top_p": 0}}, "top_p must be in (0, 1], got 0."),
    ({"text": "hi", "sampling_params": {"top_k": 0}}, "top_k must be -1 (disable) or at least 1, got 0."),
    ({"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0, got -1."),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "Unknown sampling parameter 'bogus'"),
    ({"text": "hi", "sampling_params": {"frequency_penalty": 2.5}}, "frequency_penalty must be in [-2, 2], got 2.5."),
    ({"input_ids": [1, 2, 100000]}, "out of vocabulary"),
    ({"input_ids": list(range(1, 300))}, "is longer than the model's context length (256 tokens)"),
    ({"text": ["a", "b"], "rid": ["x"]}, "The specified rids length mismatch with the batch_size for batch processing."),
    ([1, 2, 3], "JSON object"),
]


@pytest.mark.parametrize("body,message", BAD_REQUESTS)
def test_bad_input_is_400_with_a_clear_message(server, body, message):
    r = server.post("/generate", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"] if "error" in r.json() else r.json()
    assert message in error["message"]


def test_malformed_json_and_unknown_route(server):
    r = server.post("/generate", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == 400 and r.json()["type"] == "Bad Request"
    assert server.get("/no_such_route").status_code == 404
    ok = server.post("/generate", json={"text": "still serving", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_stream_validation_error_is_an_event(server):
    body = {"text": "hi", "stream": True, "sampling_params": {"temperature": -2}}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert "temperature must be non-negative" in json.loads(events[0])["error"]["message"]


def test_abort_request_finishes_with_abort_and_frees_pages(server):
    rid = uuid.uuid4().hex
    body = {"input_ids": random_ids(9), "rid": rid, "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0}}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=120) as r:
        lines = sse_lines(r)
        next(line for line in lines if line)  # the request is running
        assert server.post("/abort_request", json={"rid": rid}).status_code == 200
        events = [line[len("data: "):] for line in lines if line]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 200
    counts = wait_idle(server)
    assert counts["free"] + counts["evictable"] + counts["locked"] == counts["total"]
    assert counts["invariant_errors"] == 0


def test_client_disconnect_aborts_and_frees_pages(server):
    body = {"input_ids": random_ids(9), "stream": True,
            "sampling_params": {"max_new_tokens": 220, "ignore_eos": True, "temperature": 0}}
    r = requests.post(server.url + "/generate", json=body, stream=True, timeout=120)
    lines = sse_lines(r)
    next(line for line in lines if line)
    r.close()
    counts = wait_idle(server)
    assert counts["locked"] == 0 and counts["invariant_errors"] == 0


def test_flush_cache_refused_while_busy(server):
    body = {"input_ids": random_ids(9), "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    worker = threading.Thread(target=server.post, args=("/generate",), kwargs={"json": body})
    worker.start()
    deadline = time.monotonic() + 30
    while server.get("/get_load").json()[0]["num_reqs"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    busy = server.post("/flush_cache")
    worker.join()
    assert busy.status_code == 400 and busy.text.startswith("Cache flushed.")
    wait_idle(server)
    idle = server.post("/flush_cache")
    assert idle.status_code == 200
    assert idle.text == ("Cache flushed.\nPlease check backend logs for more details. (When there are running "
                         "or waiting requests, the operation will not be performed.)\n")
    counts = page_counts(server)
    assert counts["free"] == counts["total"]


def test_update_weights_from_disk(server, tiny_llama_dir, tmp_path, hf_model):
    ids = random_ids(7)
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
    before = server.post("/generate", json=body).json()["output_ids"]

    same = server.post("/update_weights_from_disk", json={"model_path": str(tiny_llama_dir)})
    assert same.status_code == 200
    assert same.json() == {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    missing = server.post("/update_weights_from_disk", json={"model_path": "qwen/qwen2.5-0.5b-instruct-wrong"})
    assert missing.status_code == 400
    assert missing.json()["message"] == ("Failed to get weights iterator: qwen/qwen2.5-0.5b-instruct-wrong "
                                         "(repository not found).")

    other_shape = make_tiny_checkpoint(tmp_path / "wide", "llama", hidden_size=96)
    wrong = server.post("/update_weights_from_disk", json={"model_path": str(other_shape)}).json()
    assert wrong["success"] is False and wrong["message"].startswith("Failed to update weights: ")
    assert wrong["message"].endswith("Rolling back to original weights.")
    assert server.post("/generate", json=body).json()["output_ids"] == before  # nothing changed

    other = make_tiny_checkpoint(tmp_path / "other", "llama")
    swapped = server.post("/update_weights_from_disk", json={"model_path": str(other), "weight_version": "v2"})
    assert swapped.json()["message"] == "Succeeded to update model weights. Weight version updated to v2."
    out = server.post("/generate", json=body).json()
    other_hf = transformers.AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    assert_greedy(other_hf, ids, out["output_ids"], 8)
    assert out["meta_info"]["weight_version"] == "v2"
    assert server.get("/get_model_info").json()["model_path"] == str(other)
    assert server.get("/v1/models").json()["data"][0]["id"] == str(other)

    back = server.post("/update_weights_from_disk", json={"model_path": str(tiny_llama_dir), "weight_version": "default"})
    assert back.json()["success"] is True
    assert_greedy(hf_model, ids, server.post("/generate", json=body).json()["output_ids"], 8)
