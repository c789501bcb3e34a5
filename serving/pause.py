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
    from serving.replicas import Replica, ReplicaSet

PAUSED = {"message": "Generation paused successfully.", "status": "ok"}
CONTINUED = {"message": "Generation continued successfully.", "status": "ok"}
FLUSH_RETRY_INTERVAL = 0.05


class GenerationControl:
    """Each call goes to every data-parallel replica (serving/replicas.py), each on its own scheduler thread."""

    def __init__(self, replicas: ReplicaSet):
        self.replicas = replicas

    async def pause(self, mode: str) -> dict[str, str]:
        if mode == "abort":  # each inbox is ordered: the abort is applied before the pause below
            self.replicas.abort("", abort_all=True, cause="pause_generation abort")

        def pause(replica: Replica) -> None:
            if mode == "retract":
                replica.scheduler.retract_all()
            replica.scheduler.pause_mode = mode

        await self.replicas.each(pause)
        return PAUSED

    async def resume(self) -> dict[str, str]:
        def resume(replica: Replica) -> None:
            replica.scheduler.pause_mode = None

        await self.replicas.each(resume)
        return CONTINUED

    async def flush_cache(self, timeout: float = 0.0) -> bool:
        """Drop every replica's prefix cache; while requests hold pages on some, retry those until `timeout`
        seconds have passed (SGLang's `timeout` query parameter), then give up (False; the replicas that
        were idle stay flushed)."""
        deadline = time.monotonic() + timeout
        left = set(range(len(self.replicas)))
        while True:
            flushed = await asyncio.gather(*(asyncio.wrap_future(self.replicas[rank].scheduler.call(
                self.replicas[rank].scheduler.flush)) for rank in sorted(left)))
            left = {rank for rank, ok in zip(sorted(left), flushed, strict=True) if not ok}
            if not left:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(FLUSH_RETRY_INTERVAL)
