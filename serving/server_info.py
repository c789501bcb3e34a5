"""`/get_server_info`'s body: the flags as served (with what the engine resolved), memory, page states."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax

from serving.memory import device_bytes_in_use

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.replicas import Replica


def server_info(engine: Engine, page_counts: list[dict[str, int]] | None = None) -> dict[str, Any]:
    """`internal_states` has one entry per data-parallel replica (`page_counts` each's, in rank order);
    `mesh` is one replica's with `data` the number of replicas, `device_memory` covers every replica's devices."""
    args = engine.server_args.to_dict()
    # The implementation that runs (after resolution and any fallback), not the flag echoed back.
    args.update(attention_backend=engine.runner.attention.label, dense_backend=engine.runner.dense_backend,
                model_path=engine.model_path,
                tokenizer_path=engine.tokenizer_path, max_running_requests=engine.max_running_requests,
                chunked_prefill_size=engine.server_args.chunked_prefill_size or engine.chunked_prefill_size,
                context_length=engine.context_length)
    states = [{**args, **_replica_state(engine, replica), "kv_pages": None if page_counts is None else page_counts[i]}
              for i, replica in enumerate(engine.replicas)]
    return {
        **args, "status": "ready", "max_total_num_tokens": engine.max_total_num_tokens,
        "max_req_input_len": engine.max_req_input_len, "internal_states": states,
        "version": _version(), "jax_backend": jax.default_backend(), "pid": os.getpid(),
        # The device mesh (axis -> size) and what each of its devices holds, from the arrays' own shards.
        "mesh": {**engine.runner.placement.axis_sizes, "data": len(engine.replicas)},
        "device_memory": [entry for replica in engine.replicas for entry in replica.runner.device_memory()],
    }


def _replica_state(engine: Engine, replica: Replica) -> dict[str, Any]:
    runner, scheduler = replica.runner, replica.scheduler
    released = scheduler.released  # /release_memory_occupation's tags (serving/memory.py)
    memory = {"weight": 0.0 if "weights" in released else runner.weight_bytes / 2**30,
              "kvcache": 0.0 if "kv_cache" in released else runner.kv_spec.total_bytes / 2**30,
              "token_capacity": runner.kv_spec.max_total_tokens, "graph": 0.0,
              "device_bytes_in_use": device_bytes_in_use(runner.placement.devices)}
    return {"dp_rank": replica.rank, "last_gen_throughput": scheduler.last_gen_throughput, "memory_usage": memory,
            "num_steps": scheduler.num_steps, "num_routed_requests": engine.router.routed[replica.rank]}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pallas-serve")
    except PackageNotFoundError:
        return "0.0.0"
