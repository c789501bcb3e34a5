"""MoE models through the real server: greedy parity with transformers on tiny Qwen2-MoE / Qwen3-MoE
checkpoints (paged cache of 4-token pages, chunked prefill), and the expert-distribution routes: the dumped
counts equal the top-k choices transformers' router makes for the same tokens, exactly."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import transformers

from tests.conftest import ServerProcess, make_tiny_checkpoint
from tests.hf_reference import assert_greedy

NEW_TOKENS = 32
FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--max-running-requests", "4",
         "--chunked-prefill-size", "16", "--random-seed", "0")
# Qwen2-MoE records in stat mode (its shared expert and plain top-k), Qwen3-MoE per token (renormalised top-k).
CASES = {"qwen2_moe": ({}, "stat"), "qwen3_moe": ({"norm_topk_prob": True}, "per_token")}
START, STOP, DUMP = ("Start recording the expert distribution.\n", "Stop recording the expert distribution.\n",
                     "Dump expert distribution record.\n")


@pytest.fixture(scope="module", params=list(CASES))
def moe_server(request, tmp_path_factory):
    arch = request.param
    overrides, mode = CASES[arch]
    path = make_tiny_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)
    dump_dir = tmp_path_factory.mktemp(f"{arch}-dumps")
    proc = ServerProcess(path, *FLAGS, "--expert-distribution-recorder-mode", mode,
                         env={"SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(dump_dir)})
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield proc, hf, mode, dump_dir
    assert proc.stop() == 0


def generate(server, prompts):
    r = server.post("/generate", json={"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


def hf_router_choices(hf, tokens):
    """transformers' top-k expert ids `[layers, T, k]` for the tokens the server ran through the model."""
    config = hf.config
    with torch.no_grad():
        logits = hf(torch.tensor([tokens]), output_router_logits=True).router_logits
    probs = [torch.softmax(layer.float(), dim=-1) for layer in logits]
    return np.stack([torch.topk(p, config.num_experts_per_tok, dim=-1).indices.numpy() for p in probs])


def dump(server, dump_dir):
    before = set(dump_dir.iterdir())
    r = server.post("/dump_expert_distribution_record")
    assert (r.status_code, r.text) == (200, DUMP)
    new = sorted(set(dump_dir.iterdir()) - before)
    assert [p.suffix for p in new] == [".csv", ".npz"], new
    with open(new[0]) as f:
        rows = list(csv.reader(f))
    return dict(np.load(new[1])), rows


def test_greedy_parity_and_exact_expert_counts(moe_server):
    server, hf, mode, dump_dir = moe_server
    rng = np.random.default_rng()
    config = hf.config
    num_layers, num_experts = config.num_hidden_layers, config.num_experts

    # Start resets an earlier record: what the first request routed must not be in the dump.
    assert (server.post("/start_expert_distribution_record").text) == START
    generate(server, [rng.integers(1, 384, size=5).tolist()])
    r = server.get("/start_expert_distribution_record")  # GET works as well as POST
    assert (r.status_code, r.text) == (200, START)
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 9, 21)]  # 21 > the 16-token chunk
    outputs = generate(server, prompts)
    assert server.post("/stop_expert_distribution_record").text == STOP
    generate(server, [rng.integers(1, 384, size=7).tolist()])  # after stop: not recorded

    expected = np.zeros((num_layers, num_experts), np.int64)
    choices = []
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_greedy(hf, prompt, out, NEW_TOKENS)
        # Every prompt token and every generated token but the last went through the model once.
        ids = hf_router_choices(hf, prompt + out[:-1])
        choices.append(ids)
        for layer in range(num_layers):
            expected[layer] += np.bincount(ids[layer].ravel(), minlength=num_experts)

    arrays, rows = dump(server, dump_dir)
    assert rows[0] == ["layer_id", "expert_id", "count"]
    table = np.zeros_like(expected)
    for layer, expert, count in rows[1:]:
        table[int(layer), int(expert)] = int(count)
    np.testing.assert_array_equal(table, expected)
    if mode == "stat":
        assert arrays["logical_count"].shape == (1000, num_layers, num_experts)
        assert arrays["logical_count"].dtype == np.int32
        np.testing.assert_array_equal(arrays["logical_count"].sum(axis=0), expected)
    else:
        counts = arrays["global_physical_count"]
        assert counts.shape[1:] == (num_layers, num_experts)
        np.testing.assert_array_equal(counts.sum(axis=0), expected)
        np.testing.assert_array_equal(arrays["forward_pass_id"], np.arange(len(counts)))
        assert arrays["num_tokens"].sum() == sum(len(p) + NEW_TOKENS - 1 for p in prompts)
        # Per token: each (input id, position) the server ran has transformers' expert choices.
        topk = arrays["topk_ids_of_layer"]
        assert topk.shape == (num_layers, arrays["num_tokens"].sum(), config.num_experts_per_tok)
        def per_layer(ids):  # [layers, k] -> each layer's chosen set, order-free
            return [tuple(sorted(layer)) for layer in ids.tolist()]

        by_token = {}
        for prompt, out, ids in zip(prompts, outputs, choices, strict=True):
            for pos, token in enumerate(prompt + out[:-1]):
                by_token.setdefault((token, pos), []).append(per_layer(ids[:, pos]))
        for i, (token, pos) in enumerate(zip(arrays["input_ids"], arrays["positions"], strict=True)):
            assert per_layer(topk[:, i]) in by_token[(int(token), int(pos))]

    # Dump resets: a second dump right away holds nothing.
    arrays, rows = dump(server, dump_dir)
    assert all(int(count) == 0 for *_, count in rows[1:])


def test_routes_refuse_without_recorder_or_experts(tiny_llama_dir):
    quick = ("--disable-precompile", "--skip-server-warmup", "--max-total-tokens", "256")
    for extra, needle in (((), "--expert-distribution-recorder-mode stat"),
                          (("--expert-distribution-recorder-mode", "stat"), "needs a mixture-of-experts model")):
        server = ServerProcess(tiny_llama_dir, *quick, *extra)
        try:
            for action in ("start", "stop", "dump"):
                for method in (server.get, server.post):
                    r = method(f"/{action}_expert_distribution_record")
                    assert r.status_code == 400, r.text
                    assert needle in r.json()["error"]["message"]
            assert server.get("/health").status_code == 200  # still serving
        finally:
            assert server.stop() == 0
