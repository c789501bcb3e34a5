"""What a constrained request costs per decode step, against a free one, in the same run (not a test).

    python benchmarks/grammar.py                    # default model, batches of 1 and 16, 64 new tokens
    python benchmarks/grammar.py --batch 1 16 64 --new-tokens 128

Three measurements, each the median of `--repeats`:
- end to end: a batch of B identical requests (greedy, `ignore_eos`, B random prompts) through the
  in-process `Engine`, free, constrained by a regex that cannot finish within the budget (so both run the
  same number of steps), and constrained by a JSON schema (which ends when its object closes; the time is
  divided by the tokens it made); reported as milliseconds per generated token of one request (wall
  time / steps);
- host: `serving.grammar.token_bitmask` for B matchers (what the scheduler adds before a constrained step);
- device: one decode step of B sequences through `ModelRunner.run` with and without an all-ones mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.engine import Engine  # noqa: E402
from serving.grammar import token_bitmask  # noqa: E402
from serving.protocol import SamplingParams  # noqa: E402
from serving.runner import HostBatch  # noqa: E402

REGEX = "[a-z ,.]{4000}"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def end_to_end(engine: Engine, prompts: list[list[int]], extra: dict, new_tokens: int, repeats: int):
    params = [{"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True, **extra} for _ in prompts]
    seconds, outs = timed(lambda: engine.generate(input_ids=prompts, sampling_params=params), repeats)
    outs = outs if isinstance(outs, list) else [outs]
    steps = max(out["meta_info"]["completion_tokens"] for out in outs)
    return 1e3 * seconds / steps, steps


def device_step(engine: Engine, batch: int, repeats: int, masked: bool) -> float:
    runner = engine.runner
    context = 64
    pages = -(-context // runner.page_size)
    host = HostBatch(np.full(batch, 5, np.int32), np.full(batch, context - 1, np.int32),
                     np.full(batch, context, np.int32), [list(range(i * pages, (i + 1) * pages)) for i in range(batch)],
                     np.ones(batch, np.int32), {},
                     np.full((batch, engine.grammars.mask_width), -1, np.int32) if masked else None)
    runner.run(host)  # warm
    seconds, _ = timed(lambda: runner.run(host), repeats * 5)
    return 1e3 * seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="omitted = the bundled default model")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = Engine(model_path=args.model_path, log_level="warning", max_running_requests=max(args.batch))
    rng = np.random.default_rng(0)
    rows = []
    try:
        for batch in args.batch:
            prompts = [rng.integers(100, engine.vocab_size - 100, args.prompt_len).tolist() for _ in range(batch)]
            free, _ = end_to_end(engine, prompts, {}, args.new_tokens, args.repeats)
            regex, _ = end_to_end(engine, prompts, {"regex": REGEX}, args.new_tokens, args.repeats)
            schema, json_steps = end_to_end(engine, prompts, {"json_schema": json.dumps(SCHEMA)}, args.new_tokens,
                                            args.repeats)
            matchers = [engine.grammars.matcher(SamplingParams(json_schema=json.dumps(SCHEMA))) for _ in range(batch)]
            host, _ = timed(lambda m=matchers: token_bitmask(m), args.repeats * 20)
            plain = device_step(engine, batch, args.repeats, masked=False)
            masked = device_step(engine, batch, args.repeats, masked=True)
            rows.append((batch, free, regex, schema, json_steps, 1e3 * host, plain, masked))
    finally:
        engine.shutdown()
    print(f"model: {engine.model_path or engine.model_dir}, vocab {engine.vocab_size}, "
          f"{args.new_tokens} new tokens, prompt {args.prompt_len}; ms, median of {args.repeats}")
    print("| batch | free ms/step | regex ms/step | json ms/step (steps) | host mask ms | device step ms "
          "| device step + mask ms |")
    print("|---|---|---|---|---|---|---|")
    for batch, free, regex, schema, steps, host, plain, masked in rows:
        print(f"| {batch} | {free:.2f} | {regex:.2f} | {schema:.2f} ({steps}) | {host:.3f} | {plain:.2f} "
              f"| {masked:.2f} |")


if __name__ == "__main__":
    main()
