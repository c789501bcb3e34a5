"""Continuous batching: admit, build one ragged step of decode tokens and prefill chunks, run, repeat.

Runs in its own thread. Everything it owns (the waiting queue, the running batch, the prefix cache)
is touched only from that thread; other threads talk to it through `inbox` (requests, aborts, calls).

One step, read aloud: `schedule()` gives every decoding request one token (allocating a page when it
crosses a page boundary, retracting the youngest requests if the cache is full), then spends what is
left of the token budget on prefill chunks of partially prefilled and newly admitted requests;
`runner.run()` computes them all in one call; `process()` appends the sampled tokens, finishes what
stopped and releases its pages into the radix cache. A prefill-only request (max_new_tokens 0, or any
task but generate) finishes when its last prompt chunk has run: it never decodes, and the token the
step sampled for it is dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.config import RuntimeConfig
from serving.faults import StepWatchdog, fail_all, recover_lost_cache, step_failed
from serving.host_batch import build_host_batch
from serving.logprobs import build_logprob_plan
from serving.prefix_cache import PrefixCache
from serving.protocol import FinishReason
from serving.request import Request, Task
from serving.scheduler_inbox import SchedulerInbox, run_call
from serving.scheduler_log import SchedulerLog

if TYPE_CHECKING:
    from serving.metrics import StepMetrics
    from serving.runner import ModelRunner

logger = logging.getLogger(__name__)


class Scheduler(SchedulerInbox):
    def __init__(self, runner: ModelRunner, prefix_cache: PrefixCache, config: RuntimeConfig):
        self.runner = runner
        self.cache = prefix_cache
        self.page_size = prefix_cache.page_size
        self.max_running = config.max_running_requests
        self.max_step_tokens = config.max_step_tokens
        self.chunk_size = config.chunked_prefill_size
        self.policy = config.schedule_policy
        # SGLang's --max-queued-requests: a bound on requests waiting for admission, checked when one
        # arrives; requeued (retracted) requests were accepted already and always go back.
        self.max_queued = config.max_queued_requests
        self.log = SchedulerLog(config.decode_log_interval, prefix_cache.num_total * self.page_size)
        self.metrics: StepMetrics | None = None  # the engine sets it with --enable-metrics
        self._num_decodes = 0  # of the last schedule(): its batch starts with that many decode entries
        self._admitted: list[Request] = []  # of the last schedule(): requests it took from the queue
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_steps = 0
        self.last_output_time = 0.0
        self.last_gen_throughput = 0.0
        self.invariant_errors = 0
        self.idle_calls: list[tuple[Callable[[], Any], Future]] = []
        self.held: list[Request] = []  # arrived while an idle call waits
        # The step running now, for the watchdog (faults.py); step_lock guards these three.
        self.step_lock = threading.Lock()
        self.step_started: float | None = None
        self.step_requests: list[Request] = []
        self.hung_since: float | None = None  # set by the watchdog; cleared when the step returns
        self.failures = 0  # errors outside a step that the loop survived
        self.watchdog = StepWatchdog(self, config.watchdog_timeout) if config.watchdog_timeout else None
        # Halted (no step runs, requests wait): generation paused (pause.py) or memory released (memory.py).
        self.pause_mode: str | None = None
        self.released: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    # -- other threads ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.watchdog is not None:
            self.watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None))
        self._thread.join(timeout=30)
        if self.watchdog is not None:
            self.watchdog.stop()

    def thread_alive(self) -> bool:
        """False once the thread has ended other than by stop() (faults.health_problem)."""
        return self._thread.is_alive() or self._stop.is_set()

    @property
    def halted(self) -> bool:
        return self.pause_mode is not None or bool(self.released)

    def retract_all(self) -> None:
        """Retract every running request, keeping their order at the front of the queue (pause.py)."""
        for request in reversed(list(self.running)):
            self._retract(request)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread is ending: answer every request rather than strand it
            logger.critical("the scheduler thread is stopping on %r", exc)
            fail_all(self, exc)
            raise

    def _serve(self) -> None:
        idle_checked = False
        while not self._stop.is_set():
            busy = bool(self.waiting or self.running) and not self.halted
            self.drain_inbox(block=not busy)
            # Halted, a weight swap runs at once (SGLang: "if generation is paused it runs immediately").
            if self.idle_calls and (self.halted or not (self.waiting or self.running)):
                for call in self.idle_calls:
                    run_call(*call)
                self.idle_calls.clear()
                self.waiting.extend(self.held)
                self.held.clear()
            if self.halted:
                continue
            if not (self.waiting or self.running):
                if not idle_checked:
                    idle_checked = True
                    try:
                        self.cache.check_invariant()
                    except AssertionError:
                        logger.exception("page invariant violated while idle")
                        self.invariant_errors += 1
                continue
            idle_checked = False
            try:
                stepped = self.step()
            except Exception as exc:  # outside the model call: the loop must survive it
                fail_all(self, exc)
                stepped = True
            if not stepped:
                time.sleep(0.001)

    def step(self) -> bool:
        """Schedule, run and process one step on the calling thread (the scheduler thread, or a test
        driving it without one); False when nothing could be scheduled."""
        batch = self.schedule()
        if not batch:
            return False
        with self.step_lock:
            self.step_started, self.step_requests = time.monotonic(), [r for r, _ in batch]
        try:
            # A pooled model's step returns one vector per sequence instead of a token (a server runs
            # one task, so a batch never mixes them).
            generate = batch[0][0].task is Task.GENERATE
            run = self.runner.run if generate else self.runner.run_pool
            host = build_host_batch(batch)
            plan = build_logprob_plan(batch) if generate else None
            if plan is not None:
                host.logprobs, host.num_top = plan.host, plan.num_top
            tokens = run(host)
            if plan is not None:  # before process(), whose snapshots carry the entries
                plan.record(self.runner.last_logprobs, tokens)
        except Exception as exc:  # a failed step must not take the server down
            logger.exception("step failed")
            tokens = None
            for request, _ in batch:
                if request.finish_reason is None:
                    request.finish(step_failed(exc))
            recover_lost_cache(self, [r for r, _ in batch])
        finally:
            with self.step_lock:
                hung = self.hung_since is not None
                self.step_started, self.step_requests, self.hung_since = None, [], None
        if tokens is None or hung:  # failed, or the watchdog already answered its requests
            for request, _ in batch:
                self._finish(request, request.finish_reason)
            return True
        # Read before process(), which advances num_computed and drops what finished from `running`.
        step = {"new_seqs": len(self._admitted), "cached_tokens": sum(r.num_computed for r in self._admitted),
                "prefill_tokens": sum(n for _, n in batch[self._num_decodes:]), "decodes": self._num_decodes,
                "running": len(self.running)}
        generated = self.process(batch, tokens)
        self.log.after_step(**step, generated=generated, queued=len(self.waiting) + len(self.held),
                            used_tokens=(self.cache.num_total - self.cache.available_pages) * self.page_size)
        if self.metrics is not None:
            self.metrics.after_step(decodes=step["decodes"], prefill_tokens=step["prefill_tokens"],
                                    cached_tokens=step["cached_tokens"], generated=generated)
        return True

    def _enqueue(self, request: Request) -> None:
        """A new request joins the waiting queue, or is answered 503 at once when the queue is full."""
        if self.max_queued is not None and len(self.waiting) + len(self.held) >= self.max_queued:
            reason = FinishReason.abort("The request queue is full.", 503)
            request.finish(reason)
            self.log.abort(request.rid, "arrival", reason, f"--max-queued-requests {self.max_queued}")
            request.maybe_emit()
            return
        (self.held if self.idle_calls else self.waiting).append(request)

    # -- scheduling -------------------------------------------------------------------------------
    def _pages_short(self, request: Request, upto: int) -> int:
        return max(0, -(-upto // self.page_size) - len(request.pages))

    def _grow(self, request: Request, upto: int) -> bool:
        """Give `request` pages for its first `upto` tokens; False if the cache cannot."""
        need = self._pages_short(request, upto)
        if need == 0:
            return True
        pages = self.cache.allocate(need)
        if pages is None:
            return False
        request.pages.extend(pages)
        return True

    def schedule(self) -> list[tuple[Request, int]]:
        """Pick this step's work: `(request, number of new tokens)` pairs, decodes first."""
        batch: list[tuple[Request, int]] = []
        for request in list(self.running):
            if request not in self.running or request.num_computed != request.total_len - 1:
                continue
            while not self._grow(request, request.total_len):
                victim = self._pick_victim(exclude=request)
                if victim is None:
                    self._finish(request, FinishReason.abort("The KV cache cannot hold this request.", 400,
                                                             "BadRequest"))
                    break
                self._retract(victim)
                batch = [(r, n) for r, n in batch if r is not victim]
            else:
                batch.append((request, 1))
        self._num_decodes = len(batch)
        self._admitted = []
        budget = self.max_step_tokens - len(batch)
        scheduled = {id(r) for r, _ in batch}
        for request in self.running:  # partially prefilled requests continue
            if budget <= 0:
                break
            if id(request) in scheduled or request.num_computed >= request.total_len - 1:
                continue
            chunk = min(request.total_len - request.num_computed, budget, self.chunk_size)
            if self._grow(request, request.num_computed + chunk):
                batch.append((request, chunk))
                budget -= chunk
        if self.policy == "lpm" and len(self.waiting) > 1:
            self._sort_waiting_by_prefix()
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            chunk = self._admit(self.waiting[0], budget)
            if chunk == 0:
                break
            request = self.waiting.popleft()
            self.running.append(request)
            self._admitted.append(request)
            batch.append((request, chunk))
            budget -= chunk
        return batch

    def _admit(self, request: Request, budget: int) -> int:
        """Match its prefix and give it pages for a first chunk; 0 (and no side effect) if it can't."""
        # A pooled request runs its whole prompt in one step from position 0 (mean / cls pooling and
        # encoders see every row; nothing is reused from the cache), beyond the chunk size if need be;
        # the engine refuses prompts longer than a step.
        whole = request.task is not Task.GENERATE
        if whole and request.total_len > budget:
            return 0
        handle = self.cache.acquire_prefix([] if whole else request.tokens(0, request.prefix_limit()))
        start = handle.num_tokens
        chunk = request.total_len if whole else min(request.total_len - start, budget, self.chunk_size)
        # Keep a page per running request in reserve so admitting does not force immediate retraction.
        reserve = len(self.running)
        need = -(-(start + chunk) // self.page_size) - len(handle.pages)
        pages = self.cache.allocate(need) if self.cache.available_pages >= need + reserve else None
        if pages is None:
            self.cache.release(handle, [], handle.pages, cache=False)
            return 0
        request.prefix_handle = handle
        request.pages = list(handle.pages) + pages
        request.num_computed = start
        if request.cached_tokens is None:
            request.cached_tokens = start
            request.admitted_at = time.monotonic()
        return chunk

    def _sort_waiting_by_prefix(self) -> None:
        """Longest-prefix-match first; ties keep arrival order (sorted() is stable)."""
        def matched(request: Request) -> int:
            return self.cache.peek_prefix_len(request.tokens(0, request.total_len))

        window = [self.waiting.popleft() for _ in range(min(len(self.waiting), 128))]
        window.sort(key=matched, reverse=True)
        self.waiting.extendleft(reversed(window))

    def _pick_victim(self, exclude: Request) -> Request | None:
        candidates = [r for r in self.running if r is not exclude]
        return candidates[-1] if candidates else None

    def _retract(self, request: Request, keep_kv: bool = True) -> None:
        """Give back its pages (its computed prefix goes to the radix cache unless the cache's values
        were lost) and requeue it first."""
        self._release(request, keep_kv)
        self.running.remove(request)
        request.num_computed = 0
        request.retractions += 1
        self.waiting.appendleft(request)
        logger.debug("retracted %s (%d tokens)", request.rid, request.total_len)

    def _release(self, request: Request, keep_kv: bool = True) -> None:
        if request.prefix_handle is None:
            return
        self.cache.release(request.prefix_handle, request.tokens(0, request.num_computed), request.pages,
                           cache=request.cache_kv and keep_kv)
        request.prefix_handle = None
        request.pages = []

    # -- after the step ---------------------------------------------------------------------------
    def process(self, batch: list[tuple[Request, int]], tokens: np.ndarray) -> int:
        """Apply a step's sampled tokens; returns how many tokens it generated."""
        self.num_steps += 1
        generated = 0
        for (request, n), token in zip(batch, tokens.tolist(), strict=True):
            if request.finish_reason is not None:  # aborted while the step ran
                continue
            request.num_computed += n
            if request.num_computed < request.total_len:
                continue  # a prefill chunk that does not reach the end of the prompt yet
            if request.prefill_only:
                if request.task is not Task.GENERATE:
                    request.pooled = token  # the step's vector for this sequence
                request.finish(FinishReason.max_length(0))
            else:
                request.append_token(token)
                generated += 1
            if request.finish_reason is not None:
                self._finish(request, request.finish_reason)
            else:
                request.maybe_emit()
        now = time.monotonic()
        if generated:
            elapsed = now - self.last_output_time if self.last_output_time else 0.0
            self.last_gen_throughput = generated / elapsed if elapsed > 0 else 0.0
            self.last_output_time = now
        return generated

    def _finish(self, request: Request, reason: FinishReason, cause: str | None = None) -> None:
        request.finish(reason)
        if reason.is_abort:
            self.log.abort(request.rid, "running", reason, cause)
        self._release(request)
        if request in self.running:
            self.running.remove(request)
        request.maybe_emit()

    def _abort(self, rid: str, abort_all: bool, exact: bool = False, cause: str | None = None) -> None:
        def hit(request: Request) -> bool:
            return abort_all or (request.rid == rid if exact else request.rid.startswith(rid))

        for queue_ in (self.waiting, self.held):
            for request in list(queue_):
                if hit(request):
                    queue_.remove(request)
                    request.finish(FinishReason.abort_waiting())
                    self.log.abort(request.rid, "waiting queue", request.finish_reason, cause)
                    request.maybe_emit()
        for request in list(self.running):
            if hit(request):
                self._finish(request, FinishReason.abort("Aborted"), cause)

    # -- queries (scheduler thread, through call()) -----------------------------------------------
    def load(self) -> dict[str, int]:
        used = (self.cache.num_total - self.cache.available_pages) * self.page_size
        waiting = len(self.waiting) + len(self.held)
        queued = sum(r.total_len for r in self.waiting) + sum(r.total_len for r in self.held)
        return {"num_reqs": len(self.running) + waiting, "num_waiting_reqs": waiting,
                "num_tokens": used + queued}

    def flush(self) -> bool:
        """Drop the prefix cache; refused while requests run or wait. Requests held behind an idle call
        (a weight swap that flushes) and, halted, waiting ones hold no pages: a flush after a pause in
        retract mode goes through (an RL framework deadlocked on it)."""
        if self.running or (self.waiting and not self.halted):
            return False
        return self.cache.flush()
