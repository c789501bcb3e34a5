"""`/get_server_info`'s body: the flags as served (with what the engine resolved), memory, page states."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax

from serving.memory import device_bytes_in_use

if TYPE_CHECKING:
    from serving.engine import Engine


def server_info(engine: Engine, page_counts: dict[str, int] | None = None) -> dict[str, Any]:
    args = engine.server_args.to_dict()
    # The implementation that runs (after resolution and any fallback), not the flag echoed back.
    args.update(attention_backend=engine.runner.attention.label, dense_backend=engine.runner.dense_backend,
                model_path=engine.model_path,
                tokenizer_path=engine.tokenizer_path, max_running_requests=engine.max_running_requests,
                chunked_prefill_size=engine.server_args.chunked_prefill_size or engine.chunked_prefill_size,
                context_length=engine.context_length)
    released = engine.scheduler.released  # /release_memory_occupation's tags (serving/memory.py)
    memory = {"weight": 0.0 if "weights" in released else engine.runner.weight_bytes / 2**30,
              "kvcache": 0.0 if "kv_cache" in released else engine.runner.kv_spec.total_bytes / 2**30,
              "token_capacity": engine.max_total_num_tokens, "graph": 0.0,
              "device_bytes_in_use": device_bytes_in_use()}
    return {
        **args, "status": "ready", "max_total_num_tokens": engine.max_total_num_tokens,
        "max_req_input_len": engine.max_req_input_len,
        "internal_states": [{**args, "last_gen_throughput": engine.scheduler.last_gen_throughput,
                             "memory_usage": memory, "kv_pages": page_counts}],
        "version": _version(), "jax_backend": jax.default_backend(), "pid": os.getpid(),
        # The device mesh (axis -> size) and what each of its devices holds, from the arrays' own shards.
        "mesh": engine.runner.placement.axis_sizes, "device_memory": engine.runner.device_memory(),
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pallas-serve")
    except PackageNotFoundError:
        return "0.0.0"
