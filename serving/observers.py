"""Who sees each request when it finishes: `/metrics` (serving/metrics.py) and `--log-requests`.

The engine wraps a request's `emit` callback (`observed_emit`) only when one of them is on, so a
server without either pays nothing. The callback runs on the scheduler thread with data already on
the host. The server's own traffic (the warm-up request and `/health_generate` probes, run through
`Engine.probe` inside `internal_requests()`) is neither counted nor logged: a load balancer polling
/health_generate every second must not show up as requests. SGLang likewise marks its health probe
`log_metrics=False`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from serving.metrics import ServerMetrics
from serving.protocol import Output

if TYPE_CHECKING:
    from serving.request import Request
    from serving.server_args import ServerArgs

logger = logging.getLogger("serving.requests")

TRUNCATE_CHARS = 2048  # --log-requests-level 2 cuts inputs and outputs to this many characters
_INTERNAL = contextvars.ContextVar("pallas_serve_internal_request", default=False)


class FinishObserver(Protocol):
    def finished(self, request: Request, out: Output) -> None: ...


def finish_observers(args: ServerArgs, model_name: str,
                     max_total_tokens: int) -> tuple[ServerMetrics | None, list[FinishObserver]]:
    """The metrics (None without --enable-metrics) and every observer the flags ask for."""
    metrics = ServerMetrics(model_name, max_total_tokens) if args.enable_metrics else None
    observers: list[FinishObserver] = [metrics] if metrics is not None else []
    if args.log_requests:
        observers.append(RequestLog(args.log_requests_level))
    return metrics, observers


@contextlib.contextmanager
def internal_requests() -> Iterator[None]:
    """Requests made inside this block (in this task) are the server's own: not observed."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def observed_emit(request: Request, emit: Callable[[Output], None],
                  observers: list[FinishObserver]) -> Callable[[Output], None]:
    """`emit`, telling each observer about the request's final output first; `emit` itself when there
    is nothing to tell (no observer, or a request of the server's own)."""
    if not observers or _INTERNAL.get():
        return emit

    def emit_and_observe(out: Output) -> None:
        if out.finished:
            for observer in observers:
                try:
                    observer.finished(request, out)
                except Exception:  # an observer must never lose a request its output
                    logger.exception("observing request %s failed", request.rid)
        emit(out)

    return emit_and_observe


class RequestLog:
    """`--log-requests`: one info line per finished request. `--log-requests-level` as SGLang's: 0 the
    metadata, 1 + the sampling params, 2 + input ids and output text cut to 2048 characters, 3 + all."""

    def __init__(self, level: int):
        self.level = level
        # Asked for by name, so shown whatever --log-level says.
        logger.setLevel(logging.INFO)

    def finished(self, request: Request, out: Output) -> None:
        reason = None if out.finish_reason is None else out.finish_reason.to_dict()
        line = (f"Finish: rid={request.rid} task={request.task.value} prompt_tokens={out.prompt_tokens} "
                f"completion_tokens={out.completion_tokens} cached_tokens={out.cached_tokens} "
                f"finish_reason={reason} e2e_latency={time.monotonic() - request.created:.3f}s")
        if self.level >= 1:
            params = {k: v for k, v in dataclasses.asdict(request.sampling).items() if v is not None}
            line += f" sampling_params={params}"
        if self.level >= 2:
            line += f" input_ids={self._cut(str(request.input_ids))} output={self._cut(repr(out.text))}"
        logger.info("%s", line)

    def _cut(self, text: str) -> str:
        if self.level >= 3 or len(text) <= TRUNCATE_CHARS:
            return text
        return f"{text[:TRUNCATE_CHARS]}... ({len(text)} characters)"
