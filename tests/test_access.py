"""Access and bounded load through the real server: `--api-key` (contract 1.2), CORS (1.3), the body-size
limit (413), `--max-queued-requests` (503) with `/get_load` during it, `--preferred-sampling-params` and
`--log-requests`. One server for the module, with every flag these need.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from tests.conftest import ServerProcess, sse_lines

KEY = "sk-test-\u00e9-key"  # non-ASCII on purpose: the comparison is on bytes
AUTH = {"Authorization": f"Bearer {KEY}".encode()}
BODY_LIMIT = 64 * 1024
PREFERRED = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--chunked-prefill-size", "32", "--random-seed", "0",
         "--api-key", KEY, "--max-request-body-size", str(BODY_LIMIT), "--max-running-requests", "1",
         "--max-queued-requests", "1", "--preferred-sampling-params", json.dumps(PREFERRED), "--log-requests",
         "--log-requests-level", "1", "--request-read-timeout", "2",
         "--keep-alive-timeout", "1")
UNAUTHORIZED = {"error": "Unauthorized"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


def generate(server, body, **kwargs):
    return server.post("/generate", json=body, headers=AUTH, **kwargs)


def test_api_key_required_except_health_and_metrics(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY.encode()},
                    {"Authorization": f"bearer {KEY}".encode()}, {"X-API-Key": KEY.encode()}):
        for path in ("/get_model_info", "/v1/models", "/get_load", "/openapi.json", "/no_such_route"):
            r = server.get(path, headers=headers)
            assert (r.status_code, r.json()) == (401, UNAUTHORIZED), (path, headers)
        r = server.post("/generate", json={"input_ids": [5, 6]}, headers=headers)
        assert (r.status_code, r.json()) == (401, UNAUTHORIZED)
    assert server.get("/get_model_info", headers=AUTH).status_code == 200
    assert server.get("/no_such_route", headers=AUTH).json() == {"detail": "Not Found"}
    for path in ("/health", "/health_generate"):
        assert server.get(path).status_code == 200
    # Open without the key, and 404 (not 401) because this server runs without --enable-metrics.
    assert (server.get("/metrics").status_code, server.get("/metrics").json()) == (404, {"detail": "Not Found"})


def test_cors_preflight_without_key_and_headers_on_responses(server):
    preflight = requests.options(server.url + "/generate", timeout=30, headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.text == "OK"
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://example.com"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"
    r = server.get("/get_model_info", headers={**AUTH, "Origin": "http://example.com"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    # An OPTIONS that is not a preflight is routed: no route answers OPTIONS, so 405 as in FastAPI.
    plain = requests.options(server.url + "/generate", headers=AUTH, timeout=30)
    assert (plain.status_code, plain.json()) == (405, {"detail": "Method Not Allowed"})


def test_oversize_body_is_413_and_the_server_keeps_serving(server):
    big = {"input_ids": [5] * (BODY_LIMIT // 2)}  # "5, " per id: about 1.5 x the limit
    r = generate(server, big)
    assert r.status_code == 413
    assert r.json() == {"object": "error", "message": f"The request is larger than the server accepts ({BODY_LIMIT} "
                        "bytes, --max-request-body-size).", "type": "413", "param": None, "code": 413}
    # Without a Content-Length (chunked upload), the limit holds while the body streams in.
    chunks = (json.dumps(big)[i:i + 8192].encode() for i in range(0, len(json.dumps(big)), 8192))
    r = requests.post(server.url + "/generate", data=chunks, headers=AUTH, timeout=60)
    assert r.status_code == 413 and r.json()["code"] == 413
    ok = generate(server, {"input_ids": [5, 6, 7]})
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == PREFERRED["max_new_tokens"]


STALLED = {
    "headers": b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Le",
    "body": b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Length: 100\r\n\r\n{\"input",
}


@pytest.mark.parametrize("part", list(STALLED))
def test_a_client_that_never_finishes_sending_gets_408(server, part):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(STALLED[part])
        reply = b""
        while chunk := sock.recv(4096):  # the server answers and closes once --request-read-timeout passes
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(payload)["message"] == "The request was not received within 2.0 s (--request-read-timeout)."
    assert generate(server, {"input_ids": [5, 6]}).status_code == 200


@pytest.mark.parametrize("raw", [b"GARBAGE\r\n\r\n", b"GET /get_load HTTP/1.1\r\nBad Header\r\n\r\n",
                                 b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                                 b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                                 + b"\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n"])
def test_malformed_http_is_a_json_400(server, raw):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    error = json.loads(payload)
    assert error["code"] == 400 and error["message"].startswith("Malformed HTTP request: ")


def test_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"GET /get_load HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):  # ends when the server closes the idle connection (or times out)
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200") and b"keep-alive" in reply.lower()


def test_preferred_sampling_params_under_the_request(server):
    body = {"input_ids": [9, 10, 11, 12]}
    preferred = generate(server, body).json()
    assert preferred["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert len(preferred["output_ids"]) == 5
    own = generate(server, {**body, "sampling_params": {"max_new_tokens": 2}}).json()
    assert own["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert own["output_ids"] == preferred["output_ids"][:2]  # temperature 0 still comes from the preferred ones
    info = server.get("/get_model_info", headers=AUTH).json()
    assert json.loads(info["preferred_sampling_params"]) == PREFERRED


def wait_for_load(server, predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = server.get("/get_load", headers=AUTH).json()[0]
        if predicate(load):
            return load
        time.sleep(0.01)
    raise AssertionError(f"load never matched: {load}")


def test_queue_bound_503_and_get_load_in_flight(server):
    long = {"sampling_params": {"max_new_tokens": 230}, "stream": True}
    prompts = {"a": [21, 22, 23, 24, 25], "b": [31, 32, 33]}
    streams: dict[str, list[dict]] = {}

    def run(name):
        body = {"input_ids": prompts[name], "rid": f"load-{name}", **long}
        with generate(server, body, stream=True) as r:
            events = [line[6:] for line in sse_lines(r) if line]
        streams[name] = [json.loads(e) for e in events[:-1]]

    first = threading.Thread(target=run, args=("a",))
    first.start()
    wait_for_load(server, lambda load: load["num_reqs"] == 1)
    second = threading.Thread(target=run, args=("b",))
    second.start()
    load = wait_for_load(server, lambda load: load["num_waiting_reqs"] == 1)
    # One running (its prompt and output so far in the KV cache), one queued (its prompt counted).
    assert load["num_reqs"] == 2 and load["num_tokens"] >= len(prompts["a"]) + len(prompts["b"])
    refused = generate(server, {"input_ids": [41, 42]})
    assert (refused.status_code, refused.json()) == (503, {"object": "error", "message": "The request queue is full.",
                                                          "type": "503", "param": None, "code": 503})
    assert server.post("/abort_request", json={"abort_all": True}, headers=AUTH).status_code == 200
    first.join()
    second.join()
    for name in "ab":
        assert streams[name][-1]["meta_info"]["finish_reason"]["type"] == "abort", streams[name][-1]
    wait_for_load(server, lambda load: load["num_reqs"] == 0 and load["num_tokens"] == 0)
    assert generate(server, {"input_ids": [41, 42]}).status_code == 200


def test_log_requests_lines(server):
    generate(server, {"input_ids": [51, 52, 53], "rid": "logged-rid", "sampling_params": {"max_new_tokens": 3}})
    server.log.flush()
    log = server.log_path.read_text()
    finish = next(line for line in log.splitlines() if "Finish: rid=logged-rid " in line)
    assert "prompt_tokens=3 completion_tokens=3" in finish and "'max_new_tokens': 3" in finish
    assert "input_ids=" not in finish  # level 1: the sampling params, no inputs or outputs
    assert "POST /generate -> 200" in log and "POST /generate -> 413" in log
    # The server's own probes are not logged as requests.
    assert "HEALTH_CHECK" not in log
