"""Logprobs on /generate (contract 3.6) through the real server on a tiny Llama, against transformers.

Every reported number is checked against log_softmax of transformers' logits over prompt + output
(teacher-forced), within 1e-4; top-k lists must hold transformers' top-k (ids equal except where two
logprobs are a float32 near-tie). The prefill chunk is 8 tokens, so input logprobs span several steps;
a second request for a cached prompt shows the radix cache does not hide the positions asked for.
LOGPROB_TEST_SEED replays the prompts.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from tests.conftest import ServerProcess, replayable_seed, sse_lines

VOCAB = 384
TOLERANCE = 1e-4
FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--max-running-requests", "8",
         "--chunked-prefill-size", "8", "--random-seed", "0")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("LOGPROB_TEST_SEED"))


def reference(hf, ids: list[int]) -> np.ndarray:
    """log_softmax of transformers' logits at every position of `ids` (row i predicts ids[i + 1])."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_entry(entry, row: np.ndarray, token_id: int, text=None) -> None:
    logprob, got_id, got_text = entry
    assert got_id == token_id and got_text == text, (entry, token_id, text)
    assert abs(logprob - row[token_id]) <= TOLERANCE, (entry, row[token_id])


def check_top(entries, row: np.ndarray, k: int) -> None:
    assert len(entries) == k
    want = np.sort(row)[::-1][:k]
    got = np.array([e[0] for e in entries])
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    for logprob, token_id, _ in entries:  # each id's own logprob is what it claims
        assert abs(row[token_id] - logprob) <= TOLERANCE


def generate(server, **body):
    r = server.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_logprobs_match_transformers(server, hf_model, tokenizer, rng):
    prompt = rng.integers(3, VOCAB, size=int(rng.integers(12, 30))).tolist()
    asked = sorted(set(rng.integers(0, VOCAB, size=3).tolist()))
    out = generate(server, input_ids=prompt, return_logprob=True, logprob_start_len=0, top_logprobs_num=5,
                   token_ids_logprob=asked, return_text_in_logprobs=True,
                   sampling_params={"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    meta, output = out["meta_info"], out["output_ids"]
    rows = reference(hf_model, prompt + output)
    text = lambda t: tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    assert meta["prompt_tokens"] == len(meta["input_token_logprobs"]) == len(prompt)
    assert meta["input_token_logprobs"][0] == [None, prompt[0], text(prompt[0])]
    assert meta["input_top_logprobs"][0] is None and meta["input_token_ids_logprobs"][0] is None
    for j in range(1, len(prompt)):
        row = rows[j - 1]
        check_entry(meta["input_token_logprobs"][j], row, prompt[j], text(prompt[j]))
        check_top(meta["input_top_logprobs"][j], row, 5)
        for entry, token_id in zip(meta["input_token_ids_logprobs"][j], asked, strict=True):
            check_entry(entry, row, token_id, text(token_id))
    assert len(meta["output_token_logprobs"]) == meta["completion_tokens"] == len(output) == 8
    for t, token_id in enumerate(output):
        row = rows[len(prompt) - 1 + t]
        check_entry(meta["output_token_logprobs"][t], row, token_id, text(token_id))
        check_top(meta["output_top_logprobs"][t], row, 5)
        assert meta["output_top_logprobs"][t][0][1] == token_id or (
            row.max() - row[token_id] <= TOLERANCE)  # greedy: the top entry is the chosen token
        for entry, asked_id in zip(meta["output_token_ids_logprobs"][t], asked, strict=True):
            check_entry(entry, row, asked_id, text(asked_id))


def test_default_start_and_prefill_only(server, hf_model, rng):
    prompt = rng.integers(3, VOCAB, size=9).tolist()
    out = generate(server, input_ids=prompt, return_logprob=True,
                   sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
    meta = out["meta_info"]
    assert meta["input_token_logprobs"] == [[None, prompt[-1], None]]
    assert "input_top_logprobs" not in meta and "output_token_ids_logprobs" not in meta
    rows = reference(hf_model, prompt + out["output_ids"])
    for t, entry in enumerate(meta["output_token_logprobs"]):
        check_entry(entry, rows[len(prompt) - 1 + t], out["output_ids"][t])
    # max_new_tokens 0: no input entry, still one output entry (the would-be next token; /v1/score uses it).
    # Asking for the whole vocabulary as top logprobs works too (the padded width exceeds it).
    scored = generate(server, input_ids=prompt, return_logprob=True, top_logprobs_num=VOCAB,
                      sampling_params={"temperature": 0, "max_new_tokens": 0})["meta_info"]
    assert scored["completion_tokens"] == 0 and scored["input_token_logprobs"] == []
    (entry,) = scored["output_token_logprobs"]
    check_entry(entry, rows[len(prompt) - 1], int(rows[len(prompt) - 1].argmax()))
    check_top(scored["output_top_logprobs"][0], rows[len(prompt) - 1], VOCAB)


def test_start_len_inside_a_cached_prefix(server, hf_model, rng):
    prompt = rng.integers(3, VOCAB, size=26).tolist()
    params = {"temperature": 0, "max_new_tokens": 2, "ignore_eos": True}
    generate(server, input_ids=prompt, sampling_params=params)  # leaves the prompt in the radix cache
    again = generate(server, input_ids=prompt, sampling_params=params)["meta_info"]
    assert again["cached_tokens"] >= 20  # the cache does hold it
    start = 5
    meta = generate(server, input_ids=prompt, return_logprob=True, logprob_start_len=start,
                    sampling_params=params)["meta_info"]
    assert meta["cached_tokens"] <= start
    assert meta["prompt_tokens"] == start + len(meta["input_token_logprobs"])
    rows = reference(hf_model, prompt)
    assert meta["input_token_logprobs"][0] == [None, prompt[start], None]
    for j in range(start + 1, len(prompt)):
        check_entry(meta["input_token_logprobs"][j - start], rows[j - 1], prompt[j])


def test_stream_logprobs_are_cumulative(server, rng):
    prompt = rng.integers(3, VOCAB, size=7).tolist()
    body = {"input_ids": prompt, "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    with server.post("/generate", json={**body, "stream": True}, stream=True) as r:
        events = [line[len("data: "):] for line in sse_lines(r) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    previous: list = []
    for chunk in chunks:
        meta = chunk["meta_info"]
        entries = meta["output_token_logprobs"]
        assert len(entries) == meta["completion_tokens"] == len(meta["output_top_logprobs"])
        assert entries[: len(previous)] == previous
        assert [e[1] for e in entries] == chunk["output_ids"]
        previous = entries
    # Run again (its prompt now comes from the cache, so float32 rounding may differ slightly).
    final = generate(server, **body)["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in final] == [e[1] for e in previous]
    np.testing.assert_allclose([e[0] for e in final], [e[0] for e in previous], atol=TOLERANCE)


def test_batch_mixing_logprob_and_plain_items(server, hf_model, rng):
    prompts = [rng.integers(3, VOCAB, size=6).tolist(), rng.integers(3, VOCAB, size=11).tolist()]
    outs = generate(server, input_ids=prompts, return_logprob=[True, False], logprob_start_len=[1, -1],
                    sampling_params={"temperature": 0, "max_new_tokens": 3, "ignore_eos": True})
    assert "output_token_logprobs" not in outs[1]["meta_info"]
    meta = outs[0]["meta_info"]
    rows = reference(hf_model, prompts[0] + outs[0]["output_ids"])
    assert len(meta["input_token_logprobs"]) == len(prompts[0]) - 1
    for j in range(2, len(prompts[0])):
        check_entry(meta["input_token_logprobs"][j - 1], rows[j - 1], prompts[0][j])


@pytest.mark.parametrize(("body", "message"), [
    ({"logprob_start_len": 50}, "req.logprob_start_len=50 is higher than the number of input tokens "
                                "len(req.origin_input_ids)=3. Please use a smaller logprob_start_len."),
    ({"logprob_start_len": -2}, "logprob_start_len must be -1 or at least 0, got -2."),
    ({"top_logprobs_num": -1}, "top_logprobs_num must be in [0, 384], got -1."),
    ({"token_ids_logprob": [384]}, "token_ids_logprob must hold token ids in [0, 384), got 384."),
    ({"return_logprob": "yes"}, "return_logprob must be a boolean"),
])
def test_bad_logprob_values_are_400(server, body, message):
    r = server.post("/generate", json={"input_ids": [5, 6, 7], "return_logprob": True, **body})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert server.post("/generate", json={"input_ids": [5, 6, 7], "return_logprob": True,
                                          "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_step_logprobs_in_blocks_match_numpy(rng, monkeypatch):
    """The device function alone, with input positions spanning several blocks, against numpy."""
    import jax.numpy as jnp

    from serving import logprobs as lp

    monkeypatch.setattr(lp, "INPUT_LOGITS_BLOCK", 4)
    hidden = rng.normal(size=(32, 16)).astype(np.float32)
    weights = rng.normal(size=(16, 50)).astype(np.float32)

    class Head:
        def logits(self, rows):
            return rows @ weights

    def log_softmax(x):
        x = x.astype(np.float64)
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    indices = rng.permutation(32)[:16].astype(np.int32)
    targets = rng.integers(0, 50, 16).astype(np.int32)
    rows = rng.integers(0, 2, 16).astype(np.int32)
    token_ids = rng.integers(0, 50, (2, 3)).astype(np.int32)
    batch = lp.LogprobBatch(jnp.asarray(token_ids), jnp.asarray(indices), jnp.asarray(targets), jnp.asarray(rows))
    sampled = hidden[:2] @ weights
    out = lp.step_logprobs(Head(), jnp.asarray(hidden), jnp.asarray(sampled), jnp.asarray([3, 7]), batch, 4)
    want = log_softmax(hidden[indices] @ weights)
    np.testing.assert_allclose(out["input"]["token"], want[np.arange(16), targets], atol=1e-5)
    np.testing.assert_allclose(out["input"]["top_values"], -np.sort(-want, axis=-1)[:, :4], atol=1e-5)
    np.testing.assert_allclose(out["input"]["ids"], np.take_along_axis(want, token_ids[rows], -1), atol=1e-5)
    np.testing.assert_allclose(out["output"]["token"], log_softmax(sampled)[[0, 1], [3, 7]], atol=1e-5)
