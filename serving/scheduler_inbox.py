"""How other threads talk to the scheduler: everything goes through its inbox, taken in between steps.

`SchedulerInbox` is the thread-facing half of `Scheduler` (serving/scheduler.py): `submit`, `abort`,
`call` and `call_when_idle` may be called from any thread; `drain_inbox` runs on the scheduler thread
and hands each item to the scheduler's own `_enqueue` / `_abort`, or runs the call.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.request import Request


class SchedulerInbox:
    """Scheduler provides the state below and the two handlers `drain_inbox` calls: `_enqueue(request)`
    and `_abort(rid, abort_all, exact, cause)`."""

    inbox: queue.SimpleQueue[tuple[str, Any]]
    idle_calls: list[tuple[Callable[[], Any], Future]]
    _enqueue: Callable[[Request], None]
    _abort: Callable[..., None]

    def submit(self, request: Request) -> None:
        self.inbox.put(("add", request))

    def abort(self, rid: str, abort_all: bool = False, *, exact: bool = False, cause: str | None = None) -> None:
        """Abort the requests whose id starts with `rid` (only the one equal to it with `exact`; all
        with `abort_all`). `cause` goes into the abort log line."""
        self.inbox.put(("abort", (rid, abort_all, exact, cause)))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the scheduler thread between two steps; the future holds its result."""
        future: Future = Future()
        self.inbox.put(("call", (fn, future)))
        return future

    def call_when_idle(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` once every request admitted before it has finished (a weight swap must not mix
        weights inside one request); requests arriving meanwhile wait until `fn` has run."""
        future: Future = Future()
        self.inbox.put(("call_idle", (fn, future)))
        return future

    def drain_inbox(self, block: bool) -> None:
        """Take in what other threads sent (scheduler thread only)."""
        try:
            item = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                self._enqueue(payload)
            elif kind == "abort":
                self._abort(*payload)
            elif kind == "call":
                run_call(*payload)
            elif kind == "call_idle":
                self.idle_calls.append(payload)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return


def run_call(fn: Callable[[], Any], future: Future) -> None:
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)
