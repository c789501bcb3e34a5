"""Faults inside the engine, through the real server: a step that raises, one that loses the donated KV
cache, one that hangs past --watchdog-timeout, and a scheduler thread that dies. Faults are injected by
tests/faults/sitecustomize.py (on the server's PYTHONPATH), triggered by a prompt holding a trigger id three
times in a row; the server itself has no test hook."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import requests
import torch
import transformers

from tests.conftest import REPO, ServerProcess, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy

RAISE, LOSE_CACHE, HANG, DIE = 380, 381, 382, 383  # trigger ids, three in a row; prompts are from [3, 380)
HANG_SECONDS = 10.0
FLAGS = ("--page-size", "4", "--max-total-tokens", "1024", "--chunked-prefill-size", "32",
         "--skip-server-warmup", "--watchdog-timeout", "3")


def fault_env() -> dict[str, str]:
    # The repository first: sitecustomize imports `serving` before `-m` puts the working directory on the path.
    return {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "faults")]),
            "PALLAS_TEST_FAULTS": f"raise:{RAISE},lose-cache:{LOSE_CACHE},hang:{HANG}:{HANG_SECONDS},die:{DIE}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("faults"), "llama")
    return path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(checkpoint):
    proc = ServerProcess(checkpoint[0], *FLAGS, env=fault_env())
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("FAULTS_TEST_SEED"))


def generate(server, ids, n=8, **kwargs):
    return server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": n, "ignore_eos": True}, **kwargs})


def pages(server):
    return server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]


def assert_serves_and_nothing_leaked(server, checkpoint, rng):
    ids = rng.integers(3, 380, size=9).tolist()
    r = generate(server, ids)
    assert r.status_code == 200, r.text
    assert_greedy(checkpoint[1], ids, r.json()["output_ids"], 8)
    deadline = time.monotonic() + 30
    while (counts := pages(server))["locked"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts["locked"] == 0 and counts["invariant_errors"] == 0
    assert counts["free"] + counts["evictable"] == counts["total"]
    assert server.get("/health_generate").status_code == 200


def test_a_failing_step_is_a_500_and_the_server_keeps_serving(server, checkpoint, rng):
    r = generate(server, rng.integers(3, 380, size=5).tolist() + [RAISE] * 3)
    assert r.status_code == 500
    assert r.json()["message"] == "Internal error: injected fault"
    assert_serves_and_nothing_leaked(server, checkpoint, rng)


def test_a_lost_cache_is_replaced_and_the_prefix_cache_forgotten(server, checkpoint, rng):
    prompt = rng.integers(3, 380, size=24).tolist()
    first = generate(server, prompt).json()
    assert_greedy(checkpoint[1], prompt, first["output_ids"], 8)
    assert generate(server, prompt).json()["meta_info"]["cached_tokens"] > 0  # the prefix is cached
    r = generate(server, rng.integers(3, 380, size=5).tolist() + [LOSE_CACHE] * 3)
    assert r.status_code == 500 and "after the cache was donated" in r.json()["message"]
    # The radix index pointed into the lost cache: it must be empty now, and the answer still right.
    again = generate(server, prompt).json()
    assert again["meta_info"]["cached_tokens"] == 0
    assert again["output_ids"] == first["output_ids"]
    assert_serves_and_nothing_leaked(server, checkpoint, rng)


def test_a_hung_step_is_aborted_by_the_watchdog_and_reported_unhealthy(server, checkpoint, rng):
    result = {}

    def hung_request():
        result["response"] = generate(server, rng.integers(3, 380, size=5).tolist() + [HANG] * 3)

    worker = threading.Thread(target=hung_request)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=HANG_SECONDS + 30)
    r = result["response"]
    # Answered by the watchdog while the step still sleeps, not when the step returns.
    answered_in = time.monotonic() - started
    assert r.status_code == 500 and "--watchdog-timeout 3 s" in r.json()["message"], r.text
    if answered_in < HANG_SECONDS - 1:
        assert server.get("/health_generate").status_code == 503
        refused = generate(server, [5, 6, 7])
        assert refused.status_code == 503 and "--watchdog-timeout" in refused.json()["message"]
    deadline = time.monotonic() + HANG_SECONDS + 30
    while server.get("/health_generate").status_code != 200:
        assert time.monotonic() < deadline, "still unhealthy after the step returned"
        time.sleep(0.5)
    assert_serves_and_nothing_leaked(server, checkpoint, rng)


def test_a_dead_scheduler_answers_its_requests_and_fails_health(checkpoint):
    proc = ServerProcess(checkpoint[0], *FLAGS, env=fault_env())
    try:
        r = generate(proc, [5, 6] + [DIE] * 3)
        assert r.status_code == 500 and "injected scheduler death" in r.json()["message"]
        assert proc.get("/health_generate").status_code == 503
        assert proc.get("/health").status_code == 503
        refused = generate(proc, [5, 6, 7])
        assert refused.status_code == 503
        assert refused.json()["message"].startswith("The scheduler thread has stopped")
        assert proc.get("/get_model_info").status_code == 200  # the HTTP side still answers
    finally:
        assert proc.stop() == 0


def test_health_passes_while_a_long_prefill_keeps_the_engine_busy(tmp_path, rng):
    """/health_generate must not fail just because a long chunked prefill keeps the engine busy."""
    path = make_tiny_checkpoint(tmp_path / "long", "llama", max_position_embeddings=16384)
    proc = ServerProcess(path, "--page-size", "4", "--max-total-tokens", "9000", "--chunked-prefill-size", "8",
                         "--max-running-requests", "1", "--skip-server-warmup")
    try:
        body = {"input_ids": rng.integers(3, 380, size=8000).tolist(),
                "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
        worker = threading.Thread(target=lambda: requests.post(proc.url + "/generate", json=body, timeout=600))
        worker.start()
        time.sleep(1.0)
        assert proc.get("/get_load").json()[0]["num_reqs"] >= 1
        assert proc.get("/health_generate").status_code == 200
        # Answered while the prefill still runs (the probe itself waits behind it: one running request).
        assert proc.get("/get_load").json()[0]["num_reqs"] >= 1
        worker.join()
    finally:
        assert proc.stop() == 0
