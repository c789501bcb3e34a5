"""Serving benchmark: our HTTP server against Hugging Face transformers' batched `generate`, same run.

    python benchmarks/serving.py                      # default model, float32, concurrency 1 and 64
    python benchmarks/serving.py --concurrency 1 16 64 --input-len 128 --output-len 128

For each concurrency C it sends `--num-prompts` requests (random token ids, `ignore_eos`, greedy) with at
most C in flight, streaming, and reports output tokens/s, time to first token and time per output token
(median and p99). The baseline runs transformers' `generate` on the same model, dtype and prompts in
batches of C. The table is printed and written to docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def one_request(url: str, ids: list[int], output_len: int) -> dict:
    body = {"input_ids": ids, "stream": True, "sampling_params": {
        "temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with requests.post(url + "/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if first is None:
                first = time.perf_counter()
            tokens = chunk["meta_info"]["completion_tokens"]
    end = time.perf_counter()
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens,
            "latency": end - start}


def run_server_load(url: str, prompts: list[list[int]], output_len: int, concurrency: int) -> dict:
    # Warm the buckets this load will use without counting it.
    one_request(url, prompts[0], 4)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda ids: one_request(url, ids, output_len), prompts))
    wall = time.perf_counter() - start
    return {
        "throughput": sum(r["tokens"] for r in results) / wall,
        "ttft_median": statistics.median(r["ttft"] for r in results),
        "ttft_p99": percentile([r["ttft"] for r in results], 99),
        "tpot_median": statistics.median(r["tpot"] for r in results),
        "tpot_p99": percentile([r["tpot"] for r in results], 99),
        "wall": wall,
    }


def run_transformers(model_dir: str, prompts: list[list[int]], output_len: int, batch: int, dtype: str) -> float:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                 pad_token_id=0)
            tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--num-prompts", type=int, default=None, help="per concurrency; default max(C, 4)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving.main")
    parser.add_argument("--output", default=str(REPO / "docs" / "performance.md"))
    args = parser.parse_args()

    if args.model_path is None:
        from checkpoints.default import default_model_dir

        args.model_path = str(default_model_dir())
    config = json.loads((Path(args.model_path) / "config.json").read_text())
    rng = np.random.default_rng(0)
    max_c = max(args.concurrency)
    command = (f"{sys.executable} -m serving.main --model-path {args.model_path} --dtype {args.dtype} "
               f"--log-level warning --max-running-requests {max(max_c, 1)} {args.server_args}")
    process, port = launch_server_cmd(command, host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_for_server(url, timeout=1800, settle_seconds=0, process=process)
        for c in args.concurrency:
            n = args.num_prompts or max(c, 4)
            prompts = [rng.integers(100, config["vocab_size"] - 100, args.input_len).tolist() for _ in range(n)]
            ours = run_server_load(url, prompts, args.output_len, c)
            rows.append((c, n, prompts, ours))
            print(f"pallas-serve concurrency {c}: {ours['throughput']:.1f} tok/s", flush=True)
    finally:
        terminate_process(process)

    table = ["| concurrency | requests | pallas-serve output tok/s | transformers output tok/s | speed-up | "
             "TTFT median / p99 (s) | TPOT median / p99 (ms) |", "|---|---|---|---|---|---|---|"]
    for c, n, prompts, ours in rows:
        base = float("nan") if args.skip_baseline else run_transformers(args.model_path, prompts, args.output_len, c,
                                                                          args.dtype)
        if not args.skip_baseline:
            print(f"transformers batch {c}: {base:.1f} tok/s", flush=True)
        table.append(
            f"| {c} | {n} | {ours['throughput']:.1f} | {base:.1f} | {ours['throughput'] / base:.2f}x | "
            f"{ours['ttft_median']:.3f} / {ours['ttft_p99']:.3f} | "
            f"{ours['tpot_median'] * 1000:.1f} / {ours['tpot_p99'] * 1000:.1f} |"
        )
    header = [
        "# Performance", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {os.cpu_count()} CPU threads, "
        f"model `{Path(args.model_path).name}`, {args.dtype}, {args.input_len} input / {args.output_len} output "
        "tokens per request (random ids, greedy, ignore_eos), streaming over HTTP.", "",
        f"Command: `python benchmarks/serving.py {' '.join(sys.argv[1:])}`".rstrip(), "",
        "The baseline is Hugging Face transformers' batched `generate` (PyTorch CPU) on the same model, dtype "
        "and prompts, in batches of the concurrency, measured in the same run.", "",
    ]
    text = "\n".join(header + table) + "\n"
    print(text)
    # Keep the hand-written analysis below the table across runs.
    output = Path(args.output)
    previous = output.read_text() if output.exists() else ""
    marker = "\n## Where the time goes"
    output.write_text(text + (previous[previous.index(marker):] if marker in previous else ""))


if __name__ == "__main__":
    main()
