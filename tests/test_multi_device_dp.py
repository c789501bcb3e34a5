"""Data-parallel replicas (`--dp-size`) through the real server, on simulated CPU devices (float32, tiny
checkpoints): each replica serves greedy tokens that transformers confirms (teacher-forced,
`assert_greedy`) and that equal the other replica's for the same prompt, both replicas take requests
(round robin), `/get_load` answers one entry per replica, `/get_server_info` reports `data` and every
replica's devices; flush, weight swap, abort of a request running on replica 1 and release / resume work
on every replica and leave no page locked; `data_parallel_rank` picks the replica; dp x tp serves on 4
devices; expert records are kept per replica and add up to exact counts; too few devices are refused;
the router's choices (round robin, shortest queue, prefix affinity) in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import transformers

from serving.mesh import MeshError
from serving.replicas import device_groups
from serving.router import Router
from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed, sse_lines
from tests.hf_reference import assert_greedy
from tests.test_moe_server import hf_router_choices
from tests.test_multi_device import DEVICES, FLAGS, NEW_TOKENS, generate

LOAD_KEYS = {"rid", "http_worker_ipc", "dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_torch_thread):
    """The served checkpoint and a second one for the swap (its seed from another rope theta: other weights)."""
    root = tmp_path_factory.mktemp("dp")
    paths = [make_tiny_checkpoint(root / name, "llama", num_attention_heads=8, num_key_value_heads=2,
                                  rope_theta=theta) for name, theta in (("a", 10000.0), ("b", 10000.5))]
    return paths, [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in paths]


@pytest.fixture(scope="module")
def dp_server(checkpoints):
    server = ServerProcess(checkpoints[0][0], *FLAGS, "--dp-size", "2", env=DEVICES)
    yield server
    assert server.stop() == 0


def replica_states(server) -> list[dict]:
    return server.get("/get_server_info").json()["internal_states"]


def wait_idle(server, timeout: float = 30.0) -> list[dict]:
    """Every replica's page counts once none has a request or a locked page; the page invariant holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(load["num_reqs"] == 0 for load in server.get("/get_load").json()):
            pages = [state["kv_pages"] for state in replica_states(server)]
            if all(p["locked"] == 0 for p in pages):
                for p in pages:
                    assert p["free"] + p["evictable"] + p["locked"] == p["total"] and p["invariant_errors"] == 0
                return pages
        time.sleep(0.2)
    raise AssertionError(f"server not idle: {server.get('/get_load').json()}")


def test_both_replicas_serve_greedy_tokens(dp_server, checkpoints):
    hf = checkpoints[1][0]
    rng = np.random.default_rng()
    # Under 64 tokens: no prefix affinity, so round robin sends each prompt of the second batch to the
    # other replica than the first time.
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 9, 21)]
    routed_before = [state["num_routed_requests"] for state in replica_states(dp_server)]
    first, second = generate(dp_server, prompts), generate(dp_server, prompts)
    assert first == second  # each prompt ran on both replicas: what dp 1 serves, on either device
    for prompt, out in zip(prompts, first, strict=True):
        assert_greedy(hf, prompt, out, NEW_TOKENS, label="dp 2")
    states = replica_states(dp_server)
    assert [s["dp_rank"] for s in states] == [0, 1]
    assert [s["num_routed_requests"] - before for s, before in zip(states, routed_before, strict=True)] == [3, 3]
    assert all(s["num_steps"] > 0 for s in states)
    wait_idle(dp_server)


def test_load_and_server_info_per_replica(dp_server, checkpoints):
    loads = dp_server.get("/get_load").json()
    assert [set(load) for load in loads] == [LOAD_KEYS, LOAD_KEYS]
    assert [(load["dp_rank"], load["rid"], load["http_worker_ipc"]) for load in loads] == [(0, None, None),
                                                                                          (1, None, None)]
    info = dp_server.get("/get_server_info").json()
    assert info["mesh"] == {"data": 2, "tensor": 1, "expert": 1} and info["dp_size"] == 2
    memory = info["device_memory"]
    assert [m["device"] for m in memory] == ["cpu:0", "cpu:1"]
    weights = sum(p.numel() * 4 for p in checkpoints[1][0].parameters())
    assert [m["weights_bytes"] for m in memory] == [weights, weights]  # a whole copy on each replica's device
    assert all(m["kv_cache_bytes"] > 0 for m in memory)


def test_data_parallel_rank_picks_the_replica(dp_server):
    body = {"input_ids": [4, 5, 6], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
    before = [s["num_routed_requests"] for s in replica_states(dp_server)]
    for _ in range(2):  # round robin alone would use both
        assert dp_server.post("/generate", json={**body, "data_parallel_rank": 1}).status_code == 200
    reply = dp_server.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 2, "data_parallel_rank": 1})
    assert reply.status_code == 200, reply.text
    after = [s["num_routed_requests"] for s in replica_states(dp_server)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [0, 3]
    reply = dp_server.post("/generate", json={**body, "data_parallel_rank": 2})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == ("data_parallel_rank 2 is out of range: this server runs 2 "
                                                "data-parallel replicas (--dp-size).")
    reply = dp_server.post("/generate", json={**body, "data_parallel_rank": "1"})
    assert reply.status_code == 400 and "data_parallel_rank must be a non-negative integer" in reply.text


def test_abort_on_replica_1_and_flush(dp_server):
    """Two streams routed one after the other land on different replicas; the one on replica 1 is aborted."""
    body = {"input_ids": [5, 6, 7, 8], "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0}}
    streams, ranks = {}, {}
    try:
        for _ in range(2):
            rid = uuid.uuid4().hex
            before = [s["num_routed_requests"] for s in replica_states(dp_server)]
            response = requests.post(dp_server.url + "/generate", json={**body, "rid": rid}, stream=True, timeout=120)
            assert response.status_code == 200
            lines = sse_lines(response)
            next(line for line in lines if line)  # running
            after = [s["num_routed_requests"] for s in replica_states(dp_server)]
            ranks[rid] = next(rank for rank in (0, 1) if after[rank] > before[rank])
            streams[rid] = (response, lines)
        assert sorted(ranks.values()) == [0, 1]
        on_1 = next(rid for rid, rank in ranks.items() if rank == 1)
        assert dp_server.post("/flush_cache").status_code == 400  # requests hold pages on both replicas
        assert dp_server.post("/abort_request", json={"rid": on_1}).status_code == 200
        events = [line[len("data: "):] for line in streams[on_1][1] if line]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["meta_info"]["finish_reason"]["type"] == "abort"
        loads = dp_server.get("/get_load").json()
        assert loads[1]["num_reqs"] == 0
    finally:
        for response, _ in streams.values():
            response.close()  # the other stream: a disconnect aborts it
    wait_idle(dp_server)
    assert dp_server.post("/flush_cache").status_code == 200
    assert all(p["evictable"] == 0 for p in wait_idle(dp_server))


def test_weight_swap_and_memory_release_on_every_replica(dp_server, checkpoints):
    paths, hfs = checkpoints
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5], [2, 7, 1, 8]]  # odd: a second round robin swaps replicas
    reply = dp_server.post("/update_weights_from_disk", json={"model_path": str(paths[1]), "weight_version": "b"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["success"] and body["num_paused_requests"] == [0, 0]
    assert body["message"] == " | ".join(["Succeeded to update model weights. Weight version updated to b."] * 2)
    swapped = generate(dp_server, prompts) + generate(dp_server, prompts)  # each prompt on both replicas
    assert swapped[:3] == swapped[3:]
    for prompt, out in zip(prompts, swapped, strict=False):
        assert_greedy(hfs[1], prompt, out, NEW_TOKENS, label="dp 2 after the swap")
    name = "model.layers.0.self_attn.q_proj.weight"
    values = dp_server.post("/get_weights_by_name", json={"name": name, "truncate_size": 4}).json()
    assert len(values) == 2  # one per replica, as SGLang's dp > 1
    for value in values:
        np.testing.assert_array_equal(np.asarray(value, np.float32), hfs[1].state_dict()[name][:4].numpy())
    tags = {"tags": ["weights", "kv_cache"]}
    assert dp_server.post("/release_memory_occupation", json=tags).status_code == 200
    memory = dp_server.get("/get_server_info").json()["device_memory"]
    assert all(m["weights_bytes"] == m["kv_cache_bytes"] == 0 for m in memory) and len(memory) == 2
    assert dp_server.post("/resume_memory_occupation", json=tags).status_code == 200
    assert generate(dp_server, prompts) + generate(dp_server, prompts) == swapped
    wait_idle(dp_server)


def test_dp_times_tp_serves_on_four_devices(checkpoints):
    hf = checkpoints[1][0]
    server = ServerProcess(checkpoints[0][0], *FLAGS, "--dp-size", "2", "--tp-size", "2",
                           "--load-balance-method", "shortest_queue", env=DEVICES)
    try:
        info = server.get("/get_server_info").json()
        assert info["mesh"] == {"data": 2, "tensor": 2, "expert": 1}
        assert [m["device"] for m in info["device_memory"]] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
        prompts = [[7, 3, 9], [2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3, 6, 0]]
        for prompt, out in zip(prompts, generate(server, prompts), strict=True):
            assert_greedy(hf, prompt, out, NEW_TOKENS, label="dp 2 x tp 2")
        assert all(s["num_routed_requests"] > 0 for s in replica_states(server))  # shortest queue spreads them
        # A swap reads once and copies onto replica 1's mesh with the same partitioning.
        reply = server.post("/update_weights_from_disk", json={"model_path": str(checkpoints[0][1])})
        assert reply.status_code == 200 and reply.json()["success"], reply.text
        for prompt, out in zip(prompts * 2, generate(server, prompts) + generate(server, prompts), strict=True):
            assert_greedy(checkpoints[1][1], prompt, out, NEW_TOKENS, label="dp 2 x tp 2 after the swap")
        assert server.get("/get_server_info").json()["device_memory"] == info["device_memory"]  # same places
        wait_idle(server)
    finally:
        assert server.stop() == 0


def test_too_few_devices_are_refused(checkpoints):
    with pytest.raises(MeshError, match=r"^--dp-size 3 x --tp-size 2 x --ep-size 1 needs 6 devices; cpu has 4$"):
        device_groups(3, 2, 1, devices=["d0", "d1", "d2", "d3"])
    assert device_groups(2, 2, 1, devices=["d0", "d1", "d2", "d3"]) == [["d0", "d1"], ["d2", "d3"]]
    result = subprocess.run(
        [sys.executable, "-m", "serving.main", "--model-path", str(checkpoints[0][0]), "--dp-size", "3",
         "--tp-size", "2"], env={**os.environ, **DEVICES, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "--dp-size 3 x --tp-size 2 x --ep-size 1 needs 6 devices; cpu has 4" in result.stdout + result.stderr


# -- in process: the router's choices ---------------------------------------------------------------
def test_round_robin_shortest_queue_and_prefix_affinity():
    rng = np.random.default_rng(replayable_seed("DP_ROUTER_SEED"))
    short = [rng.integers(0, 1000, size=n).tolist() for n in (5, 30, 63)]
    router = Router("round_robin", page_size=4, pages_per_replica=[64, 64, 64])
    assert [router.choose(p) for p in short * 2] == [0, 1, 2] * 2  # under 64 cached tokens: no affinity
    long = rng.integers(0, 1000, size=100).tolist()
    assert router.choose(long) == 0
    for _ in range(3):  # round robin would move on (1, 2, 0); the 100-token prefix keeps it on 0
        assert router.choose(long + rng.integers(0, 1000, size=5).tolist()) == 0
    for _ in range(3):  # ... until its requests in flight outweigh the prefix (64 tokens each beyond the choice's)
        router.started(0)
    assert router.choose(long) == 1  # round robin's; replica 1 now holds the prefix too
    router.forget_prefixes()
    assert router.choose(long) == 2  # round robin's (remembered, replica 1 would have taken it)

    queue = Router("shortest_queue", page_size=4, pages_per_replica=[8, 8])
    queue.started(0)
    assert queue.choose(short[0]) == 1
    queue.started(1)
    queue.started(1)
    queue.finished(0)
    assert queue.choose(short[1]) == 0
    with pytest.raises(ValueError, match="load balance method must be one of round_robin, shortest_queue"):
        Router("minimum_tokens", page_size=4, pages_per_replica=[8])


def test_router_forgets_least_recent_prefixes_beyond_capacity():
    router = Router("round_robin", page_size=4, pages_per_replica=[20, 20])
    old, new = list(range(100, 180)), list(range(200, 280))  # 20 pages each: the record holds one of them
    assert router.choose(old) == 0 and router.choose(new) == 1  # no affinity yet
    assert router.choose(new) == 1  # remembered (round robin alone would say 0)
    assert router.choose([1, 2]) == 1
    assert router.choose(list(range(300, 380))) == 0  # replica 0 now remembers these pages instead of `old`'s
    assert router.choose(old) == 1  # round robin's choice: replica 0 forgot `old`


def test_expert_records_per_replica_add_up_to_exact_counts(tmp_path, one_torch_thread):
    """Each replica records its own steps and dumps its own files (`rank` in them); together exact."""
    path = make_tiny_checkpoint(tmp_path / "moe", "qwen2_moe")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dump_dir = tmp_path / "dumps"
    server = ServerProcess(path, *FLAGS, "--dp-size", "2", "--expert-distribution-recorder-mode", "stat",
                           env={**DEVICES, "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(dump_dir)})
    try:
        config = hf.config
        prompts = [[4, 8, 15], [16, 23, 42, 7], [1, 1, 2, 3, 5, 8]]
        assert server.post("/start_expert_distribution_record").status_code == 200
        outputs = generate(server, prompts)
        assert server.post("/dump_expert_distribution_record").status_code == 200
        expected = np.zeros((config.num_hidden_layers, config.num_experts), np.int64)
        for prompt, out in zip(prompts, outputs, strict=True):
            assert_greedy(hf, prompt, out, NEW_TOKENS, label="dp 2 MoE")
            ids = hf_router_choices(hf, prompt + out[:-1])
            for layer in range(config.num_hidden_layers):
                expected[layer] += np.bincount(ids[layer].ravel(), minlength=config.num_experts)
        files = sorted(dump_dir.iterdir())
        assert [p.name.rsplit("_", 1)[1] for p in files] == ["rank0.csv", "rank0.npz", "rank1.csv", "rank1.npz"]
        arrays = [dict(np.load(p)) for p in files if p.suffix == ".npz"]
        assert [int(a["rank"]) for a in arrays] == [0, 1]
        counts = [a["logical_count"].sum(axis=0) for a in arrays]
        assert all(c.sum() > 0 for c in counts)  # round robin: both replicas ran some of the prompts
        np.testing.assert_array_equal(counts[0] + counts[1], expected)
    finally:
        assert server.stop() == 0
