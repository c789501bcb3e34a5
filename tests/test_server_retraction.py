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


def test_retraction_keeps_logprobs_and_penalties_right(small_cache_server, tiny_llama_dir):
    """Retracted requests re-prefill (partly from the radix cache): their input logprobs must still
    cover every asked position once, their output entries every token, and penalties must still see
    the whole output so far."""
    from tests.test_logprobs import check_entry, reference
    from tests.test_penalties import check_penalised_greedy

    rng = np.random.default_rng(replayable_seed("RETRACTION_LOGPROB_SEED"))
    prompts = [rng.integers(3, 384, size=int(n)).tolist() for n in rng.integers(8, 24, size=48)]
    penalty = {"frequency_penalty": 0.8, "repetition_penalty": 1.3}

    def send(i):
        body = {"input_ids": prompts[i], "sampling_params": {
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, **(penalty if i % 3 == 0 else {})}}
        if i % 2 == 0:
            body.update(return_logprob=True, logprob_start_len=i % 5)
        r = small_cache_server.post("/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(send, range(len(prompts))))
    assert sum(out["meta_info"]["total_retractions"] for out in results) > 0, "the cache never ran out"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for i, (ids, out) in enumerate(zip(prompts, results, strict=True)):
        output = out["output_ids"]
        if i % 3 == 0:
            check_penalised_greedy(hf, ids, output, penalty)
        else:
            assert_greedy(hf, ids, output, NEW_TOKENS)
        if i % 2:
            continue
        meta, start = out["meta_info"], i % 5
        rows = reference(hf, ids + output)
        assert len(meta["input_token_logprobs"]) == len(ids) - start
        for j in range(start + 1, len(ids)):
            check_entry(meta["input_token_logprobs"][j - start], rows[j - 1], ids[j])
        assert len(meta["output_token_logprobs"]) == NEW_TOKENS
        for t, token in enumerate(output):
            check_entry(meta["output_token_logprobs"][t], rows[len(ids) - 1 + t], token)
