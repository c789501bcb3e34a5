"""Data-parallel replicas (`--dp-size N`): N full copies of the model inside one server.

Replica `r` runs on devices `[r * tp * ep, (r + 1) * tp * ep)` of `jax.devices()` (its own mesh when tp or ep
is above 1, else the one device) and owns everything a one-replica server has: a runner (params, KV
cache, compiled steps), a prefix (radix) cache and a scheduler thread, plus an expert-distribution
recorder on a MoE model. Nothing device-side is shared, so replicas step independently; one `Engine` and
one HTTP server sit in front. The engine routes each request to one replica (serving/router.py) and sends
every control call to all of them through `ReplicaSet`: each runs on its replica's scheduler thread,
between two of its steps, exactly as with one replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from serving import expert_stats
from serving.config import RuntimeConfig
from serving.faults import health_problem
from serving.mesh import MeshError
from serving.multihost import LeaderRunner, stop_followers
from serving.prefix_cache import PrefixCache
from serving.runner import ModelRunner
from serving.scheduler import Scheduler
from serving.server_args import ServerArgs

logger = logging.getLogger(__name__)


def device_groups(dp_size: int, tp_size: int, ep_size: int, devices: list[Any] | None = None) -> list[list[Any]]:
    """Each replica's devices, in rank order; MeshError when `dp x tp x ep` devices are not there."""
    devices = list(jax.devices()) if devices is None else devices
    per_replica = tp_size * ep_size
    needed = dp_size * per_replica
    if needed > len(devices):
        raise MeshError(f"--dp-size {dp_size} x --tp-size {tp_size} x --ep-size {ep_size} needs {needed} devices; "
                        f"{jax.default_backend()} has {len(devices)}")
    return [devices[rank * per_replica:(rank + 1) * per_replica] for rank in range(dp_size)]


def replica_runtime(runtime: RuntimeConfig, dp_size: int) -> RuntimeConfig:
    """The runtime config each replica's runner gets. On CPU every device (simulated or not) shares the
    host's memory, so each replica sizes its KV cache from `1 / dp` of `--mem-fraction-static`; an
    accelerator's replicas each have their own memory and keep the whole fraction."""
    if dp_size == 1 or not runtime.on_cpu or runtime.max_total_tokens is not None:
        return runtime
    return dataclasses.replace(runtime, mem_fraction_static=runtime.mem_fraction_static / dp_size)


@dataclass
class Replica:
    """One copy of the model and everything that serves it; `scheduler` is set by `ReplicaSet.prepare`."""

    rank: int
    runner: ModelRunner
    prefix_cache: PrefixCache | None = None
    scheduler: Scheduler | None = None
    expert_recorder: expert_stats.ExpertDistributionRecorder | None = None

    def page_counts(self) -> dict[str, int]:
        """Page states (scheduler thread: the only one that touches the cache)."""
        cache = self.prefix_cache
        return {"free": cache.num_free, "evictable": cache.num_evictable, "locked": cache.num_locked,
                "total": cache.num_total, "invariant_errors": self.scheduler.invariant_errors}


class ReplicaSet:
    """The replicas in rank order, and the calls the engine fans out to all of them."""

    def __init__(self, model_dir: Path, runtime: RuntimeConfig, args: ServerArgs,
                 executable_cache_dir: Path | None) -> None:
        """Load the model onto every replica's device group (each replica reads the checkpoint and places
        it on its own devices); the device count is checked before anything loads."""
        groups = device_groups(args.dp_size, args.tp_size, args.ep_size)
        runtime = replica_runtime(runtime, args.dp_size)
        self.replicas: list[Replica] = []
        # With --nnodes > 1 (dp 1) node 0's runner broadcasts its steps to the other hosts (serving/multihost.py).
        runner_class = LeaderRunner if args.nnodes > 1 else ModelRunner
        for rank, devices in enumerate(groups):
            if len(groups) > 1:
                logger.info("Loading replica %d of %d on %s", rank, len(groups), ", ".join(map(str, devices)))
            runner = runner_class(model_dir, runtime, executable_cache_dir=executable_cache_dir, devices=devices,
                                  params_cache_dir=None if executable_cache_dir is None
                                  else executable_cache_dir.parent / "params")
            self.replicas.append(Replica(rank, runner))

    def prepare(self, args: ServerArgs, runtime: RuntimeConfig, token_bitmask_width: int | None) -> None:
        """Per replica: the prefix cache, the step buckets compiled for its own devices (`--precompile`), its
        KV cache's zeros written, the expert recorder and the scheduler (not started yet)."""
        for replica in self.replicas:
            runner = replica.runner
            replica.prefix_cache = PrefixCache(runner.kv_spec.num_pages, args.page_size,
                                               enable_radix=not args.disable_radix_cache)
            if args.precompile:
                seconds = runner.precompile(token_bitmask_width=token_bitmask_width)
                logger.info("Compiled %d step buckets in %.1f s%s", len(runner.buckets()), seconds,
                            f" (replica {replica.rank})" if len(self) > 1 else "")
            runner.wait_for_kv_cache()  # written on a thread meanwhile (runner): ready before the server is
            replica.expert_recorder = _expert_recorder(args, runner, warn=replica.rank == 0)
            replica.scheduler = Scheduler(runner, replica.prefix_cache, runtime)

    def __len__(self) -> int:
        return len(self.replicas)

    def __iter__(self):
        return iter(self.replicas)

    def __getitem__(self, rank: int) -> Replica:
        return self.replicas[rank]

    def read_weights(self, model_dir: Path) -> list[Any]:
        """Each replica's copy of another checkpoint's params (a swap's or a resume's), in rank order: read
        once onto replica 0's devices, copied device to device onto the others' (on CPU 1.3 s for the default
        model at dp 2 against 2.4 s for a read per replica, docs/multi_device.md)."""
        params = self.replicas[0].runner.read_weights(model_dir)
        return [params] + [_place_like(params, replica.runner) for replica in self.replicas[1:]]

    @property
    def schedulers(self) -> list[Scheduler]:
        return [replica.scheduler for replica in self.replicas]

    def start(self) -> None:
        for scheduler in self.schedulers:
            scheduler.start()

    def stop(self) -> None:
        for scheduler in self.schedulers:
            scheduler.stop()
        stop_followers()  # after the last step: the other hosts' processes exit

    async def each(self, fn: Callable[[Replica], Any], *, when_idle: bool = False) -> list[Any]:
        """`fn(replica)` on each replica's scheduler thread between two of its steps (with `when_idle`, once
        the requests it admitted before have finished), all at once; the results in rank order. The first
        exception raised is re-raised after every call has ended."""
        def submit(replica: Replica):
            call = replica.scheduler.call_when_idle if when_idle else replica.scheduler.call
            return asyncio.wrap_future(call(lambda: fn(replica)))

        results = await asyncio.gather(*(submit(replica) for replica in self.replicas), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def abort(self, rid: str, abort_all: bool = False, *, exact: bool = False, cause: str | None = None) -> None:
        """Abort on every replica: only the one holding `rid` (or what derives from it) has anything to
        abort, and the id alone does not say which."""
        for scheduler in self.schedulers:
            scheduler.abort(rid, abort_all, exact=exact, cause=cause)

    def health_problem(self) -> str | None:
        """The first replica's reason it cannot serve (serving/faults.py), named by rank with several."""
        for replica in self.replicas:
            problem = health_problem(replica.scheduler)
            if problem is not None:
                return problem if len(self) == 1 else f"data-parallel replica {replica.rank}: {problem}"
        return None

    @property
    def steps_done(self) -> int:
        return sum(scheduler.num_steps for scheduler in self.schedulers)


def _place_like(params: Any, runner: ModelRunner) -> Any:
    """`params` (replica 0's) copied onto `runner`'s devices with the same partitioning (every replica has
    the same placement shape on devices of its own)."""
    mesh = runner.placement.mesh

    def sharding(leaf: jax.Array) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(runner.placement.devices[0])
        return jax.sharding.NamedSharding(mesh, leaf.sharding.spec)

    return jax.device_put(params, jax.tree.map(sharding, params))


def _expert_recorder(args: ServerArgs, runner: ModelRunner,
                     warn: bool) -> expert_stats.ExpertDistributionRecorder | None:
    """The replica's recorder (None when the mode is off or the model has no experts, with a warning, once,
    if a mode was asked); it receives the runner's router counts after every step."""
    mode, config = args.expert_distribution_recorder_mode, runner.config
    reason = expert_stats.unavailable_message(mode, config.architecture, config.num_experts)
    if reason is not None:
        if mode is not None and warn:
            logger.warning(reason)
        return None
    recorder = expert_stats.ExpertDistributionRecorder(
        mode, args.expert_distribution_recorder_buffer_size, config.num_layers, config.num_experts)
    runner.aux_sink = recorder.record
    return recorder
