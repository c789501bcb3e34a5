"""What penalties and logprobs cost, and that a batch asking for neither costs nothing more (not a test).

    python benchmarks/sampling_extras.py --seqs 64 --context 200 --repeats 20

One process, one model (the bundled default), one decode batch of `--seqs` sequences, timed through
`ModelRunner.run` in rounds that interleave, so the shared machine's load hits every variant alike:
- `baseline`: the step as it was before penalties and logprobs (tokens only: XLA drops the logits and
  hidden states the current step also returns), run through the same padding and host copy;
- `plain`: `ModelRunner.run` on the same batch, no request asking for anything (must match baseline);
- `penalised`: every row with frequency / presence / repetition penalties and a logit_bias;
- `logprobs`: every row with return_logprob and 5 top logprobs.
The table gives median and minimum wall ms per step and the CPU ms per step (process time, which the
other tenants of a shared machine disturb less than wall time).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_profile import build_batch  # noqa: E402
from checkpoints.default import default_model_dir  # noqa: E402
from serving.config import resolve_runtime_config  # noqa: E402
from serving.runner import ModelRunner, _keep_aux, _sample_step  # noqa: E402
from serving.server_args import ServerArgs  # noqa: E402


def _tokens_only(*args):
    (tokens, _, _), kv, aux = _sample_step(*args)
    return tokens, kv, aux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    server_args = ServerArgs(model_path="default", max_running_requests=args.seqs, disable_compilation_cache=True)
    runner = ModelRunner(default_model_dir(), resolve_runtime_config(server_args))
    host = build_batch("decode", args.seqs, 0, args.context)
    seqs, vocab = args.seqs, runner.config.vocab_size
    rng = np.random.default_rng(0)
    penalised = build_batch("decode", args.seqs, 0, args.context)
    penalised.penalties = {
        "frequency": np.full(seqs, 0.5, np.float32), "presence": np.full(seqs, 0.3, np.float32),
        "repetition": np.full(seqs, 1.2, np.float32),
        "output_ids": rng.integers(0, vocab, (seqs, 64)).astype(np.int32),
        "prompt_ids": rng.integers(0, vocab, (seqs, 256)).astype(np.int32),
        "bias_ids": rng.integers(0, vocab, (seqs, 32)).astype(np.int32),
        "bias_values": np.ones((seqs, 32), np.float32)}
    with_logprobs = build_batch("decode", args.seqs, 0, args.context)
    with_logprobs.logprobs = {"token_ids": np.zeros((seqs, 0), np.int32), "input_indices": np.zeros(1, np.int32),
                              "input_targets": np.zeros(1, np.int32), "input_rows": np.zeros(1, np.int32)}
    with_logprobs.num_top = 8

    donate = () if runner.attention.head_major else (1,)
    static = (runner._bound, runner._param_treedef, runner.attention)
    baseline_step = jax.jit(partial(_keep_aux, partial(_tokens_only, *static), runner.aux_names),
                            donate_argnums=donate)

    def baseline():
        tokens = runner._run(baseline_step, runner._padded(host), len(host.input_ids))
        return np.asarray(tokens)

    variants = {"baseline": baseline, "plain": lambda: runner.run(host),
                "penalised": lambda: runner.run(penalised), "logprobs": lambda: runner.run(with_logprobs)}
    for run in variants.values():  # compile
        run()
        run()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, run in variants.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            wall[name].append((time.perf_counter() - w) * 1e3)
            cpu[name].append((time.process_time() - c) * 1e3)
    print(f"\ndecode, {seqs} sequences, context {args.context}, {args.repeats} interleaved rounds\n")
    print("| variant | median ms | min ms | CPU ms (median) |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {statistics.median(wall[name]):.1f} | {min(wall[name]):.1f} | "
              f"{statistics.median(cpu[name]):.1f} |")


if __name__ == "__main__":
    main()
