"""Decode tokens/s of a tiny random Qwen2-MoE: the grouped-matmul expert path against a dense loop over
every expert, same process, same checkpoint, interleaved steps (not a test).

    python benchmarks/moe.py                                   # the tests' tiny model (hidden 64, 8 experts)
    python benchmarks/moe.py --hidden 512 --experts 64 --top-k 4 --moe-inter 256

The checkpoint is generated with transformers (random weights, as in tests/conftest.py). Each decode step
goes through `ModelRunner.run` (padding, the jitted step, the KV write, the host copy); the dense loop is
`model.qwen2_moe.routed_experts` swapped for one that runs every expert on every token and masks by the
router's choice (what a MoE layer without sorting and grouped matmul does). Median of `--repeats` steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.qwen2_moe as qwen2_moe  # noqa: E402
from serving.config import resolve_runtime_config  # noqa: E402
from serving.runner import HostBatch, ModelRunner  # noqa: E402
from serving.server_args import ServerArgs  # noqa: E402
from tests.conftest import make_tiny_checkpoint  # noqa: E402


def dense_loop_experts(experts, x, weights, expert_ids, valid, *, backend):
    """Every expert on every token, weighted by the router's weight for it (0 when not chosen)."""
    del backend
    num_experts = experts.down_proj.kernel.shape[0]
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        if experts.gate_up_proj is not None:
            gate, up = jnp.split(x @ experts.gate_up_proj.kernel[e], 2, axis=-1)
        else:
            gate, up = x @ experts.gate_proj.kernel[e], x @ experts.up_proj.kernel[e]
        y = (jax.nn.silu(gate) * up) @ experts.down_proj.kernel[e]
        scale = jnp.sum(jnp.where(expert_ids == e, weights, 0), axis=-1) * valid
        out = out + y.astype(jnp.float32) * scale[:, None]
    return out.astype(x.dtype)


def decode_batch(seqs: int, context: int, page_size: int) -> HostBatch:
    pages_each = -(-context // page_size)
    pages = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(seqs)]
    return HostBatch(np.full(seqs, 5, np.int32), np.full(seqs, context - 1, np.int32),
                     np.full(seqs, context, np.int32), pages, np.ones(seqs, np.int32), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-inter", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(
            Path(tmp) / "moe", "qwen2_moe", hidden_size=args.hidden, num_hidden_layers=args.layers,
            num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_inter,
            shared_expert_intermediate_size=2 * args.moe_inter, num_attention_heads=4, num_key_value_heads=2)
        server_args = ServerArgs(model_path=str(path), max_total_tokens=max(args.seqs) * (args.context + 16),
                                 max_running_requests=max(args.seqs), disable_compilation_cache=True)
        runtime = resolve_runtime_config(server_args)
        grouped = ModelRunner(path, runtime)
        batches = {s: decode_batch(s, args.context, runtime.page_size) for s in args.seqs}
        for batch in batches.values():  # compile under the grouped path
            grouped.run(batch)
        original = qwen2_moe.routed_experts
        qwen2_moe.routed_experts = dense_loop_experts
        try:
            dense = ModelRunner(path, runtime)
            for batch in batches.values():  # compile (trace) under the dense loop
                dense.run(batch)
        finally:
            qwen2_moe.routed_experts = original

    print(f"Qwen2-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
          f"expert inter {args.moe_inter}; {jax.default_backend()}, decode at context {args.context}")
    print(f"{'seqs':>5} | {'grouped tok/s':>13} | {'dense loop tok/s':>16} | {'speed-up':>8}")
    for seqs, batch in batches.items():
        times = {"grouped": [], "dense": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for name, runner in (("grouped", grouped), ("dense", dense)):
                start = time.perf_counter()
                runner.run(batch)
                times[name].append(time.perf_counter() - start)
        g, d = (seqs / statistics.median(times[k]) for k in ("grouped", "dense"))
        print(f"{seqs:>5} | {g:>13.0f} | {d:>16.0f} | {g / d:>7.2f}x")


if __name__ == "__main__":
    main()
