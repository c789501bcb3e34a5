"""`--enable-metrics` through the real server: SGLang's `sglang:*` series (contract 5.17), parsed with
prometheus_client's own parser; counters move by exactly what the requests did, histograms have
SGLang's buckets, gauges follow the load, and the server's health probes are not counted.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import E2E_BUCKETS, ITL_BUCKETS, QUEUE_BUCKETS, TTFT_BUCKETS, ServerMetrics
from serving.observers import RequestLog
from serving.protocol import FinishReason, Output, SamplingParams
from serving.request import Task
from tests.conftest import ServerProcess, replayable_seed

MODEL_NAME = "tiny-metrics"
KEY = "sk-metrics"
AUTH = {"Authorization": f"Bearer {KEY}"}
FLAGS = ("--page-size", "4", "--max-total-tokens", "2048", "--chunked-prefill-size", "32", "--random-seed", "0",
         "--enable-metrics", "--api-key", KEY, "--served-model-name", MODEL_NAME)
LABELS = {"model_name": MODEL_NAME}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir, *FLAGS)
    yield proc
    assert proc.stop() == 0


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample, keyed by (name, sorted labels); /metrics needs no key."""
    r = server.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **extra):
    return samples[(name, tuple(sorted({**LABELS, **extra}.items())))]


def generate(server, prompt, new_tokens, **extra):
    body = {"input_ids": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens,
                                                      "ignore_eos": True}, **extra}
    r = server.post("/generate", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    return r


def wait_idle(server):
    for _ in range(600):
        if server.get("/get_load", headers=AUTH).json()[0]["num_reqs"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("server never went idle")


def test_counters_and_histograms_move_by_what_requests_did(server):
    wait_idle(server)
    before = scrape(server)
    generate(server, [5, 6, 7, 8, 9], 6)
    generate(server, [11, 12, 13], 4, stream=True)
    after = scrape(server)

    def delta(name):
        return value(after, name) - value(before, name)

    assert delta("sglang:num_requests_total") == 2
    assert delta("sglang:prompt_tokens_total") == 5 + 3
    assert delta("sglang:generation_tokens_total") == 6 + 4
    assert delta("sglang:num_aborted_requests_total") == 0
    for name in ("time_to_first_token", "e2e_request_latency", "queue_time"):
        assert delta(f"sglang:{name}_seconds_count") == 2, name
        assert delta(f"sglang:{name}_seconds_sum") > 0, name
    # One inter-token observation per token after a request's first (which its prefill step made).
    assert delta("sglang:inter_token_latency_seconds_count") == (6 - 1) + (4 - 1)
    assert value(after, "sglang:max_total_num_tokens") == 2048
    assert value(after, "sglang:num_running_reqs") == 0 and value(after, "sglang:num_queue_reqs") == 0
    assert 0 <= value(after, "sglang:cache_hit_rate") <= 1


def test_histogram_buckets_are_sglangs(server):
    samples = scrape(server)
    for name, buckets in (("time_to_first_token", TTFT_BUCKETS), ("inter_token_latency", ITL_BUCKETS),
                          ("e2e_request_latency", E2E_BUCKETS), ("queue_time", QUEUE_BUCKETS)):
        bounds = sorted(float(dict(labels)["le"]) for series, labels in samples
                        if series == f"sglang:{name}_seconds_bucket")
        assert bounds == [float(b) for b in buckets] + [float("inf")], name
    assert TTFT_BUCKETS[:3] == (0.1, 0.2, 0.4) and ITL_BUCKETS[0] == 0.002 and E2E_BUCKETS[-1] == 800


def test_cached_tokens_counted_on_a_repeated_prompt(server):
    prompt = list(range(40, 64))  # six pages of 4: the second request reuses five of them
    generate(server, prompt, 2)
    before = scrape(server)
    second = generate(server, prompt, 2).json()
    after = scrape(server)
    cached = second["meta_info"]["cached_tokens"]
    assert cached > 0
    assert value(after, "sglang:cached_tokens_total") - value(before, "sglang:cached_tokens_total") == cached


def test_gauges_follow_load_and_aborts_are_counted(server):
    wait_idle(server)
    before = scrape(server)
    body = {"input_ids": [70, 71, 72], "sampling_params": {"max_new_tokens": 230, "ignore_eos": True}}
    worker = threading.Thread(target=server.post, args=("/generate",), kwargs={"json": body, "headers": AUTH})
    worker.start()
    for _ in range(600):
        busy = scrape(server)
        if value(busy, "sglang:num_running_reqs") == 1:
            break
        time.sleep(0.01)
    assert value(busy, "sglang:num_running_reqs") == 1
    assert value(busy, "sglang:num_used_tokens") > 0 and value(busy, "sglang:token_usage") > 0
    server.post("/abort_request", json={"abort_all": True}, headers=AUTH)
    worker.join()
    wait_idle(server)
    after = scrape(server)
    assert value(after, "sglang:num_aborted_requests_total") - value(before, "sglang:num_aborted_requests_total") == 1
    assert value(after, "sglang:num_running_reqs") == 0 and value(after, "sglang:num_used_tokens") == 0


def test_health_probes_are_not_counted(server):
    wait_idle(server)
    before = scrape(server)
    for _ in range(3):
        assert server.get("/health_generate").status_code == 200
    after = scrape(server)
    assert value(after, "sglang:num_requests_total") == value(before, "sglang:num_requests_total")
    assert value(after, "sglang:prompt_tokens_total") == value(before, "sglang:prompt_tokens_total")


# -- in process: the weighted observation and the request log ------------------------------------------
def test_weighted_inter_token_observation_equals_repeated_observes():
    seed = replayable_seed("METRICS_TEST_SEED")
    rng = random.Random(seed)
    weighted, repeated = ServerMetrics("m", 64), ServerMetrics("m", 64)
    for _ in range(50):
        interval, count = rng.uniform(0, 10) ** 3 / 100, rng.randint(1, 64)
        weighted._observe_many(weighted.itl, interval, count)
        for _ in range(count):
            repeated.itl.observe(interval)

    def samples(metrics):
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in metrics.registry.collect() for s in family.samples
                if family.name == "sglang:inter_token_latency_seconds" and not s.name.endswith("_created")}

    got, want = samples(weighted), samples(repeated)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_request_log_levels(level, caplog):
    sampling = SamplingParams.from_dict({"max_new_tokens": 7, "temperature": 0.5})
    request = SimpleNamespace(rid="r1", task=Task.GENERATE, created=time.monotonic(), sampling=sampling,
                              input_ids=list(range(1000)))
    out = Output(rid="r1", index=0, text="x" * 3000, output_ids=[1] * 7, finish_reason=FinishReason.max_length(7),
                 prompt_tokens=1000, completion_tokens=7, cached_tokens=0, retractions=0)
    with caplog.at_level(logging.INFO, logger="serving.requests"):
        RequestLog(level).finished(request, out)
    line = caplog.records[-1].getMessage()
    assert line.startswith("Finish: rid=r1 task=generate prompt_tokens=1000 completion_tokens=7 cached_tokens=0 ")
    assert ("'max_new_tokens': 7" in line) == (level >= 1)
    assert ("input_ids=[0, 1, 2" in line) == (level >= 2)
    assert ("... (3002 characters)" in line) == (level == 2)  # repr() of the text adds the quotes
    assert ("x" * 3000 in line) == (level == 3)
