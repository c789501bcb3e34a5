"""Tensor and expert parallelism through the real server, on 8 simulated CPU devices (float32, tiny
checkpoints): greedy tokens match transformers (teacher-forced, `assert_greedy`) at --tp-size 2 and 4 and
--ep-size 2 (with --tp-size 2) and 4; `/get_server_info` reports the mesh, and each device holds its share of the sharded
weights and of the KV cache, exactly (`device_memory`, measured from the arrays' shards); weight swaps,
memory release / resume and exact expert counts keep working on the mesh; bad meshes are refused at start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from model.config import ModelConfig
from serving.mesh import MeshError, plan_placement
from tests.conftest import ServerProcess, make_tiny_checkpoint
from tests.hf_reference import assert_greedy
from tests.test_moe_server import dump, hf_router_choices

NEW_TOKENS = 12
DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
FLAGS = ("--page-size", "4", "--max-total-tokens", "1024", "--max-running-requests", "4",
         "--chunked-prefill-size", "16", "--random-seed", "0")
TENSOR_PARALLEL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def generate(server, prompts):
    r = server.post("/generate", json={"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return [out["output_ids"] for out in r.json()]


def expected_weight_bytes(hf, ways) -> int:
    """Bytes of float32 weights one device should hold: each param divided by `ways(name)` (1: replicated)."""
    return sum(param.numel() * 4 // ways(name) for name, param in hf.named_parameters())


def check_device_memory(server, hf, axes: dict[str, int], ways) -> list[dict]:
    info = server.get("/get_server_info").json()
    assert info["mesh"] == axes
    memory = info["device_memory"]
    assert len(memory) == axes["tensor"] * axes["expert"] and len({m["device"] for m in memory}) == len(memory)
    assert [m["weights_bytes"] for m in memory] == [expected_weight_bytes(hf, ways)] * len(memory)
    kv_total = info["internal_states"][0]["memory_usage"]["kvcache"] * 2**30
    assert [m["kv_cache_bytes"] for m in memory] == [pytest.approx(kv_total / axes["tensor"])] * len(memory)
    return memory


def tensor_parallel(tp: int, kv_heads: int):
    """`ways` of a model whose attention and dense / shared-expert MLP are split `tp` ways; K/V projections
    split at most `kv_heads` ways (above that each device holds one KV head, replicated)."""
    def ways(name: str) -> int:
        if "k_proj" in name or "v_proj" in name:
            return min(tp, kv_heads)
        return tp if any(part in name for part in TENSOR_PARALLEL) else 1

    return ways


@pytest.fixture(scope="module")
def llama(tmp_path_factory, one_torch_thread):
    # 2 KV heads: at tp 4 each is replicated on two shards (Placement.kv_replication).
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tp-llama"), "llama", num_attention_heads=8,
                                num_key_value_heads=2)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[2, 4])
def tp_server(request, llama):
    server = ServerProcess(llama[0], *FLAGS, "--tp-size", str(request.param), env=DEVICES)
    yield server, request.param
    assert server.stop() == 0


def test_tensor_parallel_greedy_memory_and_weight_control(tp_server, llama):
    server, tp = tp_server
    path, hf = llama
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 9, 21)]  # 21 > the 16-token chunk
    outputs = generate(server, prompts)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_greedy(hf, prompt, out, NEW_TOKENS, label=f"tp {tp}")
    memory = check_device_memory(server, hf, {"data": 1, "tensor": tp, "expert": 1},
                                 tensor_parallel(tp, hf.config.num_key_value_heads))
    # Sharded (and at tp 4 head-replicated) params read back as the checkpoint holds them.
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        reply = server.post("/get_weights_by_name", json={"name": name, "truncate_size": 100})
        assert reply.status_code == 200, reply.text
        np.testing.assert_array_equal(np.asarray(reply.json(), np.float32), hf.state_dict()[name].numpy())
    if tp != 2:
        return
    # A swap and a release / resume place the weights back onto the same shardings; outputs are unchanged.
    reply = server.post("/update_weights_from_disk", json={"model_path": str(path)})
    assert reply.status_code == 200 and reply.json()["success"], reply.text
    assert generate(server, prompts[:1]) == outputs[:1]
    tags = {"tags": ["weights", "kv_cache"]}
    assert server.post("/release_memory_occupation", json=tags).status_code == 200
    released = server.get("/get_server_info").json()["device_memory"]
    assert all(m["weights_bytes"] == m["kv_cache_bytes"] == 0 for m in released)
    assert server.post("/resume_memory_occupation", json=tags).status_code == 200
    assert server.get("/get_server_info").json()["device_memory"] == memory
    assert generate(server, prompts[:1]) == outputs[:1]


@pytest.fixture(scope="module", params=[(1, 4), (2, 2)], ids=["ep4", "tp2-ep2"])
def ep_server(request, tmp_path_factory, one_torch_thread):
    tp, ep = request.param
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ep-moe"), "qwen2_moe")
    dump_dir = tmp_path_factory.mktemp("ep-dumps")
    server = ServerProcess(path, *FLAGS, "--tp-size", str(tp), "--ep-size", str(ep),
                           "--expert-distribution-recorder-mode", "stat",
                           env={**DEVICES, "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(dump_dir)})
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield server, tp, ep, hf, dump_dir
    assert server.stop() == 0


def test_expert_parallel_greedy_exact_counts_and_memory(ep_server):
    """Experts over every device (`tensor` x `expert`); with tp 2 attention and the shared expert over `tensor`."""
    server, tp, ep, hf, dump_dir = ep_server
    config = hf.config
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (4, 19)]
    assert server.post("/start_expert_distribution_record").status_code == 200
    outputs = generate(server, prompts)
    expected = np.zeros((config.num_hidden_layers, config.num_experts), np.int64)
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_greedy(hf, prompt, out, NEW_TOKENS, label=f"tp {tp} ep {ep}")
        ids = hf_router_choices(hf, prompt + out[:-1])
        for layer in range(config.num_hidden_layers):
            expected[layer] += np.bincount(ids[layer].ravel(), minlength=config.num_experts)
    arrays, _ = dump(server, dump_dir)
    np.testing.assert_array_equal(arrays["logical_count"].sum(axis=0), expected)
    dense = tensor_parallel(tp, config.num_key_value_heads)
    check_device_memory(server, hf, {"data": 1, "tensor": tp, "expert": ep},
                        lambda name: tp * ep if ".experts." in name else dense(name))


def test_meshes_that_do_not_fit_are_refused():
    config = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
                                    "hidden_size": 96, "intermediate_size": 96, "num_hidden_layers": 1,
                                    "num_attention_heads": 12, "num_key_value_heads": 4})
    devices = [object()] * 8
    cases = {(8, 1): "--tp-size 8 must divide the number of attention heads (12)",
             (6, 1): "--tp-size 6 must divide the number of KV heads (4) or be a multiple of it",
             (3, 1): "--tp-size 3 must divide the number of KV heads (4)",
             (1, 2): "--ep-size 2 needs a mixture-of-experts model",
             (4, 4): "--tp-size 4 x --ep-size 4 needs 16 devices"}
    for (tp, ep), message in cases.items():
        with pytest.raises(MeshError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plan_placement(config, tp_size=tp, ep_size=ep, devices=devices)
