"""SIGTERM with requests in flight, through the real server: they finish (within the grace period), new
requests and health checks get 503 meanwhile, and the process exits 0; past the grace period what still
runs is aborted, and its client is told."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from tests.conftest import ServerProcess, make_tiny_checkpoint, sse_lines

FLAGS = ("--page-size", "4", "--max-total-tokens", "8192", "--skip-server-warmup")
LONG = 1500  # tokens: a few seconds of decoding, so the requests are still running at the signal


@pytest.fixture(scope="module")
def long_context_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("shutdown"), "llama", max_position_embeddings=8192)


def _long_request(server, n, results, key):
    r = requests.post(server.url + "/generate", json={"input_ids": [5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": n, "ignore_eos": True}}, timeout=300)
    results[key] = (r.status_code, r.json())


def _stream_until_first_chunk(server, n):
    r = requests.post(server.url + "/generate", json={"input_ids": [8, 9], "stream": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": n, "ignore_eos": True}}, stream=True, timeout=300)
    lines = sse_lines(r)
    next(line for line in lines if line)
    return r, lines


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones(long_context_dir):
    server = ServerProcess(long_context_dir, *FLAGS, "--graceful-shutdown-timeout", "120")
    results = {}
    worker = threading.Thread(target=_long_request, args=(server, LONG, results, "plain"))
    worker.start()
    stream, lines = _stream_until_first_chunk(server, LONG)  # both are running now
    assert server.get("/get_load").json()[0]["num_reqs"] == 2
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = requests.post(server.url + "/generate", json={"input_ids": [1, 2]}, timeout=30)
    assert refused.status_code == 503 and refused.json()["message"] == "The server is shutting down."
    assert requests.get(server.url + "/health", timeout=30).status_code == 503
    events = [line[len("data: "):] for line in lines if line]
    stream.close()
    worker.join()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    status, body = results["plain"]
    assert status == 200 and body["meta_info"]["finish_reason"] == {"type": "length", "length": LONG}
    assert server.proc.wait(timeout=60) == 0
    server.stop()


def test_past_the_grace_period_requests_are_aborted_and_told(long_context_dir):
    server = ServerProcess(long_context_dir, *FLAGS, "--graceful-shutdown-timeout", "1")
    stream, lines = _stream_until_first_chunk(server, 8000)
    server.proc.send_signal(signal.SIGTERM)
    events = [line[len("data: "):] for line in lines if line]
    stream.close()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and last["completion_tokens"] < 8000
    assert server.proc.wait(timeout=60) == 0
    server.stop()
