"""/update_weights_from_disk (safetensors and Orbax), /get_weights_by_name and /update_weight_version
through the real server on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import requests
import torch
import transformers

from checkpoints.convert import main as convert_main
from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed, sse_lines
from tests.hf_reference import assert_greedy

FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--max-running-requests", "16",
         "--chunked-prefill-size", "32", "--random-seed", "0")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three tiny Llamas of one shape (different weights), the third also as an Orbax checkpoint."""
    root = tmp_path_factory.mktemp("weights")
    dirs = {name: make_tiny_checkpoint(root / name, "llama", rope_theta=theta)
            for name, theta in (("a", 10000.0), ("b", 10000.5), ("c", 10001.0))}
    assert convert_main([str(dirs["c"]), "--to", "orbax", str(root / "c-orbax")]) == 0
    dirs["c-orbax"] = root / "c-orbax"
    return dirs


@pytest.fixture(scope="module")
def hf(checkpoints, one_torch_thread):
    return {name: transformers.AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32).eval()
            for name in ("a", "b", "c")}


@pytest.fixture(scope="module")
def server(checkpoints):
    proc = ServerProcess(checkpoints["a"], *FLAGS)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("WEIGHTS_TEST_SEED"))


def greedy(server, ids, n=8):
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
    return server.post("/generate", json=body).json()


def update(server, path, **fields):
    return server.post("/update_weights_from_disk", json={"model_path": str(path), **fields})


def test_updates_from_safetensors_then_orbax_serve_the_new_weights(server, checkpoints, hf, rng):
    ids = rng.integers(3, 384, size=7).tolist()
    assert_greedy(hf["a"], ids, greedy(server, ids)["output_ids"], 8, "served a")

    swapped = update(server, checkpoints["b"], weight_version="v-b")
    assert swapped.status_code == 200
    assert swapped.json() == {"success": True, "num_paused_requests": 0,
                              "message": "Succeeded to update model weights. Weight version updated to v-b."}
    out = greedy(server, ids)
    assert_greedy(hf["b"], ids, out["output_ids"], 8, "after the safetensors update")
    assert out["meta_info"]["weight_version"] == "v-b"

    swapped = update(server, checkpoints["c-orbax"], load_format="orbax")
    assert swapped.json()["message"] == "Succeeded to update model weights." and swapped.status_code == 200
    assert_greedy(hf["c"], ids, greedy(server, ids)["output_ids"], 8, "after the Orbax update")
    info = server.get("/get_model_info").json()
    assert info["model_path"] == str(checkpoints["c-orbax"]) and info["weight_version"] == "v-b"
    assert server.get("/v1/models").json()["data"][0]["id"] == str(checkpoints["c-orbax"])

    assert update(server, checkpoints["a"], load_format="safetensors").json()["success"] is True
    assert_greedy(hf["a"], ids, greedy(server, ids)["output_ids"], 8, "back to a")
    # As in SGLang, a successful update's load_format becomes the server's: the default of the next one.
    assert update(server, checkpoints["c-orbax"]).json()["message"].startswith(
        "Failed to get weights iterator: --load-format safetensors needs a Hugging Face directory")
    assert update(server, checkpoints["a"], load_format="auto").json()["success"] is True


def test_failed_updates_leave_the_old_weights_serving(server, checkpoints, hf, rng, tmp_path):
    assert update(server, checkpoints["a"], load_format="auto").json()["success"] is True
    ids = rng.integers(3, 384, size=6).tolist()
    before = greedy(server, ids)["output_ids"]

    def refused(path, start, end=".\nRolling back to original weights.", **fields):
        reply = update(server, path, **fields)
        assert reply.status_code == 400
        body = reply.json()
        assert body["success"] is False and body["num_paused_requests"] == 0
        assert body["message"].startswith(start) and body["message"].endswith(end), body["message"]
        assert greedy(server, ids)["output_ids"] == before, "the old weights must keep serving"
        return body["message"]

    refused("qwen/qwen2.5-0.5b-instruct-wrong", "Failed to get weights iterator: qwen/qwen2.5-0.5b-instruct-wrong "
            "(repository not found).", "")
    refused(tmp_path / "missing", f"Failed to get weights iterator: {tmp_path / 'missing'} (repository not found).", "")
    refused(checkpoints["a"], "Failed to get model loader: pt.", "", load_format="pt")
    refused(checkpoints["a"], "Failed to get weights iterator: --load-format orbax needs an Orbax checkpoint",
            "", load_format="orbax")
    other_arch = make_tiny_checkpoint(tmp_path / "qwen3", "qwen3")
    refused(other_arch, "Failed to update weights: architecture differs: serving LlamaForCausalLM, new checkpoint "
            "Qwen3ForCausalLM")
    wide = make_tiny_checkpoint(tmp_path / "wide", "llama", intermediate_size=96)
    refused(wide, "Failed to update weights: tensor 'model.layers.0.mlp.down_proj.weight' has shape (64, 96) in the "
            "new checkpoint, (64, 128) in the served model")
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoints["b"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = refused(truncated, "Failed to update weights: ")
    assert "is corrupt" in message and "truncated or misplaced" in message
    wide_orbax = tmp_path / "wide-orbax"
    assert convert_main([str(wide), "--to", "orbax", str(wide_orbax)]) == 0
    (wide_orbax / "config.json").write_text((checkpoints["a"] / "config.json").read_text())  # config lies
    message = refused(wide_orbax, "Failed to update weights: tensor 'model.layers.0.mlp.down_proj.weight' has shape "
                      "(64, 96) in ")
    assert message.endswith("expected (64, 128).\nRolling back to original weights.")
    assert server.get("/get_model_info").json()["model_path"] == str(checkpoints["a"])


def test_an_update_while_16_streams_run_loses_no_request(server, checkpoints, hf, rng):
    """Semantics: the swap waits for the requests admitted before it, which all finish on the old
    weights; requests arriving meanwhile wait and run on the new ones. So every stream finishes, each on
    one set of weights from its first token to its last."""
    assert update(server, checkpoints["a"]).json()["success"] is True
    prompts = [rng.integers(3, 384, size=int(rng.integers(3, 12))).tolist() for _ in range(16)]
    results: list[list[dict]] = [[] for _ in prompts]
    started = threading.Barrier(17, timeout=300)  # a broken stream breaks it instead of hanging

    def stream(i: int) -> None:
        body = {"input_ids": prompts[i], "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}}
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=300) as response:
            lines = (line for line in sse_lines(response) if line)
            results[i].append(json.loads(next(lines)[len("data: "):]))
            started.wait()
            results[i].extend(json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    started.wait()  # every stream has its first chunk: all 16 were admitted before the update
    replies = []
    updater = threading.Thread(target=lambda: replies.append(update(server, checkpoints["b"]).json()))
    updater.start()
    # Sent while the update runs: on the old weights if it reached the scheduler before the swap was
    # queued (the new weights are read first), else held and run on the new ones, with none of the old
    # weights' KV for its prompt (which the streams cached) reused. Either way on one set only.
    late = greedy(server, prompts[0])
    updater.join()
    assert replies[0]["success"] is True
    for t in threads:
        t.join()
    for prompt, chunks in zip(prompts, results, strict=True):
        last = chunks[-1]
        assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 24}
        assert_greedy(hf["a"], prompt, last["output_ids"], 24, "a stream that started before the update")
    try:
        assert_greedy(hf["a"], prompts[0], late["output_ids"], 8, "sent during the update")
    except AssertionError:
        assert_greedy(hf["b"], prompts[0], late["output_ids"], 8, "sent during the update")
    assert_greedy(hf["b"], prompts[0], greedy(server, prompts[0])["output_ids"], 8, "after the update")


def test_abort_all_requests_aborts_what_runs(server, checkpoints, rng):
    results = []

    def run() -> None:
        body = {"input_ids": rng.integers(3, 384, size=5).tolist(),
                "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        results.append(server.post("/generate", json=body).json())

    worker = threading.Thread(target=run)
    worker.start()
    while server.get("/get_load").json()[0]["num_reqs"] == 0:
        time.sleep(0.01)
    assert update(server, checkpoints["a"], abort_all_requests=True).json()["success"] is True
    worker.join()
    assert results[0]["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight",
                                  "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                  "model.layers.0.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
                                  "model.norm.weight", "lm_head.weight"])
def test_get_weights_by_name_is_the_hf_tensor(server, checkpoints, hf, name):
    assert update(server, checkpoints["c-orbax"]).json()["success"] is True
    expected = hf["c"].state_dict()[name].numpy()
    for method, truncate in (("post", 3), ("get", 100)):
        reply = getattr(server, method)("/get_weights_by_name", json={"name": name, "truncate_size": truncate})
        assert reply.status_code == 200
        assert np.array_equal(np.asarray(reply.json(), np.float32), expected[:truncate])


def test_get_weights_by_name_refuses_unknown_names(server):
    for name in ("model.layers.9.mlp.up_proj.weight", "model.nothing.weight", ""):
        reply = server.post("/get_weights_by_name", json={"name": name})
        assert reply.status_code == 400 and reply.json() == {"error": {"message": "Get parameter by name failed"}}
    assert server.post("/get_weights_by_name", json={"truncate_size": 3}).status_code == 400


def test_update_weight_version_is_reported_everywhere(server, rng):
    reply = server.post("/update_weight_version", json={"new_version": "step-42"})
    assert reply.status_code == 200
    assert reply.json() == {"success": True, "message": "Weight version updated to step-42", "new_version": "step-42"}
    assert server.get("/weight_version").json() == {"weight_version": "step-42"}
    assert server.get("/get_weight_version").json() == {"weight_version": "step-42"}
    assert server.get("/get_model_info").json()["weight_version"] == "step-42"
    assert greedy(server, rng.integers(3, 384, size=4).tolist(), 2)["meta_info"]["weight_version"] == "step-42"
    assert server.post("/update_weight_version", json={}).status_code == 400


def test_token_step_is_refused(server, checkpoints):
    reply = update(server, checkpoints["a"], token_step=3)
    assert reply.status_code == 400 and reply.json() == {"error": {"message": "token_step is not supported yet"}}


def test_is_async_swaps_without_waiting_for_requests_in_flight(server, checkpoints, hf, rng):
    assert update(server, checkpoints["a"], load_format="auto").json()["success"] is True
    ids = rng.integers(3, 384, size=5).tolist()
    chunks, first = [], threading.Event()

    def stream() -> None:
        body = {"input_ids": ids, "stream": True, "sampling_params": {"temperature": 0, "max_new_tokens": 240,
                                                                      "ignore_eos": True}}
        with requests.post(server.url + "/generate", json=body, stream=True, timeout=300) as response:
            for line in sse_lines(response):
                if line and line != "data: [DONE]":
                    chunks.append(json.loads(line[len("data: "):]))
                    first.set()

    worker = threading.Thread(target=stream)
    worker.start()
    assert first.wait(120)
    assert update(server, checkpoints["b"], is_async=True).json()["success"] is True
    worker.join(300)  # the request in flight went on (on the new weights from the swap on) and finished
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 240}
    assert_greedy(hf["b"], ids, greedy(server, ids)["output_ids"], 8, "after an is_async update")


def test_a_server_starts_from_an_orbax_checkpoint_and_updates_from_safetensors(checkpoints, hf, rng):
    proc = ServerProcess(checkpoints["c-orbax"], *FLAGS, "--load-format", "orbax")
    try:
        ids = rng.integers(3, 384, size=6).tolist()
        out = greedy(proc, ids)
        assert_greedy(hf["c"], ids, out["output_ids"], 8, "served from Orbax")
        assert out["text"]  # the tokenizer copied beside the params is served
        assert update(proc, checkpoints["b"], load_format="auto").json()["success"] is True
        assert_greedy(hf["b"], ids, greedy(proc, ids)["output_ids"], 8, "Orbax server updated from safetensors")
        assert update(proc, checkpoints["c-orbax"]).json()["success"] is True  # auto: remembered from the last
        assert_greedy(hf["c"], ids, greedy(proc, ids)["output_ids"], 8, "and back from Orbax")
    finally:
        assert proc.stop() == 0
