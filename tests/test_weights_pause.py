"""/pause_generation (abort, retract, in_place), /continue_generation, /flush_cache?timeout=, and
/release_memory_occupation + /resume_memory_occupation, through the real server on a tiny Llama."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import requests

from tests.conftest import ServerProcess, replayable_seed, sse_lines
from tests.hf_reference import assert_greedy

FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--max-running-requests", "8",
         "--chunked-prefill-size", "32", "--random-seed", "0")
PAUSED = {"message": "Generation paused successfully.", "status": "ok"}
CONTINUED = {"message": "Generation continued successfully.", "status": "ok"}
LONG = 240  # tokens: a request still running when the pause arrives (prompts <= 9 tokens, context 256)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("PAUSE_TEST_SEED"))


def load(server) -> dict:
    return server.get("/get_load").json()[0]


def wait_for(predicate, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Stream:
    """A streamed greedy /generate on a thread; `first` is set once its first chunk arrived."""

    def __init__(self, server, ids: list[int], n: int = LONG):
        self.ids, self.chunks, self.first = ids, [], threading.Event()
        body = {"input_ids": ids, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}}
        self.thread = threading.Thread(target=self._run, args=(server.url, body))
        self.thread.start()
        assert self.first.wait(120), "no first chunk"

    def _run(self, url: str, body: dict) -> None:
        with requests.post(url + "/generate", json=body, stream=True, timeout=300) as response:
            for line in sse_lines(response):
                if line and line != "data: [DONE]":
                    self.chunks.append(json.loads(line[len("data: "):]))
                    self.first.set()

    def result(self) -> dict:
        self.thread.join(300)
        return self.chunks[-1]


def test_pause_in_place_keeps_requests_and_continue_finishes_them(server, hf_model, rng):
    stream = Stream(server, rng.integers(3, 384, size=7).tolist())
    assert server.post("/pause_generation", json={"mode": "in_place"}).json() == PAUSED
    assert load(server)["num_reqs"] == 1 and load(server)["num_waiting_reqs"] == 0  # still running, in place
    emitted = len(stream.chunks)
    # Its pages stay: a flush cannot happen, not even after waiting a little.
    assert server.post("/flush_cache", params={"timeout": "0.3"}).status_code == 400
    assert len(stream.chunks) == emitted and stream.chunks[-1]["meta_info"]["finish_reason"] is None
    assert server.post("/continue_generation", json={}).json() == CONTINUED
    out = stream.result()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    assert_greedy(hf_model, stream.ids, out["output_ids"], LONG, "paused in place")


def test_pause_retract_then_flush_succeeds_and_continue_regenerates(server, hf_model, rng):
    stream = Stream(server, rng.integers(3, 384, size=9).tolist())
    assert server.post("/pause_generation", json={"mode": "retract"}).json() == PAUSED
    now = load(server)
    assert now["num_reqs"] == 1 and now["num_waiting_reqs"] == 1  # back in the queue, its pages given back
    # The RL deadlock: a flush while paused in retract mode must go through (the request holds no pages).
    flushed = server.post("/flush_cache")
    assert flushed.status_code == 200 and flushed.text.startswith("Cache flushed.\n")
    info = server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert info["free"] == info["total"]
    assert server.post("/continue_generation").json() == CONTINUED
    out = stream.result()
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    assert_greedy(hf_model, stream.ids, out["output_ids"], LONG, "retracted, flushed, continued")


def test_pause_abort_aborts_and_later_requests_wait_for_continue(server, hf_model, rng):
    stream = Stream(server, rng.integers(3, 384, size=5).tolist())
    assert server.post("/pause_generation").json() == PAUSED  # mode defaults to abort
    assert stream.result()["meta_info"]["finish_reason"]["type"] == "abort"
    ids = rng.integers(3, 384, size=6).tolist()
    results = []
    worker = threading.Thread(target=lambda: results.append(server.post("/generate", json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}}).json()))
    worker.start()
    wait_for(lambda: load(server)["num_waiting_reqs"] == 1, "the request to queue")
    assert not results
    assert server.post("/flush_cache").status_code == 200  # waiting requests hold no pages
    assert server.post("/continue_generation").json() == CONTINUED
    worker.join(300)
    assert_greedy(hf_model, ids, results[0]["output_ids"], 12, "sent while paused")


def test_pause_refuses_an_unknown_mode(server):
    reply = server.post("/pause_generation", json={"mode": "later"})
    assert reply.status_code == 400
    assert reply.json() == {"error": {"message": "mode must be one of abort, retract, in_place; got 'later'."}}


def test_flush_cache_timeout_waits_for_running_requests(server, rng):
    stream = Stream(server, rng.integers(3, 384, size=4).tolist(), n=64)
    assert server.post("/flush_cache").status_code == 400  # busy, no timeout: refused at once
    assert server.post("/flush_cache", params={"timeout": "300"}).status_code == 200  # waits for it to finish
    assert stream.result()["meta_info"]["finish_reason"]["type"] == "length"
    bad = server.post("/flush_cache", params={"timeout": "soon"})
    assert bad.status_code == 400 and bad.json() == {"error": {"message": "timeout must be a number of seconds, "
                                                                          "got 'soon'."}}


def memory(server) -> dict:
    return server.get("/get_server_info").json()["internal_states"][0]["memory_usage"]


@pytest.mark.parametrize("tags", [None, ["weights"], ["kv_cache"]])
def test_release_and_resume_memory_give_identical_generation(server, rng, tags):
    ids = rng.integers(3, 384, size=8).tolist()
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}
    before_out = server.post("/generate", json=body).json()["output_ids"]
    before = memory(server)
    released = server.post("/release_memory_occupation", json={"tags": tags})
    assert released.status_code == 200 and released.json() is None
    after = memory(server)
    freed = before["device_bytes_in_use"] - after["device_bytes_in_use"]
    expected = (before["weight"] if tags != ["kv_cache"] else 0) + (before["kvcache"] if tags != ["weights"] else 0)
    assert freed >= 0.99 * expected * 2**30, (before, after)
    assert after["weight"] == (0.0 if tags != ["kv_cache"] else before["weight"])
    # A request arriving while released waits for the resume.
    results = []
    worker = threading.Thread(target=lambda: results.append(server.post("/generate", json=body).json()))
    worker.start()
    wait_for(lambda: load(server)["num_waiting_reqs"] == 1, "the request to queue")
    assert not results
    resumed = server.post("/resume_memory_occupation", json={"tags": tags})
    assert resumed.status_code == 200 and resumed.json() is None
    worker.join(300)
    assert results[0]["output_ids"] == before_out
    assert memory(server)["device_bytes_in_use"] >= before["device_bytes_in_use"] - 2**20
    assert server.post("/generate", json=body).json()["output_ids"] == before_out


def test_release_needs_no_request_in_flight_and_checks_tags(server, rng):
    stream = Stream(server, rng.integers(3, 384, size=4).tolist(), n=LONG)
    busy = server.post("/release_memory_occupation", json={"tags": ["weights"]})
    assert busy.status_code == 400
    assert busy.json()["error"]["message"].startswith("release_memory_occupation needs no request in flight")
    assert stream.result()["meta_info"]["finish_reason"]["type"] == "length"
    bad = server.post("/release_memory_occupation", json={"tags": ["gpu"]})
    assert bad.status_code == 400
    assert bad.json() == {"error": {"message": "Unknown memory tag 'gpu'; tags are kv_cache, weights, cuda_graph."}}


def test_an_update_while_paused_runs_at_once_and_keep_pause_keeps_it_paused(server, tiny_llama_dir, hf_model, rng):
    stream = Stream(server, rng.integers(3, 384, size=6).tolist())
    assert server.post("/pause_generation", json={"mode": "retract"}).json() == PAUSED
    # Paused, the swap does not wait for the (retracted) request: it would never finish.
    reply = server.post("/update_weights_from_disk", json={"model_path": str(tiny_llama_dir), "keep_pause": True})
    assert reply.json()["success"] is True
    assert server.post("/continue_generation").json() == CONTINUED
    out = stream.result()
    assert_greedy(hf_model, stream.ids, out["output_ids"], LONG, "retracted across an update")
    # keep_pause on a running server: generation is paused (in place) after the swap.
    reply = server.post("/update_weights_from_disk", json={"model_path": str(tiny_llama_dir), "keep_pause": True})
    assert reply.json()["success"] is True
    ids = rng.integers(3, 384, size=5).tolist()
    results = []
    worker = threading.Thread(target=lambda: results.append(server.post("/generate", json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}).json()))
    worker.start()
    wait_for(lambda: load(server)["num_waiting_reqs"] == 1, "the request to queue")
    assert not results
    assert server.post("/continue_generation").json() == CONTINUED
    worker.join(300)
    assert_greedy(hf_model, ids, results[0]["output_ids"], 6, "after keep_pause")
