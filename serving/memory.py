"""`/release_memory_occupation` and `/resume_memory_occupation` (contract 5.10).

Releasing deletes device buffers outright (`jax.Array.delete`), so the allocator gets the memory back at
once: tag `weights` the params, `kv_cache` the KV cache (and the radix cache is flushed, since the pages
it points at are gone), `cuda_graph` nothing (XLA's compiled executables hold no buffers of ours). Release
requires no request running or waiting, as SGLang does. While anything is released no step runs: requests
arriving meanwhile wait in the queue and run after the resume. Resuming re-reads the weights from the
current model path (the last successful update's, so the version served before the release), places them
on the same shardings, and allocates a fresh, empty KV cache: generation afterwards is what it was before.
With data-parallel replicas every replica releases and resumes its own buffers (a release only once all
are idle).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import jax

from serving.multihost import refuse
from serving.protocol import RequestError

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.replicas import Replica

logger = logging.getLogger(__name__)


def device_bytes_in_use(devices: list | None = None) -> int:
    """Bytes in use on those of `devices` (default: the first device) that belong to this process: the
    backend's own count where it keeps one (TPU, GPU), else the sum of the live arrays on them (CPU)."""
    total = 0
    for device in devices or jax.devices()[:1]:
        if device.process_index != jax.process_index():  # another host's (--nnodes): not ours to read
            continue
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_in_use" in stats:
            total += int(stats["bytes_in_use"])
        else:
            total += sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted() and device in x.devices())
    return total


class MemoryControl:
    """Each call goes to every data-parallel replica (serving/replicas.py), each on its scheduler thread."""

    def __init__(self, engine: Engine):
        self.engine = engine

    async def release(self, tags: tuple[str, ...]) -> None:
        _refuse_multihost(self.engine, "release_memory_occupation")
        replicas = self.engine.replicas

        def busy(replica: Replica) -> int:
            scheduler = replica.scheduler
            return len(scheduler.running) + len(scheduler.waiting) + len(scheduler.held)

        def release(replica: Replica) -> None:
            scheduler, runner = replica.scheduler, replica.runner
            _refuse_busy(busy(replica))  # a request may have arrived since the check below
            before = device_bytes_in_use(runner.placement.devices)
            if "weights" in tags and "weights" not in scheduler.released:
                runner.release_params()
                scheduler.released.add("weights")
            if "kv_cache" in tags and "kv_cache" not in scheduler.released:
                scheduler.released.add("kv_cache")  # halts steps before the flush below can be raced
                scheduler.flush()
                runner.release_kv_cache()
            logger.info("Released %s: %.1f MB of device memory", ", ".join(tags),
                        (before - device_bytes_in_use(runner.placement.devices)) / 1e6)

        # Every replica idle first, so one busy replica refuses the call before any other releases.
        _refuse_busy(sum(await replicas.each(busy)))
        await replicas.each(release)

    async def resume(self, tags: tuple[str, ...]) -> None:
        engine = self.engine
        _refuse_multihost(engine, "resume_memory_occupation")
        # Read on a worker thread while the schedulers wait (halted: nothing runs on the missing buffers).
        params = None
        if "weights" in tags and any("weights" in replica.scheduler.released for replica in engine.replicas):
            params = await asyncio.to_thread(engine.replicas.read_weights, engine.model_dir)

        def resume(replica: Replica) -> None:
            scheduler, runner = replica.scheduler, replica.runner
            if params is not None and "weights" in scheduler.released:
                runner.params = params[replica.rank]
                scheduler.released.discard("weights")
            if "kv_cache" in tags and "kv_cache" in scheduler.released:
                runner.reset_kv_cache()
                scheduler.cache.flush()
                scheduler.released.discard("kv_cache")

        await engine.replicas.each(resume)


def _refuse_multihost(engine: Engine, what: str) -> None:
    """The follower hosts would keep their buffers (neither call is mirrored to them, serving/multihost.py)."""
    refusal = refuse(engine.server_args, what)
    if refusal is not None:
        raise RequestError(refusal)


def _refuse_busy(in_flight: int) -> None:
    if in_flight:
        raise RequestError(f"release_memory_occupation needs no request in flight; {in_flight} are running "
                           "or waiting (pause generation in abort mode first)")
