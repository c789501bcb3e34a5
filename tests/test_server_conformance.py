"""What SGLang's own native-API tests expect of a server, checked through the real server.

One server, launched the way those tests launch theirs: `--max-running-requests 1 --max-queued-requests 1`
(request-queue validation), `--skip-tokenizer-init --stream-output` (skip-tokenizer-init streaming),
a served name with a slash (the `openai` client's models.retrieve), and the log at info level (the abort
line and the periodic `#running-req` / `#queue-req` lines). Prompts are token ids throughout.
"""

from __future__ import annotations

import json
import re
import threading

import pytest
import requests

from tests.conftest import ServerProcess, sse_lines

SERVED_NAME = "org/tiny-model"
FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--chunked-prefill-size", "32", "--random-seed", "0",
         "--max-running-requests", "1", "--max-queued-requests", "1", "--skip-tokenizer-init", "--stream-output",
         "--served-model-name", SERVED_NAME, "--log-level", "info", "--decode-log-interval", "4")
PROMPT = [5, 17, 42, 99, 7, 3, 250]
QUEUE_FULL = {"object": "error", "message": "The request queue is full.", "type": "503", "param": None, "code": 503}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


def body(max_new_tokens=8, **extra):
    return {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                                                      "ignore_eos": True}, **extra}


def full_log(server) -> str:
    server.log.flush()
    return server.log_path.read_text()


def wait_idle(server):
    for _ in range(300):
        if server.get("/get_load").json()[0]["num_reqs"] == 0:
            return
        threading.Event().wait(0.1)
    raise AssertionError(server.get("/get_load").json())


def concurrently(server, bodies):
    """POST each body from its own thread, all released at once; (status, json) per body, in order."""
    results = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        r = server.post("/generate", json=bodies[i])
        results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_queue_full_is_503_and_accepted_requests_finish(server):
    # SGLang's test_max_queued_requests_validation_with_concurrent_requests: one running, one waiting,
    # every other request refused at once with the contract's 503 body.
    long = 200  # long enough that all ten arrive while the first still runs
    results = concurrently(server, [body(long, rid=f"q{i}") for i in range(10)])
    statuses = [status for status, _ in results]
    assert 1 <= statuses.count(200) <= 2, statuses
    for status, payload in results:
        if status == 200:  # accepted: runs to its end, never dropped
            assert payload["meta_info"]["finish_reason"] == {"type": "length", "length": long}
            assert len(payload["output_ids"]) == long
        else:
            assert (status, payload) == (503, QUEUE_FULL)
    # Serially nothing is refused, and the server keeps serving.
    assert [server.post("/generate", json=body(4)).status_code for _ in range(3)] == [200] * 3
    log = full_log(server)
    for i, (status, _) in enumerate(results):
        line = f"Abort request q{i} in arrival: The request queue is full. (--max-queued-requests 1)"
        assert (line in log) == (status == 503), (i, status)
    # SGLang's test_max_running_requests_and_max_queued_request_validation reads these from the log.
    running = [int(n) for n in re.findall(r"#running-req:\s*(\d+)", log)]
    queued = [int(n) for n in re.findall(r"#queue-req:\s*(\d+)", log)]
    assert "Decode batch. #running-req: 1, #token: " in log and "gen throughput (token/s): " in log
    assert "Prefill batch. #new-seq: 1, #new-token: " in log
    assert running and queued and max(running) <= 1 and max(queued) <= 1


def test_duplicate_rid_in_flight_is_400(server):
    wait_idle(server)
    with requests.post(server.url + "/generate", json=body(150, rid="dup-1", stream=True), stream=True,
                       timeout=300) as first:
        lines = sse_lines(first)
        assert next(line for line in lines if line).startswith("data: ")  # dup-1 is running now
        again = server.post("/generate", json=body(4, rid="dup-1"))
        assert again.status_code == 400
        assert again.json() == {"error": {"message": "Duplicate request ID detected: dup-1"}}
        events = [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    # The first request was neither aborted nor shadowed by the second.
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 150}
    # Its id is free again once it finished.
    assert server.post("/generate", json=body(2, rid="dup-1")).status_code == 200


def test_duplicate_rids_in_one_batch_are_400(server):
    r = server.post("/generate", json={"input_ids": [PROMPT, PROMPT], "rid": ["same", "same"]})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Duplicate request IDs detected within the request: ['same']"}}


def test_abort_is_logged_with_rid_and_reason(server):
    wait_idle(server)
    with requests.post(server.url + "/generate", json=body(150, rid="to-abort", stream=True), stream=True,
                       timeout=300) as r:
        lines = sse_lines(r)
        assert next(line for line in lines if line).startswith("data: ")
        assert server.post("/abort_request", json={"rid": "to-abort"}).status_code == 200
        events = [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    assert events[-1]["meta_info"]["finish_reason"]["message"] == "Aborted"
    assert "Abort request to-abort in running: Aborted (/abort_request)" in full_log(server)


def test_abort_of_an_unknown_rid_is_ignored(server):
    """Contract 5.14: ignored unless the rid is in flight (or abort_all); an empty or partial rid used to
    abort every request whose id it prefixes, i.e. `{}` aborted them all."""
    wait_idle(server)
    with requests.post(server.url + "/generate", json=body(60, rid="keep-running", stream=True), stream=True,
                       timeout=300) as r:
        lines = sse_lines(r)
        assert next(line for line in lines if line).startswith("data: ")
        for stray in ({}, {"rid": ""}, {"rid": "keep"}, {"rid": "no-such-request"}):
            assert server.post("/abort_request", json=stray).status_code == 200
        events = [json.loads(line[6:]) for line in lines if line and line != "data: [DONE]"]
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 60}


def test_stream_output_chunks_add_up_to_the_non_streamed_ids(server):
    # SGLang's skip-tokenizer-init run_decode_stream: with --stream-output the chunks are disjoint.
    request = body(24, logprob_start_len=0, return_logprob=False, top_logprobs_num=0)
    whole = server.post("/generate", json=request).json()
    assert "text" not in whole and len(whole["output_ids"]) == 24
    with requests.post(server.url + "/generate", json={**request, "stream": True}, stream=True, timeout=300) as r:
        events = [json.loads(line[6:]) for line in sse_lines(r)
                  if line and line != "data: [DONE]"]
    streamed = [token for event in events for token in event["output_ids"]]
    assert len(events) > 1 and streamed == whole["output_ids"]


def test_top_logprobs_num_without_return_logprob_is_ignored(server):
    r = server.post("/generate", json=body(2, return_logprob=False, top_logprobs_num=5))
    assert r.status_code == 200, r.text
    assert len(r.json()["output_ids"]) == 2


def test_model_card_by_percent_encoded_id(server):
    # openai's models.retrieve("org/tiny-model") requests /v1/models/org%2Ftiny-model.
    for path in ("/v1/models/org%2Ftiny-model", "/v1/models/org/tiny-model"):
        r = server.get(path)
        assert r.status_code == 200, (path, r.text)
        assert r.json()["id"] == SERVED_NAME
    missing = server.get("/v1/models/org%2Fother")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The model 'org/other' does not exist"
