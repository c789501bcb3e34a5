"""What a constrained request costs per decode step, against a free one, in the same run (not a test).

    python benchmarks/grammar.py                    # default model, batches of 1 and 16, 64 new tokens
    python benchmarks/grammar.py --batch 1 16 64 --new-tokens 128

Three measurements, each the minimum of `--repeats` runs taken in turns with the others of its row (this
shared machine's load varies a lot; the minimum is the least disturbed run):
- end to end: a batch of B identical requests (greedy, `ignore_eos`, B random prompts) through the
  in-process `Engine`, free, constrained by a regex that cannot finish within the budget (so both run the
  same number of steps), and constrained by a JSON schema (which ends when its object closes; the time is
  divided by the tokens it made); reported as milliseconds per generated token of one request (wall
  time / steps);
- host: `serving.grammar.token_bitmask` for B matchers inside a JSON string, each advanced by a token
  between two calls (what the scheduler adds before a constrained step; llguidance caches a state's mask,
  so an unadvanced matcher would measure the cache), the mean over 32 steps;
- device: one decode step of B sequences through `ModelRunner.run` with and without an all-ones mask.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.engine import Engine  # noqa: E402
from serving.grammar import token_bitmask  # noqa: E402
from serving.protocol import SamplingParams  # noqa: E402
from serving.runner import HostBatch  # noqa: E402

REGEX = "[a-z ,.]+"  # never complete; EOS is allowed, but the greedy model does not pick it
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


def interleaved(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Each of `fns` run `repeats` times, taking turns (so a change in the machine's load hits all of
    them alike); the minimum time of each, with its last result."""
    best, results = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return list(zip(best, results, strict=True))


def end_to_end(engine: Engine, prompts: list[list[int]], extras: list[dict], new_tokens: int,
               repeats: int) -> list[tuple[float, int]]:
    """(ms per step, steps) of the batch under each of `extras` (sampling params added to every request)."""
    def run(extra):
        params = [{"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True, **extra} for _ in prompts]
        return lambda: engine.generate(input_ids=prompts, sampling_params=params)

    rows = []
    for seconds, outs in interleaved([run(extra) for extra in extras], repeats):
        outs = outs if isinstance(outs, list) else [outs]
        steps = max(out["meta_info"]["completion_tokens"] for out in outs)
        rows.append((1e3 * seconds / steps, steps))
    return rows


def host_mask_seconds(engine: Engine, batch: int, steps: int = 32) -> float:
    matchers = [engine.grammars.matcher(SamplingParams(json_schema=json.dumps(SCHEMA))) for _ in range(batch)]
    for matcher in matchers:  # into the name string, where most tokens are allowed
        for token in engine.tokenizer.encode('{"name": "', add_special_tokens=False):
            matcher.advance(token)
    letter = engine.tokenizer.encode("a", add_special_tokens=False)[0]
    elapsed = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        token_bitmask(matchers)
        elapsed += time.perf_counter() - start
        for matcher in matchers:
            matcher.advance(letter)
    return elapsed / steps


def device_steps(engine: Engine, batch: int, repeats: int) -> tuple[float, float]:
    """ms of one decode step of `batch` sequences (64 tokens of context), without and with a mask."""
    runner = engine.runner
    context = 64
    pages = -(-context // runner.page_size)

    def host(mask):
        return HostBatch(np.full(batch, 5, np.int32), np.full(batch, context - 1, np.int32),
                         np.full(batch, context, np.int32), [list(range(i * pages, (i + 1) * pages)) for i in range(batch)],
                         np.ones(batch, np.int32), {}, mask)

    plain, masked = host(None), host(np.full((batch, engine.grammars.mask_width), -1, np.int32))
    (plain_s, _), (masked_s, _) = interleaved([lambda: runner.run(plain), lambda: runner.run(masked)], repeats * 5)
    return 1e3 * plain_s, 1e3 * masked_s


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
            (free, _), (regex, _), (schema, json_steps) = end_to_end(
                engine, prompts, [{}, {"regex": REGEX}, {"json_schema": json.dumps(SCHEMA)}], args.new_tokens,
                args.repeats)
            host = host_mask_seconds(engine, batch)
            plain, masked = device_steps(engine, batch, args.repeats)
            rows.append((batch, free, regex, schema, json_steps, 1e3 * host, plain, masked))
    finally:
        engine.shutdown()
    print(f"model: {engine.model_path or engine.model_dir}, vocab {engine.vocab_size}, "
          f"{args.new_tokens} new tokens, prompt {args.prompt_len}; ms, minimum of {args.repeats}")
    print("| batch | free ms/step | regex ms/step | json ms/step (steps) | host mask ms | device step ms "
          "| device step + mask ms |")
    print("|---|---|---|---|---|---|---|")
    for batch, free, regex, schema, steps, host, plain, masked in rows:
        print(f"| {batch} | {free:.2f} | {regex:.2f} | {schema:.2f} ({steps}) | {host:.3f} | {plain:.2f} "
              f"| {masked:.2f} |")


if __name__ == "__main__":
    main()
