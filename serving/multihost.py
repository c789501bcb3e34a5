"""Multi-host serving (`--nnodes N --node-rank R --dist-init-addr HOST:PORT`), the SPMD multi-controller way.

Every host runs one process; `initialize` joins them with `jax.distributed` before anything touches a
device, so `jax.devices()` lists every host's devices and the mesh (serving/mesh.py) spans all of them.
Each process holds only its own shards of the params and KV cache (the loaders place tensors with
`make_array_from_callback`), and XLA's collectives do the math between hosts. A jitted computation over a
multi-process mesh runs only when every process calls it, in the same order, with the same host inputs:

- Node 0 serves HTTP and owns the tokenizer, scheduler and radix cache as on one host. Its runner is a
  `LeaderRunner`: each entry point that runs device code (`MIRRORED`) first broadcasts its name and host
  arguments over a `CommandChannel`, then runs.
- Every other node runs serving/follower.py: the same `ModelRunner`, built from the same flags, replaying
  each command it receives, until node 0 sends `STOP` (its shutdown, or a failed start-up).

What node 0 can do that is not mirrored (weight updates, reading a param, releasing memory, per-replica
copies, expert recording) is refused with "... is not supported yet" (`refuse`, server_args_checks.py).
"""

from __future__ import annotations

import logging
import pickle
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from serving.runner import ModelRunner
from serving.server_args import ServerArgs
from serving.steps import next_pow2

logger = logging.getLogger(__name__)

# The runner's entry points that run device code after start-up, replayed by the followers. Every other
# method either runs on the host only or is refused under --nnodes > 1.
MIRRORED = ("run", "run_pool", "precompile", "reset_kv_cache")
STOP = "stop"
# A command's first broadcast, in int32 words (a dtype every platform's all-reduce takes): its length in
# bytes and, when it fits in the other 4092 bytes, all of it (one collective per decode step).
FIRST_WORDS = 1024


def initialize(args: ServerArgs) -> None:
    """Join the `--nnodes` processes (a no-op for one host; idempotent), then check that the mesh uses every
    process's devices: a process with none in it could not take part in a step. ValueError says why."""
    if args.nnodes == 1:
        return
    if not jax.distributed.is_initialized():
        try:  # CPU hosts talk over gloo (the default from jax 0.10; older and newer versions may differ)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except AttributeError:
            pass
        logger.info("Joining %d hosts at %s as node %d", args.nnodes, args.dist_init_addr, args.node_rank)
        jax.distributed.initialize(args.dist_init_addr, num_processes=args.nnodes, process_id=args.node_rank)
    if jax.process_count() != args.nnodes or jax.process_index() != args.node_rank:
        raise ValueError(f"jax.distributed is already initialised as process {jax.process_index()} of "
                         f"{jax.process_count()}, not --node-rank {args.node_rank} of --nnodes {args.nnodes}")
    used, devices = args.tp_size * args.ep_size, jax.device_count()
    if used != devices:
        raise ValueError(f"--tp-size {args.tp_size} x --ep-size {args.ep_size} = {used} must equal the {devices} "
                         f"devices of the {args.nnodes} hosts with --nnodes > 1: every host's devices take part "
                         "in each step")


def initialize_leader(args: ServerArgs) -> None:
    """`initialize` for the process that builds the `Engine`: node 0 only (the others run serving/follower.py)."""
    if args.node_rank != 0:
        raise ValueError(f"--node-rank {args.node_rank} builds no engine: node 0 serves, every other node runs "
                         "`python -m serving.main` with the same flags and follows it")
    initialize(args)


class CommandChannel:
    """Node 0 -> every other process: one command (a name and its pickled arguments) per call, over
    `broadcast_one_to_all`, a collective of the JAX job itself. A command is one broadcast of `FIRST_WORDS`
    (the payload's length, then as much of it as fits: a decode step's whole batch) and, for a longer
    payload, a second one of the rest padded to a power of two (each padded size compiles one small
    broadcast). The payload is pickled: it only ever comes from process 0 of this job, which the followers
    already trust to run whatever it computes.

    `lock` orders commands and the leader's own calls: a command and the device call it announces must not
    interleave with another's."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stopped = False

    def send(self, name: str, *args: Any, **kwargs: Any) -> None:
        payload = pickle.dumps((name, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        words = np.frombuffer(payload + bytes(-len(payload) % 4), "<i4")
        first = np.zeros(FIRST_WORDS, np.int32)
        first[0] = len(payload)
        inline = words[: FIRST_WORDS - 1]
        first[1: 1 + len(inline)] = inline
        multihost_utils.broadcast_one_to_all(first)
        rest = words[len(inline):]
        if len(rest):
            buffer = np.zeros(next_pow2(len(rest)), np.int32)
            buffer[: len(rest)] = rest
            multihost_utils.broadcast_one_to_all(buffer)

    def receive(self) -> tuple[str, tuple, dict]:
        """The next command (blocks until node 0 sends one)."""
        first = multihost_utils.broadcast_one_to_all(np.zeros(FIRST_WORDS, np.int32))
        size = int(first[0])
        words = first[1: 1 + -(-size // 4)]
        rest = -(-size // 4) - len(words)
        if rest:
            more = multihost_utils.broadcast_one_to_all(np.zeros(next_pow2(rest), np.int32))[:rest]
            words = np.concatenate([words, more])
        return pickle.loads(words.astype("<i4").tobytes()[:size])

    def stop(self) -> None:
        """Tell the followers to exit (once; later calls do nothing)."""
        with self.lock:
            if not self.stopped:
                self.stopped = True
                self.send(STOP)


_leader_channel: CommandChannel | None = None  # node 0's, once a LeaderRunner exists (one per process)


def leader_channel() -> CommandChannel:
    global _leader_channel
    if _leader_channel is None:
        _leader_channel = CommandChannel()
    return _leader_channel


def stop_followers() -> None:
    """Node 0's shutdown (or failed start-up): the followers exit 0. Nothing to do on one host."""
    if _leader_channel is not None:
        _leader_channel.stop()


class LeaderRunner(ModelRunner):
    """Node 0's runner with --nnodes > 1: each `MIRRORED` entry point broadcasts itself before it runs, so
    the followers make the same jitted calls in the same order. Calls into one another do not re-broadcast
    (none of them calls another today; `_mirrored` keeps it that way by running the base methods)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only once the runner exists: a runner that failed to build failed on every host (same flags).
        self._channel = leader_channel()

    def _mirrored(self, name: str, *args: Any, **kwargs: Any) -> Any:
        with self._channel.lock:
            if self._channel.stopped:
                raise RuntimeError("the follower hosts have been stopped; no step can run")
            self._channel.send(name, *args, **kwargs)
            return getattr(ModelRunner, name)(self, *args, **kwargs)

    def run(self, host):
        return self._mirrored("run", host)

    def run_pool(self, host, *, method: str | None = None, normalize: bool | None = None):
        return self._mirrored("run_pool", host, method=method, normalize=normalize)

    def precompile(self, progress: bool = True, token_bitmask_width: int | None = None) -> float:
        return self._mirrored("precompile", progress=progress, token_bitmask_width=token_bitmask_width)

    def reset_kv_cache(self) -> None:
        self._mirrored("reset_kv_cache")


def refuse(args: ServerArgs, what: str) -> str | None:
    """The refusal of an operation that is not mirrored to the follower hosts, or None on one host."""
    if args.nnodes == 1:
        return None
    return f"{what} with --nnodes > 1 is not supported yet"
