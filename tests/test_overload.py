"""Overload without loss, through the real server: 500 concurrent requests of mixed lengths against a KV
cache sized for about 8 of them, some streamed, some abandoned by their clients while queued or while
running. Every request that stays finishes with transformers' greedy tokens, every stream's chunks add up
to exactly its tokens (retraction and requeue never duplicate or drop one), and every page comes back."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import transformers

from tests.conftest import ServerProcess, replayable_seed, sse_lines
from tests.hf_reference import assert_greedy

NEW_TOKENS = 12
REQUESTS = 500


@pytest.fixture(scope="module")
def overload_server(tiny_llama_dir):
    # 96 pages of 4 tokens: about 8 requests of ~48 tokens (prompt + output) at once.
    proc = ServerProcess(tiny_llama_dir, "--page-size", "4", "--max-total-tokens", "384",
                         "--max-running-requests", "32", "--chunked-prefill-size", "64", "--stream-output")
    yield proc
    assert proc.stop() == 0


def _body(ids, stream):
    return {"input_ids": ids, "stream": stream,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}}


def _send(url, ids, kind):
    """kind: "plain", "stream", "leave-queued" (gone before any answer), "leave-running" (after a chunk)."""
    if kind == "plain":
        r = requests.post(url, json=_body(ids, False), timeout=600)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"], r.json()["meta_info"]
    if kind == "leave-queued":
        try:
            requests.post(url, json=_body(ids, False), timeout=0.05)
        except requests.exceptions.Timeout:
            pass
        return None
    with requests.post(url, json=_body(ids, True), stream=True, timeout=600) as r:
        assert r.status_code == 200
        chunks = []
        for line in sse_lines(r):
            if not line:
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunks.append(json.loads(data))
            if kind == "leave-running":
                return None  # closing the response drops the connection mid-generation
    ids_streamed = [token for chunk in chunks for token in chunk["output_ids"]]
    return ids_streamed, chunks[-1]["meta_info"]


def test_500_concurrent_requests_on_a_cache_for_8(overload_server, tiny_llama_dir):
    rng = np.random.default_rng(replayable_seed("OVERLOAD_TEST_SEED"))
    prompts = [rng.integers(3, 384, size=int(n)).tolist() for n in rng.integers(4, 40, size=REQUESTS)]
    kinds = rng.choice(["plain"] * 8 + ["stream", "leave-queued", "leave-running"], size=REQUESTS).tolist()
    url = overload_server.url + "/generate"
    with ThreadPoolExecutor(REQUESTS) as pool:
        results = list(pool.map(lambda args: _send(url, *args), zip(prompts, kinds, strict=True)))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    finished = 0
    for ids, kind, result in zip(prompts, kinds, results, strict=True):
        if kind.startswith("leave"):
            continue
        output_ids, meta = result
        assert meta["finish_reason"] == {"type": "length", "length": NEW_TOKENS}, (kind, meta)
        assert_greedy(hf, ids, output_ids, NEW_TOKENS, label=kind)  # a stream's chunks: no token twice or lost
        finished += 1
    assert finished >= REQUESTS // 2
    retractions = [r[1]["total_retractions"] for r in results if r is not None]
    assert sum(retractions) > 0, "the cache never ran out"

    deadline = time.monotonic() + 60
    while overload_server.get("/get_load").json()[0]["num_reqs"]:
        assert time.monotonic() < deadline, overload_server.get("/get_load").json()
        time.sleep(0.2)
    pages = overload_server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert pages["locked"] == 0 and pages["invariant_errors"] == 0
    assert pages["free"] + pages["evictable"] == pages["total"]
