"""Penalties, logit_bias, min_new_tokens, stop_regex and seeds through the real server on a tiny Llama.

Each penalised greedy output is checked teacher-forced against transformers: one forward over prompt +
our tokens, each row penalised by a direct numpy computation (the documented order of
serving.penalties: repetition, then frequency / presence over the output so far, then logit_bias), and
our token must be that row's argmax (or within the float32 near-tie tolerance of hf_reference).
PENALTY_TEST_SEED replays the prompts and penalty values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import ServerProcess, replayable_seed
from tests.hf_reference import TIE_TOLERANCE, assert_greedy

VOCAB = 384
FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--max-running-requests", "8",
         "--chunked-prefill-size", "32", "--random-seed", "0")


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("PENALTY_TEST_SEED"))


def penalised(row: np.ndarray, prompt: list[int], output: list[int], sp: dict) -> np.ndarray:
    """The definition, on one row of raw logits (float64)."""
    row = row.copy()
    counts = np.bincount(output, minlength=VOCAB).astype(np.float64)
    repetition = sp.get("repetition_penalty", 1.0)
    if repetition != 1.0:
        seen = (counts > 0) | (np.bincount(prompt, minlength=VOCAB) > 0)
        row = np.where(seen, np.where(row > 0, row / repetition, row * repetition), row)
    row -= sp.get("frequency_penalty", 0.0) * counts + sp.get("presence_penalty", 0.0) * (counts > 0)
    for token_id, bias in (sp.get("logit_bias") or {}).items():
        row[int(token_id)] += bias
    return row


def check_penalised_greedy(hf, prompt: list[int], ours: list[int], sp: dict) -> int:
    """Assert each of our tokens is the argmax of the penalised reference row; returns how many steps
    the penalty changed the reference's choice (so a test can tell that it mattered)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours])).logits[0].double().numpy()
    changed = 0
    for t, token in enumerate(ours):
        raw = logits[len(prompt) - 1 + t]
        row = penalised(raw, prompt, ours[:t], sp)
        best = int(row.argmax())
        changed += best != int(raw.argmax())
        gap = row[best] - row[token]
        assert gap <= TIE_TOLERANCE * max(1.0, float(np.abs(row).max())), (
            f"{sp}: token {t} is {token}, the penalised argmax is {best} (gap {gap:.6f}); ours {ours[:t + 1]}")
    return changed


def greedy(server, prompt, sp: dict, n: int = 12) -> list[int]:
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True,
                                                     **sp}}
    r = server.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def test_each_penalty_against_the_definition(server, hf_model, rng):
    changed = 0
    cases = [
        {"frequency_penalty": float(rng.uniform(0.5, 2.0))},
        {"frequency_penalty": float(rng.uniform(-2.0, -0.5))},
        {"presence_penalty": float(rng.uniform(0.5, 2.0))},
        {"repetition_penalty": float(rng.uniform(1.2, 2.0))},
        {"repetition_penalty": float(rng.uniform(0.3, 0.8))},
        {"logit_bias": {str(int(k)): float(rng.uniform(-8, 8)) for k in rng.integers(0, VOCAB, 6)}},
        {"frequency_penalty": 0.7, "presence_penalty": -0.4, "repetition_penalty": 1.3,
         "logit_bias": {str(int(rng.integers(0, VOCAB))): 3.0}},
    ]
    for sp in cases:
        prompt = rng.integers(3, VOCAB, size=int(rng.integers(3, 20))).tolist()
        ours = greedy(server, prompt, sp)
        assert len(ours) == 12
        changed += check_penalised_greedy(hf_model, prompt, ours, sp)
    assert changed > 0, "no penalty changed any greedy choice: the check proves nothing"


def test_batch_mixing_penalised_and_plain_requests(server, hf_model, rng):
    prompts = [rng.integers(3, VOCAB, size=int(rng.integers(4, 12))).tolist() for _ in range(4)]
    params = [{}, {"repetition_penalty": 1.8, "frequency_penalty": 1.0}, {},
              {"logit_bias": {str(int(rng.integers(0, VOCAB))): 5.0}}]
    body = {"input_ids": prompts, "sampling_params": [
        {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True, **sp} for sp in params]}
    outs = server.post("/generate", json=body).json()
    for prompt, sp, out in zip(prompts, params, outs, strict=True):
        if sp:
            check_penalised_greedy(hf_model, prompt, out["output_ids"], sp)
        else:
            assert_greedy(hf_model, prompt, out["output_ids"], 10, label="plain row of a penalised batch")


def test_min_new_tokens_bans_many_stop_ids(server, hf_model, rng):
    prompt = rng.integers(3, VOCAB, size=8).tolist()
    plain = greedy(server, prompt, {}, n=16)
    # More stop ids than the sampler's precompiled ban width (8), including every token greedy picks.
    stops = sorted(set(plain) | set(rng.integers(3, VOCAB, size=20).tolist()))
    assert len(stops) > 8
    r = server.post("/generate", json={"input_ids": prompt, "sampling_params": {
        "temperature": 0, "max_new_tokens": 16, "min_new_tokens": 10, "stop_token_ids": stops}}).json()
    ours = r["output_ids"]
    assert len(ours) >= 10 and not set(ours[:10]) & set(stops), ours
    bias = {str(s): -1e9 for s in stops}  # the ban, as the reference's -inf
    check_penalised_greedy(hf_model, prompt, ours[:10], {"logit_bias": bias})
    if len(ours) < 16:
        assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": ours[-1]} and ours[-1] in stops


def test_stop_regex(server, rng):
    prompt = rng.integers(3, VOCAB, size=6).tolist()
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
    full = server.post("/generate", json=body).json()["text"]
    chars = [c for c in full[2:] if c.isalnum()]
    if not chars:
        pytest.skip("random tokens decoded to no alphanumeric text")
    pattern = f"[{chars[0]}]"
    index = full.find(chars[0], 0)
    body["sampling_params"]["stop_regex"] = [pattern]
    cut = server.post("/generate", json=body).json()
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert cut["text"] == full[:index]
    body["sampling_params"]["no_stop_trim"] = True
    kept = server.post("/generate", json=body).json()
    assert kept["text"].startswith(full[: index + 1]) and full.startswith(kept["text"])


def test_seeded_penalised_sampling_is_reproducible(server, rng):
    sp = {"temperature": 1.0, "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": int(rng.integers(1 << 30)),
          "frequency_penalty": 0.5, "repetition_penalty": 1.2}
    prompt = rng.integers(3, VOCAB, size=5).tolist()
    a, b = (server.post("/generate", json={"input_ids": prompt, "sampling_params": sp}).json()["output_ids"]
            for _ in range(2))
    assert a == b


def test_parallel_samples_are_prompt_major(server, hf_model, rng):
    prompts = [rng.integers(3, VOCAB, size=5).tolist(), rng.integers(3, VOCAB, size=9).tolist()]
    outs = server.post("/generate", json={"input_ids": prompts, "sampling_params": {
        "n": 2, "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}).json()
    assert len(outs) == 4
    for i, out in enumerate(outs):  # index = prompt_idx * n + sample_idx
        assert_greedy(hf_model, prompts[i // 2], out["output_ids"], 6, label=f"item {i}")


@pytest.mark.parametrize(("sp", "message"), [
    ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
    ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3."),
    ({"repetition_penalty": 2.1}, "repetition_penalty must be in [0, 2], got 2.1."),
    ({"logit_bias": {"384": 1.0}}, "logit_bias must has keys in [0, 383], got 384."),
    ({"logit_bias": {"x": 1.0}}, "logit_bias keys must be token ids"),
    ({"stop_regex": "(a"}, "stop_regex '(a' is not a valid regular expression"),
])
def test_bad_values_are_400_and_the_server_keeps_serving(server, sp, message):
    r = server.post("/generate", json={"text": "hi", "sampling_params": sp})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert server.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}).status_code == 200


def test_skip_special_tokens(server, tiny_llama_dir):
    # logit_bias makes greedy pick <|im_start|> (a special token of the test tokenizer) every time.
    special = json.loads((tiny_llama_dir / "tokenizer.json").read_text())["added_tokens"][1]
    sp = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True, "logit_bias": {str(special["id"]): 100.0}}
    shown = server.post("/generate", json={"text": "hi", "sampling_params": {**sp, "skip_special_tokens": False}})
    assert shown.json()["output_ids"] == [special["id"]] * 3
    assert shown.json()["text"] == special["content"] * 3
    assert server.post("/generate", json={"text": "hi", "sampling_params": sp}).json()["text"] == ""
