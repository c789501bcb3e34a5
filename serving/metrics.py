"""`--enable-metrics`: SGLang's Prometheus series (contract 5.17), so its Grafana dashboards read ours.

Series, names and buckets as SGLang's `metrics/collector.py`, each labelled `model_name` (the served
model name):

- per finished request (`finished`, on the scheduler thread from data already on the host):
  counters `sglang:prompt_tokens_total`, `sglang:generation_tokens_total`, `sglang:cached_tokens_total`,
  `sglang:num_requests_total`, `sglang:num_aborted_requests_total`; histograms
  `sglang:e2e_request_latency_seconds`, `sglang:time_to_first_token_seconds`,
  `sglang:queue_time_seconds` (arrival to first admission);
- per step (`ReplicaStepMetrics.after_step`, one per data-parallel replica, each timing its own steps):
  `sglang:inter_token_latency_seconds` (one observation per decoded token: the
  time since the previous step ended, which is exactly the gap between two tokens of a request that
  decodes in both) and `sglang:cache_hit_rate` (cached / (cached + computed) prompt tokens of the last
  step that ran prefill, as SGLang's gauge);
- at scrape time (`gauge_values`, run on each replica's scheduler thread between two steps so nothing is
  read while it changes, then summed over the replicas by `set_gauges`): `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:num_used_tokens`,
  `sglang:token_usage`, `sglang:max_total_num_tokens`, `sglang:num_retracted_reqs` (waiting requests
  that were retracted at least once), `sglang:gen_throughput` (tokens generated in the last 5 s / 5 s).

The per-request series leave out the server's own warm-up and health probes (serving/observers.py);
the per-step ones see every step, the warm-up's included, as the steps are shared.

Each server has its own `CollectorRegistry`, so several engines in one process (tests, notebooks) do
not collide. Nothing here touches the device; a step costs one histogram update, not one per request.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from serving.protocol import Output

if TYPE_CHECKING:
    from serving.request import Request
    from serving.scheduler import Scheduler

CONTENT_TYPE = CONTENT_TYPE_LATEST
THROUGHPUT_WINDOW_S = 5.0

# SGLang's buckets (metrics/collector.py).
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
               0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 800)
QUEUE_BUCKETS = (0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500,
                 600, 700, 800, 900, 1000)


class StepMetrics(Protocol):
    """What the scheduler calls once per step (see `Scheduler.step`)."""

    def after_step(self, *, decodes: int, prefill_tokens: int, cached_tokens: int, generated: int) -> None: ...


class ServerMetrics:
    def __init__(self, model_name: str, max_total_tokens: int):
        self.registry = CollectorRegistry()
        self.max_total_tokens = max(max_total_tokens, 1)
        labels = {"model_name": model_name}

        def series(kind, name: str, doc: str, **kwargs):
            return kind(name, doc, labelnames=list(labels), registry=self.registry, **kwargs).labels(**labels)

        self.prompt_tokens = series(Counter, "sglang:prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = series(Counter, "sglang:generation_tokens_total",
                                        "Number of generation tokens processed.")
        self.cached_tokens = series(Counter, "sglang:cached_tokens_total", "Number of cached prompt tokens.")
        self.num_requests = series(Counter, "sglang:num_requests_total", "Number of requests processed.")
        self.num_aborted = series(Counter, "sglang:num_aborted_requests_total", "Number of requests aborted.")
        self.ttft = series(Histogram, "sglang:time_to_first_token_seconds",
                           "Histogram of time to first token in seconds.", buckets=TTFT_BUCKETS)
        self.itl = series(Histogram, "sglang:inter_token_latency_seconds",
                          "Histogram of inter-token latency in seconds.", buckets=ITL_BUCKETS)
        self.e2e = series(Histogram, "sglang:e2e_request_latency_seconds",
                          "Histogram of End-to-end request latency in seconds", buckets=E2E_BUCKETS)
        self.queue_time = series(Histogram, "sglang:queue_time_seconds",
                                 "Histogram of queueing time in seconds.", buckets=QUEUE_BUCKETS)
        self.num_running = series(Gauge, "sglang:num_running_reqs", "The number of running requests.")
        self.num_queue = series(Gauge, "sglang:num_queue_reqs", "The number of requests in the waiting queue.")
        self.num_used_tokens = series(Gauge, "sglang:num_used_tokens", "The number of used tokens.")
        self.token_usage = series(Gauge, "sglang:token_usage", "The token usage.")
        self.gen_throughput = series(Gauge, "sglang:gen_throughput", "The generation throughput (token/s).")
        self.cache_hit_rate = series(Gauge, "sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.max_total_num_tokens = series(Gauge, "sglang:max_total_num_tokens",
                                           "Maximum total number of tokens in the KV cache pool.")
        self.num_retracted = series(Gauge, "sglang:num_retracted_reqs", "The number of retracted requests.")
        self.max_total_num_tokens.set(max_total_tokens)

    def step_metrics(self) -> ReplicaStepMetrics:
        """What one replica's scheduler calls after each step (a scheduler's `metrics`)."""
        return ReplicaStepMetrics(self)

    def finished(self, request: Request, out: Output) -> None:
        """One request's counters and latencies, when its final output is emitted."""
        now = time.monotonic()
        self.num_requests.inc()
        self.prompt_tokens.inc(out.prompt_tokens)
        self.generation_tokens.inc(out.completion_tokens)
        if out.cached_tokens:
            self.cached_tokens.inc(out.cached_tokens)
        if out.finish_reason is not None and out.finish_reason.is_abort:
            self.num_aborted.inc()
        self.e2e.observe(now - request.created)
        if request.admitted_at is not None:
            self.queue_time.observe(request.admitted_at - request.created)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.created)

    @staticmethod
    def gauge_values(scheduler: Scheduler) -> dict[str, int]:
        """One replica's load (run on its scheduler thread, through `Scheduler.call`)."""
        cache = scheduler.cache
        waiting = list(scheduler.waiting) + list(scheduler.held)
        recent = scheduler.metrics.recent_tokens() if isinstance(scheduler.metrics, ReplicaStepMetrics) else 0
        return {"running": len(scheduler.running), "queued": len(waiting),
                "used": (cache.num_total - cache.available_pages) * scheduler.page_size,
                "retracted": sum(1 for r in waiting if r.retractions), "recent_tokens": recent}

    def set_gauges(self, replicas: list[dict[str, int]]) -> None:
        """The load gauges: every replica's `gauge_values` summed (`max_total_tokens` is all replicas')."""
        total = {key: sum(values[key] for values in replicas) for key in replicas[0]}
        self.num_running.set(total["running"])
        self.num_queue.set(total["queued"])
        self.num_used_tokens.set(total["used"])
        self.token_usage.set(total["used"] / self.max_total_tokens)
        self.num_retracted.set(total["retracted"])
        self.gen_throughput.set(total["recent_tokens"] / THROUGHPUT_WINDOW_S)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)

    @staticmethod
    def _observe_many(histogram, interval: float, count: int) -> None:
        """`count` observations of `interval` with one bucket update (as SGLang's
        `observe_inter_token_latency`): prometheus_client has no weighted observe, and one call per
        token would cost a lock per running request every step."""
        histogram._sum.inc(interval * count)
        for bucket, bound in zip(histogram._buckets, histogram._upper_bounds, strict=True):
            if interval <= bound:
                bucket.inc(count)
                break


class ReplicaStepMetrics:
    """The per-step series of one replica (its scheduler thread only): the inter-token gap is the time since
    this replica's previous step ended, and its recent generated tokens feed `sglang:gen_throughput`."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self._last_step_end: float | None = None
        self._generated: deque[tuple[float, int]] = deque()  # (step end, tokens) of the last few seconds

    def after_step(self, *, decodes: int, prefill_tokens: int, cached_tokens: int, generated: int) -> None:
        metrics, now = self.metrics, time.monotonic()
        if decodes and self._last_step_end is not None:
            metrics._observe_many(metrics.itl, now - self._last_step_end, decodes)
        if prefill_tokens:
            metrics.cache_hit_rate.set(cached_tokens / (cached_tokens + prefill_tokens))
        if generated:
            self._generated.append((now, generated))
        while self._generated and self._generated[0][0] < now - THROUGHPUT_WINDOW_S:
            self._generated.popleft()
        self._last_step_end = now

    def recent_tokens(self) -> int:
        """Tokens generated in the last `THROUGHPUT_WINDOW_S` seconds."""
        now = time.monotonic()
        return sum(n for t, n in self._generated if t >= now - THROUGHPUT_WINDOW_S)
