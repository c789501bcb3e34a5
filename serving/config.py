"""Platform defaults resolved once: `ServerArgs` + the JAX platform -> the `RuntimeConfig` the runner, the
scheduler and the KV cache planner take.

Where a flag is omitted, CPU and accelerators differ (measured reasons in docs/architecture.md and
docs/performance.md):

| setting | CPU | TPU / GPU |
|---|---|---|
| `--dtype auto` | float32 (XLA:CPU's bfloat16 matvec is ~20x slower) | the checkpoint's dtype |
| `--max-running-requests` | 64 | 256 |
| `--chunked-prefill-size` | 512 | 8192 |
| `--mem-fraction-static` (weights + KV pool) | 0.25 of RAM | 0.85 of device memory |
| layer loop | unrolled over per-layer params | `lax.scan` over stacked params |

Nothing else asks `jax.default_backend()` for a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from serving.server_args import ServerArgs

_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "half": jnp.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    platform: str  # "cpu", "tpu" or "gpu"
    dtype: str  # the --dtype name; `model_dtype` resolves "auto" against the checkpoint
    kv_cache_dtype: str  # "auto" (the model's dtype) or a dtype name
    page_size: int
    attention_backend: str  # the flag; resolved into an AttentionBackend by the runner
    max_running_requests: int
    chunked_prefill_size: int  # tokens per prefill chunk; a huge number when chunking is disabled
    max_step_tokens: int  # tokens of one step: decodes + prefill chunks
    context_length: int | None  # None: the model config's
    max_total_tokens: int | None  # None: from `mem_fraction_static`
    mem_fraction_static: float
    unroll_layers: bool
    schedule_policy: str = "fcfs"
    max_queued_requests: int | None = None  # None: no cap on requests waiting for admission
    decode_log_interval: int = 40  # decode steps between two "Decode batch" log lines
    moe_backend: str = "auto"  # `--moe-backend`, for MoE models (`kernels.moe.resolve_backend`)
    expert_recorder_mode: str | None = None  # `--expert-distribution-recorder-mode`: the step returns router counts
    is_embedding: bool = False  # --is-embedding: a causal LM checkpoint serves embeddings (model.registry)
    watchdog_timeout: float | None = None  # seconds a step may run before its requests are aborted (faults.py)
    tp_size: int = 1  # --tp-size: attention heads and MLP columns over the mesh's `tensor` axis (serving.mesh)
    ep_size: int = 1  # --ep-size: a MoE model's experts over the mesh's `expert` axis
    dense_backend: str = "auto"  # `--dense-backend`, resolved by the runner (`kernels.dense.resolve_dense_backend`)

    @property
    def on_cpu(self) -> bool:
        return self.platform == "cpu"

    def model_dtype(self, checkpoint_dtype: str | None):
        """`--dtype` as a jnp dtype; `auto` is float32 on CPU and the checkpoint's dtype elsewhere."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if self.on_cpu:
            return jnp.float32
        return _DTYPES.get(str(checkpoint_dtype or "bfloat16").replace("torch.", ""), jnp.bfloat16)

    def cache_dtype(self, model_dtype):
        return model_dtype if self.kv_cache_dtype == "auto" else _DTYPES[self.kv_cache_dtype]


def resolve_runtime_config(args: ServerArgs, platform: str | None = None) -> RuntimeConfig:
    platform = platform or jax.default_backend()
    on_cpu = platform == "cpu"
    max_running = args.max_running_requests or (64 if on_cpu else 256)
    chunk = args.chunked_prefill_size or (512 if on_cpu else 8192)
    chunking = chunk > 0  # -1 disables chunking: a prompt's whole prefill in one step
    step_tokens = min(args.max_prefill_tokens, chunk) if chunking else args.max_prefill_tokens
    if args.mem_fraction_static is not None:
        fraction = args.mem_fraction_static
    else:
        fraction = 0.25 if on_cpu else 0.85
    return RuntimeConfig(
        platform=platform, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, page_size=args.page_size,
        attention_backend=args.attention_backend, max_running_requests=max_running,
        chunked_prefill_size=chunk if chunking else 1 << 30, max_step_tokens=max(step_tokens, max_running),
        context_length=args.context_length, max_total_tokens=args.max_total_tokens, mem_fraction_static=fraction,
        unroll_layers=on_cpu, schedule_policy=args.schedule_policy,
        max_queued_requests=args.max_queued_requests, decode_log_interval=args.decode_log_interval,
        moe_backend=args.moe_backend, expert_recorder_mode=args.expert_distribution_recorder_mode,
        is_embedding=args.is_embedding, watchdog_timeout=args.watchdog_timeout or None,
        tp_size=args.tp_size, ep_size=args.ep_size,
        dense_backend=args.dense_backend,
    )


def enable_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`, for every compile (a second start is fast)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
