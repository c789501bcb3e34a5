"""Time one runner step on a fixed batch, and optionally where XLA:CPU spends it (not a test).

    python benchmarks/step_profile.py decode --seqs 1 --context 250       # single-stream decode step
    python benchmarks/step_profile.py decode --seqs 64 --context 200      # batch-64 decode step
    python benchmarks/step_profile.py mixed --tokens 512 --context 200 --profile
    python benchmarks/step_profile.py prefill --tokens 4096 --prompts 1 --dtype bfloat16   # one long prompt
    python benchmarks/step_profile.py decode --seqs 1 --dense-backend reference cpu   # A/B, alternating
    python benchmarks/step_profile.py decode --seqs 1 --dtype float32 bfloat16 --dense-backend reference cpu

`decode`: `--seqs` sequences, one new token each, `--context` tokens of KV. `prefill`: `--tokens` split
over `--prompts` fresh prompts (4). `mixed`: 60 decodes plus 4 fresh prompts filling `--tokens` (what the scheduler
builds while requests arrive). The step runs on the bundled default model through `ModelRunner.run`
(padding, dispatch, the KV write, the host copy of the tokens), `--repeats` times; the table gives the
median and the minimum (this shared 2-core machine varies by +-15%). Several `--dense-backend`s build one
runner each and alternate their steps, so a busy machine slows them alike; so do several `--dtype`s. `--profile` adds XLA's own trace of
the step, summed per HLO op kind (thread-summed: two worker threads can both count).
"""

from __future__ import annotations

import argparse
import collections
import glob
import itertools
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints.default import default_model_dir  # noqa: E402
from serving.config import resolve_runtime_config  # noqa: E402
from serving.runner import HostBatch, ModelRunner  # noqa: E402
from serving.server_args import ServerArgs  # noqa: E402


def build_batch(mode: str, seqs: int, tokens: int, context: int, prompts: int = 4, prior: int = 0) -> HostBatch:
    if mode == "decode":
        q_lens, kv_lens = [1] * seqs, [context] * seqs
    else:
        decodes = 60 if mode == "mixed" else 0
        chunk = (tokens - decodes) // prompts
        q_lens = [1] * decodes + [chunk] * (prompts - 1) + [tokens - decodes - (prompts - 1) * chunk]
        kv_lens = [context] * decodes + [q + prior for q in q_lens[decodes:]]
    positions = np.concatenate([np.arange(k - q, k) for k, q in zip(kv_lens, q_lens, strict=True)])
    pages_each = -(-max(kv_lens) // 16)
    pages = [list(range(i * pages_each, (i + 1) * pages_each)) for i in range(len(q_lens))]
    return HostBatch(np.full(len(positions), 5, np.int32), positions.astype(np.int32),
                     np.array(kv_lens, np.int32), pages, np.array(q_lens, np.int32), {})


def profile(runner: ModelRunner, batch: HostBatch, top: int) -> None:
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(3):
            runner.run(batch)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
    padded = runner._pad(batch, *runner.bucket(len(batch.input_ids), len(batch.kv_lens)))
    hlo = runner._step.lower(runner._param_leaves, runner.kv_pages, padded).compile().as_text()
    op_of = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = .*?op_name=\"([^\"]+)\"", hlo)}
    # Native kernels by their FFI target (dense products apart from attention), not all as `ffi_call`.
    op_of.update({m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = .*?custom_call_target=\"([^\"]+)\"", hlo)})
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in op_of:
                    parts = op_of[event.name].split("/")
                    kind = ("in loop: " if "while" in parts[:-1] else "") + parts[-1]
                    totals[re.sub(r"\.\d+$", "", kind)] += event.duration_ns
    print("\n| HLO op kind (thread-summed) | ms per step |\n|---|---|")
    for kind, ns in totals.most_common(top):
        print(f"| {kind} | {ns / 3 / 1e6:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("decode", "prefill", "mixed"))
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--prior", type=int, default=0,
                        help="prefill / mixed: tokens each prompt already has in the cache (a later chunk of a long prompt)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "cpu", "reference"))
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "bf16"))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16"))
    parser.add_argument("--dense-backend", nargs="+", default=["auto"], choices=("auto", "cpu", "reference"))
    parser.add_argument("--prompts", type=int, default=4, help="fresh prompts of a prefill / mixed step")
    args = parser.parse_args()

    batch = build_batch(args.mode, args.seqs, args.tokens, args.context, args.prompts, args.prior)
    # A prefill longer than the default chunk runs as one step: the chunk is widened to hold it.
    runners = {}
    for dtype, dense in itertools.product(args.dtype, args.dense_backend):
        server_args = ServerArgs(dtype=dtype, page_size=16, attention_backend=args.attention_backend,
                                 max_running_requests=64, chunked_prefill_size=max(512, args.tokens),
                                 context_length=8192, max_total_tokens=96 * 512, kv_cache_dtype=args.kv_cache_dtype,
                                 dense_backend=dense)
        runners[dtype, dense] = ModelRunner(default_model_dir(), resolve_runtime_config(server_args))
        runners[dtype, dense].run(batch)
    times = {key: [] for key in runners}
    cpu = dict.fromkeys(runners, 0.0)
    for _ in range(args.repeats):
        for key, runner in runners.items():
            cpu_start, start = time.process_time(), time.perf_counter()
            runner.run(batch)
            times[key].append(time.perf_counter() - start)
            cpu[key] += time.process_time() - cpu_start
    tokens, seqs = len(batch.input_ids), len(batch.kv_lens)
    print("| mode | dtype | dense | tokens | sequences | context | median ms | min ms | cpu/wall |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for key, runner in runners.items():
        runs = times[key]
        print(f"| {args.mode} | {key[0]} | {runner.dense_backend} | {tokens} | {seqs} | {args.context} | "
              f"{np.median(runs) * 1e3:.1f} | {min(runs) * 1e3:.1f} | {cpu[key] / sum(runs):.2f} |")
    if args.profile:
        for runner in runners.values():
            print(f"\nDense backend {runner.dense_backend}:")
            profile(runner, batch, args.top)


if __name__ == "__main__":
    main()
