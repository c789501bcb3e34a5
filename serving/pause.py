"""`/pause_generation`, `/continue_generation` and `/flush_cache?timeout=` (SGLang's semantics).

Modes of a pause (each takes effect between two steps, on the scheduler thread):
- `abort`: every request running or waiting is aborted (finish reason abort), then no step runs.
- `retract`: every running request is retracted (its KV goes into the radix cache, it waits at the
  front of the queue with its output so far); after `continue` it re-prefills (mostly from the cache,
  unless the cache was flushed meanwhile) and goes on.
- `in_place`: steps stop; running requests keep their pages and go on from where they were.
Requests arriving while paused wait in the queue. A weight update while paused runs at once (not after
the requests finish): a request paused in place then continues on the new weights, a retracted one
re-prefills on them. A flush while paused succeeds when no request holds pages (after `abort` or
`retract`): RL frameworks pause in retract mode and flush before updating weights.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.scheduler import Scheduler

PAUSED = {"message": "Generation paused successfully.", "status": "ok"}
CONTINUED = {"message": "Generation continued successfully.", "status": "ok"}
FLUSH_RETRY_INTERVAL = 0.05


class GenerationControl:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    async def pause(self, mode: str) -> dict[str, str]:
        scheduler = self.scheduler
        if mode == "abort":  # the inbox is ordered: the abort is applied before the pause below
            scheduler.abort("", abort_all=True, cause="pause_generation abort")

        def pause() -> None:
            if mode == "retract":
                scheduler.retract_all()
            scheduler.pause_mode = mode

        await asyncio.wrap_future(scheduler.call(pause))
        return PAUSED

    async def resume(self) -> dict[str, str]:
        def resume() -> None:
            self.scheduler.pause_mode = None

        await asyncio.wrap_future(self.scheduler.call(resume))
        return CONTINUED

    async def flush_cache(self, timeout: float = 0.0) -> bool:
        """Drop the prefix cache; while requests hold pages, retry until `timeout` seconds have passed
        (SGLang's `timeout` query parameter), then give up (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if await asyncio.wrap_future(self.scheduler.call(self.scheduler.flush)):
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FLUSH_RETRY_INTERVAL)
