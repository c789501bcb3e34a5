"""64 concurrent requests against a KV cache far too small for them: retraction must kick in, and every
request must still finish with exactly transformers' greedy output, with no page leaked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import transformers

from tests.conftest import ServerProcess, replayable_seed
from tests.hf_reference import assert_greedy

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def small_cache_server(tiny_llama_dir):
    # 80 pages of 4 tokens; 16 running requests of ~44 tokens each would need ~180 pages.
    proc = ServerProcess(tiny_llama_dir, "--page-size", "4", "--max-total-tokens", "320",
                         "--max-running-requests", "16", "--chunked-prefill-size", "64")
    yield proc
    assert proc.stop() == 0


def test_64_concurrent_requests_with_retraction(small_cache_server, tiny_llama_dir):
    rng = np.random.default_rng(replayable_seed("RETRACTION_TEST_SEED"))
    prompts = [rng.integers(3, 384, size=int(n)).tolist() for n in rng.integers(8, 24, size=64)]

    def send(ids):
        r = small_cache_server.post("/generate", json={"input_ids": ids, "sampling_params": {
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(send, prompts))

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for ids, out in zip(prompts, results, strict=True):
        assert_greedy(hf, ids, out["output_ids"], NEW_TOKENS)
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW_TOKENS}
    assert sum(out["meta_info"]["total_retractions"] for out in results) > 0, "the cache never ran out"
    pages = small_cache_server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert pages["locked"] == 0 and pages["invariant_errors"] == 0
    assert pages["free"] + pages["evictable"] == pages["total"]
