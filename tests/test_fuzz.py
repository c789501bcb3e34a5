"""2,000+ generated malformed or hostile requests across every route, through the real server: each gets
an answer below 500 (a 4xx carries a JSON error), none hangs, and afterwards a normal request still
gives transformers' greedy tokens and no page is held.

Bodies come from hypothesis (seeded by FUZZ_TEST_SEED, printed): wrong types, missing and extra fields,
huge and negative numbers, NaN and infinities, deep nesting, invalid UTF-8, truncated JSON, empty and
whitespace prompts, unknown token ids, unknown paths and methods. Routes that change the server's state
for everyone (weights, flush, abort-all, expert recording) are fuzzed with bodies that cannot succeed
in doing so, so the requests that follow still meet the same server.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
import transformers
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conftest import ServerProcess, replayable_seed
from tests.hf_reference import assert_greedy

FUZZ_SEED = replayable_seed("FUZZ_TEST_SEED")
EXAMPLES = 700  # per test below; three tests: 2,100 requests

# The routes come from the server's own /openapi.json (built from its route table), so a route added
# later is fuzzed without an edit here. Known body fields make bodies reach real validation paths.
FIELDS = {
    "/generate": ["text", "input_ids", "sampling_params", "stream", "rid", "return_logprob", "image_data",
                  "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs", "lora_path"],
    "/encode": ["text", "input_ids", "rid", "dimensions"],
    "/classify": ["text", "input_ids", "rid"],
    "/v1/embeddings": ["input", "model", "encoding_format", "dimensions", "user"],
    "/v1/rerank": ["query", "documents", "top_n", "return_documents"],
    "/v1/completions": ["prompt", "model", "max_tokens", "temperature", "n", "stop", "logprobs", "echo",
                        "stream", "stream_options", "seed", "logit_bias", "response_format"],
    "/v1/chat/completions": ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "n",
                             "stop", "logprobs", "top_logprobs", "stream", "tools", "response_format", "seed"],
    "/tokenize": ["prompt", "add_special_tokens", "model"], "/detokenize": ["tokens", "model"],
    "/abort_request": ["rid"],
    "/update_weights_from_disk": ["model_path", "load_format", "weight_version", "flush_cache"],
}
# Routes whose whole purpose is to change the server for everyone; the fuzzing sends them nothing, so
# the requests that follow meet the same server (an empty body would flush, pause or release it).
STATEFUL = {"/flush_cache", "/start_expert_distribution_record", "/stop_expert_distribution_record",
            "/dump_expert_distribution_record", "/pause_generation", "/continue_generation",
            "/release_memory_occupation", "/resume_memory_occupation", "/update_weight_version"}
SAMPLING_KEYS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
                 "stop_token_ids", "ignore_eos", "frequency_penalty", "presence_penalty", "repetition_penalty",
                 "json_schema", "regex", "ebnf", "logit_bias", "sampling_seed", "skip_special_tokens",
                 "no_stop_trim", "stream_interval", "custom_params"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 383, 384, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", " ", "\n\t", "\x00", "\ud800", "a" * 3000, "😀" * 50]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=25)


def deep(n: int) -> bytes:
    """JSON nested `n` levels (objects and lists alternating), written out: json.dumps would recurse."""
    opening = "".join('{"a":' if i % 2 else "[" for i in range(n))
    closing = "".join("}" if i % 2 else "]" for i in reversed(range(n)))
    return (opening + "1" + closing).encode()


@st.composite
def shaped_body(draw, route: str) -> dict:
    """A dict with some of the route's own fields, hostile values in them, sometimes extra keys."""
    fields = FIELDS.get(route, [])
    body = {key: draw(json_values) for key in draw(st.lists(st.sampled_from(fields), max_size=4, unique=True))} \
        if fields else {}
    if route == "/generate" and draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(SAMPLING_KEYS), max_size=5, unique=True))
        body["sampling_params"] = {key: draw(json_values) for key in keys}
        # A body that might validate must still finish fast and must not stream forever.
        body["sampling_params"]["max_new_tokens"] = draw(st.integers(min_value=-5, max_value=4))
        body.setdefault("input_ids", draw(st.lists(st.integers(min_value=-3, max_value=400), max_size=8)))
    if route == "/update_weights_from_disk":
        # Never a real checkpoint (an empty path would mean the bundled default model).
        body["model_path"] = draw(st.one_of(st.text(max_size=20).map(lambda s: "/nonexistent/" + s), json_values))
    if route == "/abort_request":
        body.pop("abort_all", None)  # aborting everyone's requests is not a malformed request
    if draw(st.booleans()):
        body[draw(st.text(max_size=10))] = draw(json_values)
    return body


def raw_bytes(body: object) -> bytes:
    return json.dumps(body, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def hostile_payload(draw) -> bytes:
    # Every part is drawn every time, whatever the kind, so hypothesis sees one shape of data.
    kind = draw(st.sampled_from(["json", "truncated", "binary", "deep", "empty", "whitespace"]))
    value = raw_bytes(draw(json_values))
    cut = draw(st.floats(min_value=0.0, max_value=0.99))
    binary = draw(st.binary(max_size=200)) + b"\xff\xfe\xc3\x28"  # never valid UTF-8
    depth = draw(st.integers(min_value=50, max_value=3000))
    return {"json": value, "truncated": value[: int(len(value) * cut)], "binary": binary,
            "deep": b'{"text": "x", "sampling_params": ' + deep(depth) + b"}", "empty": b"",
            "whitespace": b"  \n "}[kind]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, "--page-size", "4", "--max-total-tokens", "1024",
                         "--max-running-requests", "8", "--skip-server-warmup", "--enable-metrics")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def routes(server) -> list[tuple[str, str]]:
    """(method, path) of every operation the server documents, path parameters filled in."""
    paths = server.get("/openapi.json").json()["paths"]
    found = [(method.upper(), path.replace("{model_id}", "x")) for path, ops in paths.items()
             for method in ops if path not in STATEFUL]
    assert {"/generate", "/v1/chat/completions", "/encode", "/tokenize"} <= {p for _, p in found}
    return sorted(found)


def check(response: requests.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), (what, response.text[:200])
        response.json()


SESSION = requests.Session()  # keep-alive: the fuzzing measures the server, not TCP handshakes


def send(server, method: str, path: str, data: bytes | None) -> None:
    headers = {"content-type": "application/json"} if data is not None else {}
    response = SESSION.request(method, server.url + path, data=data, headers=headers, timeout=60)
    check(response, f"{method} {path} {data[:120] if data else data!r}")


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@seed(FUZZ_SEED)
@SETTINGS
@given(data=st.data())
def test_shaped_bodies_on_every_route(server, routes, data):
    method, route = data.draw(st.sampled_from(routes))
    body = data.draw(shaped_body(route))
    send(server, method, route, raw_bytes(body) if method in ("POST", "PUT") else None)


@seed(FUZZ_SEED + 1)
@SETTINGS
@given(data=st.data())
def test_hostile_payloads_on_every_route(server, routes, data):
    method, route = data.draw(st.sampled_from([(m, r) for m, r in routes if m in ("POST", "PUT")]))
    send(server, method, route, data.draw(hostile_payload()))


@seed(FUZZ_SEED + 2)
@SETTINGS
@given(data=st.data())
def test_unknown_paths_and_methods(server, routes, data):
    known = {path for _, path in routes}
    path = data.draw(st.one_of(st.sampled_from(sorted(known)), st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="?#%"),
        max_size=30).map(lambda s: "/" + s)))
    method = data.draw(st.sampled_from(METHODS))
    if path in STATEFUL or path.rstrip("/") in STATEFUL or (path in known and (method, path) not in routes
                                                             and method in ("GET", "POST", "PUT")):
        method = "DELETE"  # a method the route does not take: answered 405, never acted on
    send(server, method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None)


def test_after_the_fuzzing_the_server_still_serves_right(server, tiny_llama_dir):
    rng = np.random.default_rng(FUZZ_SEED)
    ids = rng.integers(3, 384, size=11).tolist()
    r = server.post("/generate", json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    assert_greedy(hf, ids, r.json()["output_ids"], 10)
    assert server.get("/health_generate").status_code == 200
    pages = server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert pages["locked"] == 0 and pages["invariant_errors"] == 0
