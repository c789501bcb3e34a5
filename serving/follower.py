"""What `python -m serving.main --nnodes N --node-rank R` runs on every node but 0: no HTTP server, no
tokenizer, no scheduler; the model's shards on this host's devices, stepping in lock-step with node 0.

The runner is built from the same flags as node 0's (same buckets, same shardings, same devices of the
global mesh), then each command node 0 broadcasts (serving/multihost.py) is replayed on it: the same
entry point with the same host arguments, so both processes make the same jitted calls in the same order
and XLA's collectives meet. A command that fails here fails on node 0 too (same code, same inputs): it is
logged and the loop goes on, as node 0's scheduler does. Node 0's `STOP` ends the loop with exit code 0.
"""

from __future__ import annotations

import logging

from serving.server_args import ServerArgs

logger = logging.getLogger(__name__)


def run_follower(args: ServerArgs) -> int:
    """Serve as follower node `args.node_rank` until node 0 stops; the process's exit code."""
    from checkpoints.resolve import resolve_model_dir
    from serving.config import enable_compilation_cache, resolve_runtime_config
    from serving.multihost import MIRRORED, STOP, CommandChannel, initialize
    from serving.replicas import device_groups
    from serving.runner import ModelRunner

    try:
        initialize(args)
        if not args.disable_compilation_cache:
            enable_compilation_cache(args.compilation_cache_dir)
        model_dir = resolve_model_dir(args.model_path, revision=args.revision, load_format=args.load_format)
        # Node 0's placement exactly: dp is 1 with several hosts, so its one replica spans every device.
        devices = device_groups(1, args.tp_size, args.ep_size)[0]
        runner = ModelRunner(model_dir, resolve_runtime_config(args), devices=devices)
    except ValueError as exc:  # node 0 meets the same problem and says so too
        logger.error("%s", exc)
        return 1
    logger.info("Node %d of %d ready: following node 0's steps", args.node_rank, args.nnodes)
    channel = CommandChannel()
    commands = 0
    while True:
        name, call_args, call_kwargs = channel.receive()
        if name == STOP:
            logger.info("Node 0 stopped after %d commands; exiting", commands)
            return 0
        if name not in MIRRORED:  # a leader of another version: nothing safe to do but stop
            logger.error("unknown command %r from node 0; exiting", name)
            return 1
        commands += 1
        try:
            getattr(runner, name)(*call_args, **call_kwargs)
        except Exception:
            logger.exception("command %s failed (node 0's failed the same way)", name)
