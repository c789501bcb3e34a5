"""Multi-host serving (`--nnodes 2`) on 127.0.0.1: two real `python -m serving.main` processes, one CPU device
each, joined by jax.distributed (gloo) into one `--tp-size 2` mesh (float32, tiny checkpoint). Node 0 serves
HTTP: greedy tokens that transformers confirms (teacher-forced, `assert_greedy`), a sampled request with
penalties and logprobs (the resampler and logprob jits across hosts), `/get_server_info`'s global mesh and
node 0's own devices; the routes that are not mirrored to the other host answer 400; stopping node 0 ends
node 1 with exit code 0. Also: the command channel between two bare processes, and the flag checks."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from serving.server_args import ServerArgs
from tests.conftest import REPO, ServerProcess, free_port, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy
from tests.test_multi_device import FLAGS, NEW_TOKENS, generate

# One CPU device per process, whatever the caller's XLA_FLAGS: the mesh's two devices are on two hosts.
ONE_DEVICE = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_torch_thread):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("multihost"), "llama", num_attention_heads=8,
                                num_key_value_heads=2)
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def nodes(checkpoint, tmp_path_factory):
    """(node 0's server, node 1's process): one launch for the module."""
    flags = [*FLAGS, "--tp-size", "2", "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}",
             "--disable-compilation-cache"]
    log = open(tmp_path_factory.mktemp("node1") / "node1.log", "w")
    follower = subprocess.Popen([sys.executable, "-m", "serving.main", "--model-path", str(checkpoint[0]), *flags,
                                 "--node-rank", "1", "--log-level", "warning"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, **ONE_DEVICE})
    try:
        server = ServerProcess(checkpoint[0], *flags, "--node-rank", "0", env=ONE_DEVICE)
    except Exception:
        follower.kill()
        raise
    yield server, follower
    server.stop()
    if follower.poll() is None:
        follower.kill()
    log.close()


def test_greedy_tokens_over_two_hosts(nodes, checkpoint):
    rng = np.random.default_rng(replayable_seed("MULTI_HOST_SEED"))
    prompts = [rng.integers(1, 384, size=n).tolist() for n in (3, 11, 21)]  # 21: a chunked prefill
    for prompt, out in zip(prompts, generate(nodes[0], prompts), strict=True):
        assert_greedy(checkpoint[1], prompt, out, NEW_TOKENS, label="nnodes 2, tp 2")


def test_sampling_with_penalties_and_logprobs(nodes):
    reply = nodes[0].post("/generate", json={
        "input_ids": [5, 6, 7], "return_logprob": True, "top_logprobs_num": 2,
        "sampling_params": {"temperature": 0.8, "max_new_tokens": 4, "frequency_penalty": 0.5, "ignore_eos": True}})
    assert reply.status_code == 200, reply.text
    meta = reply.json()["meta_info"]
    assert [entry[1] for entry in meta["output_token_logprobs"]] == reply.json()["output_ids"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_server_info_shows_the_global_mesh(nodes, checkpoint):
    info = nodes[0].get("/get_server_info").json()
    assert info["mesh"] == {"data": 1, "tensor": 2, "expert": 1}
    assert (info["nnodes"], info["node_rank"]) == (2, 0)
    # Node 0's device only: the other host's shards are not addressable here (docs/multi_device.md).
    [memory] = info["device_memory"]
    assert memory["device"] == "cpu:0" and memory["kv_cache_bytes"] > 0
    weights = sum(p.numel() * 4 for p in checkpoint[1].parameters())
    assert weights / 2 <= memory["weights_bytes"] < weights  # its half of the sharded weights, and the rest


@pytest.mark.parametrize("route", ["update_weights_from_disk", "get_weights_by_name", "release_memory_occupation",
                                   "resume_memory_occupation"])
def test_routes_not_mirrored_are_refused(nodes, checkpoint, route):
    reply = nodes[0].post(f"/{route}", json={"model_path": str(checkpoint[0]), "name": "lm_head.weight"})
    assert reply.status_code == 400
    body = reply.json()
    message = body["message"] if route == "update_weights_from_disk" else body["error"]["message"]
    assert message == f"{route} with --nnodes > 1 is not supported yet"


def test_stopping_node_0_ends_node_1(nodes):
    """Last in the module: it ends the launch."""
    server, follower = nodes
    assert generate(server, [[4, 5, 6]])  # the hosts still step together after the refusals above
    assert server.stop() == 0
    assert follower.wait(timeout=120) == 0


def _channel_roundtrip(rank: int, port: int, out: str) -> None:
    """One of two bare processes: node 0 sends commands of several payload sizes, node 1 writes what it got."""
    from serving.multihost import STOP, CommandChannel, initialize

    initialize(ServerArgs(nnodes=2, node_rank=rank, dist_init_addr=f"127.0.0.1:{port}", tp_size=2))
    channel, got = CommandChannel(), []
    if rank == 0:
        for command in _commands():
            channel.send(command[0], *command[1], **command[2])
        channel.stop()
        channel.stop()  # once only
        return
    while (command := channel.receive())[0] != STOP:
        got.append(command)
    Path(out).write_bytes(pickle.dumps(got))


def _commands() -> list[tuple[str, tuple, dict]]:
    big = np.random.default_rng(0).integers(0, 1000, size=3000, dtype=np.int32)  # past the smallest bucket
    return [("run", (np.arange(5, dtype=np.int32),), {}), ("precompile", (), {"progress": False}),
            ("run_pool", (big,), {"method": "mean", "normalize": True}), ("reset_kv_cache", (), {})]


def test_command_channel_between_two_processes(tmp_path):
    port, out = free_port(), tmp_path / "received.pkl"
    code = "import sys; from tests.test_multi_host import _channel_roundtrip as f; f(int(sys.argv[1]), {}, {!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code.format(port, str(out)), str(rank)], cwd=REPO,
                              env={**os.environ, **ONE_DEVICE}) for rank in (0, 1)]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    got = pickle.loads(out.read_bytes())
    sent = _commands()
    assert [(name, kwargs) for name, _, kwargs in got] == [(name, kwargs) for name, _, kwargs in sent]
    for (_, args, _), (_, theirs, _) in zip(got, sent, strict=True):
        assert len(args) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(args, theirs, strict=True))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nnodes": 2}, "--nnodes 2 needs --dist-init-addr HOST:PORT"),
    ({"nnodes": 2, "dist_init_addr": "10.0.0.1"}, "--nnodes 2 needs --dist-init-addr HOST:PORT"),
    ({"nnodes": 2, "node_rank": 2, "dist_init_addr": "10.0.0.1:5000"}, r"node_rank must be in \[0, nnodes\)"),
    ({"node_rank": 1}, r"node_rank must be in \[0, nnodes\) = \[0, 1\), got 1"),
    ({"dist_init_addr": "10.0.0.1:5000"}, "--dist-init-addr joins several hosts; it needs --nnodes above 1"),
    ({"nnodes": 0}, "nnodes must be at least 1"),
    ({"nnodes": 2, "dist_init_addr": "10.0.0.1:5000", "dp_size": 2},
     "--dp-size 2 with --nnodes 2 is not supported yet"),
    ({"nnodes": 2, "dist_init_addr": "10.0.0.1:5000", "expert_distribution_recorder_mode": "stat"},
     "--expert-distribution-recorder-mode with --nnodes 2 is not supported yet"),
])
def test_node_flags_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ServerArgs(**kwargs)


def test_engine_is_node_0s_only(tiny_llama_dir):
    from serving.engine import Engine

    with pytest.raises(ValueError, match="--node-rank 1 builds no engine: node 0 serves"):
        Engine(model_path=str(tiny_llama_dir), nnodes=2, node_rank=1, dist_init_addr="127.0.0.1:1", tp_size=2)
