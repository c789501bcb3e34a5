"""Throughput of one server at several tensor- and data-parallel degrees, on the same prompts, in one run.

    python benchmarks/multi_device.py                     # default model: tp 1, tp 3, dp 2; 8 prompts
    python benchmarks/multi_device.py --tp 1 3 --dp 2 4 --num-prompts 16 --concurrency 8 --devices 4

Each configuration starts `python -m serving.main` with `XLA_FLAGS=--xla_force_host_platform_device_count`
(simulated devices on CPU; real ones elsewhere), sends `--num-prompts` greedy requests (random token ids,
`ignore_eos`) with at most `--concurrency` in flight, and reports output tokens/s (median of `--repeats`
rounds after one warm-up round) with the per-device weight bytes the server reports. The default model
(SmolLM2-135M: 9 query / 3 KV heads) shards at tp 3. On CPU the simulated devices share the machine's
cores, so this measures the cost of the partitioned step (collectives, smaller matmuls), not a speed-up.
`--dp` rows run that many replicas at tp 1 (`--dp-size`): on CPU the replicas' scheduler threads step at
once on the same cores, so no speed-up is expected there either; on a host with several accelerators
each replica has its own.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.utils import launch_server_cmd, terminate_process, wait_for_server  # noqa: E402


def generate(url: str, ids: list[int], output_len: int) -> int:
    r = requests.post(url + "/generate", timeout=600, json={"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}})
    r.raise_for_status()
    return len(r.json()["output_ids"])


def output_rate(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> float:
    """Output tokens per second for all `prompts` with at most `concurrency` in flight."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(lambda ids: generate(url, ids, output_len), prompts))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the bundled model")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 3], help="tensor-parallel degrees (at dp 1)")
    parser.add_argument("--dp", type=int, nargs="*", default=[2], help="data-parallel degrees (at tp 1)")
    parser.add_argument("--devices", type=int, default=4, help="simulated CPU devices")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 10000, size=args.input_len).tolist() for _ in range(args.num_prompts)]
    rows = []
    configs = list(dict.fromkeys([(tp, 1) for tp in args.tp] + [(1, dp) for dp in args.dp]))  # (tp, dp), once each
    for tp, dp in configs:
        model = f" --model-path {args.model_path}" if args.model_path else ""
        process, port = launch_server_cmd(f"python -m serving.main{model} --tp-size {tp} --dp-size {dp} "
                                          f"--log-level warning --max-running-requests {args.concurrency} "
                                          "--max-total-tokens 16384")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, timeout=900, process=process)
            output_rate(url, prompts[:2], 4, 2)  # warm-up
            rates = [output_rate(url, prompts, args.output_len, args.concurrency) for _ in range(args.repeats)]
            info = requests.get(url + "/get_server_info", timeout=60).json()
        except RuntimeError:  # refused at start-up (e.g. a tp the model does not divide by): its log says why
            print(f"--tp-size {tp} --dp-size {dp}: the server did not start", file=sys.stderr)
            continue
        finally:
            terminate_process(process)
        weights = max(entry["weights_bytes"] for entry in info["device_memory"])
        rows.append((tp, dp, info["mesh"], statistics.median(rates), min(rates), max(rates), weights / 1e6))

    print(f"\n{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out, concurrency "
          f"{args.concurrency}, {args.devices} simulated devices on {os.cpu_count()} CPUs, median of {args.repeats}")
    print("| tp | dp | mesh | output tok/s (median) | min | max | weights per device (MB) |")
    print("|---|---|---|---|---|---|---|")
    for tp, dp, mesh, median, low, high, weights in rows:
        print(f"| {tp} | {dp} | {mesh} | {median:.1f} | {low:.1f} | {high:.1f} | {weights:.1f} |")


if __name__ == "__main__":
    main()
