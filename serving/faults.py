"""What the scheduler does when a step goes wrong: the step watchdog and the lost-cache recovery.

- A step that raises: its requests end with a 500 abort (scheduler.step). If the step had already
  donated the KV cache to the device computation when it failed (the Pallas paths donate it every
  step; the CPU path donates it to its cache write), the cache array is gone: `recover_lost_cache`
  gives every other running request back to the waiting queue (it re-prefills its prompt and the tokens
  it generated, as a retraction does, so nothing is lost), empties the radix index, whose pages held
  the lost values, and allocates a fresh cache.
- A step that hangs (`--watchdog-timeout`, SGLang's flag; SGLang kills the process): `StepWatchdog`
  answers the step's requests with a 500 abort saying so, and marks the scheduler hung, which makes
  `/health` and `/health_generate` answer 503 and new requests 503 at once, so an orchestrator restarts
  the server. If the step does return, its results are dropped, its requests' pages are freed, and the
  server is healthy again. XLA gives no way to interrupt a running computation, so this is the most a
  server that survives can do safely.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from serving.protocol import FinishReason

if TYPE_CHECKING:
    from serving.request import Request
    from serving.scheduler import Scheduler

logger = logging.getLogger(__name__)


def step_failed(exc: BaseException) -> FinishReason:
    return FinishReason.abort(f"Internal error: {exc}", 500, "InternalServerError")


def step_hung(seconds: float, timeout: float) -> FinishReason:
    return FinishReason.abort(
        f"The forward step has run for {seconds:.0f} s, longer than --watchdog-timeout {timeout:g} s; "
        "this request was aborted.", 500, "InternalServerError")


def health_problem(scheduler: Scheduler) -> str | None:
    """Why the scheduler cannot serve now (its thread died, or a step hangs), else None."""
    if not scheduler.thread_alive():
        return "The scheduler thread has stopped; the server cannot serve requests and needs a restart."
    hung = scheduler.hung_since
    if hung is not None:
        return (f"A forward step has run for {time.monotonic() - hung:.0f} s, longer than "
                f"--watchdog-timeout {scheduler.watchdog.timeout:g} s; the server is unhealthy until it returns.")
    return None


def fail_all(scheduler: Scheduler, exc: BaseException) -> None:
    """An error outside the model call (a bug in scheduling or bookkeeping), or the thread ending: every
    request is answered with a 500 abort rather than left hanging."""
    logger.exception("scheduler error; aborting every request")
    scheduler.failures += 1
    for request in [*scheduler.running, *scheduler.waiting, *scheduler.held]:
        if request.finish_reason is None:
            request.finish(step_failed(exc))
        try:
            scheduler._release(request, keep_kv=False)
        except Exception:
            logger.exception("could not free the pages of %s", request.rid)
        request.maybe_emit()
    scheduler.running.clear()
    scheduler.waiting.clear()
    scheduler.held.clear()


def recover_lost_cache(scheduler: Scheduler, failed: list[Request]) -> None:
    """After a failed step left the donated KV cache deleted: nothing computed into it survives."""
    runner = scheduler.runner
    if not runner.kv_cache_lost():
        return
    others = [r for r in scheduler.running if r not in failed]
    logger.error("the failed step lost the KV cache: %d other running requests go back to the queue, "
                 "the prefix cache is emptied and a fresh KV cache allocated", len(others))
    for request in others:
        scheduler._retract(request, keep_kv=False)
    for request in failed:  # finished by the caller, pages released without caching their KV
        scheduler._release(request, keep_kv=False)
    scheduler.cache.flush()
    runner.reset_kv_cache()


class StepWatchdog:
    """A thread watching `Scheduler.step_state()`: the start time and requests of the step running now."""

    def __init__(self, scheduler: Scheduler, timeout: float) -> None:
        self.scheduler = scheduler
        self.timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="step-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        poll = min(1.0, self.timeout / 4)
        while not self._stop.wait(poll):
            self.check()

    def check(self) -> None:
        scheduler = self.scheduler
        with scheduler.step_lock:
            started = scheduler.step_started
            if started is None or scheduler.hung_since is not None:
                return
            seconds = time.monotonic() - started
            if seconds <= self.timeout:
                return
            scheduler.hung_since = started
            requests = list(scheduler.step_requests)
            logger.error("watchdog: step %d has run for %.1f s (--watchdog-timeout %g); aborting its %d "
                         "requests and reporting unhealthy until it returns", scheduler.num_steps + 1,
                         seconds, self.timeout, len(requests))
            reason = step_hung(seconds, self.timeout)
            for request in requests:
                # The scheduler thread is inside the step and touches no request until it takes
                # step_lock again; it then frees these requests' pages (Scheduler.step).
                if request.finish_reason is None:
                    request.finish(reason)
                    request.maybe_emit()
