"""Serving benchmark: pallas-serve against llama.cpp's `llama-server` and transformers, same machine, same run.

    python benchmarks/serving.py                                  # the full table (~15-25 min on 2 cores)
    python benchmarks/serving.py --dtypes float32 --peers none    # pallas-serve float32 only
    python benchmarks/serving.py --peers llama.cpp --skip-build   # llama.cpp must already be built
    python benchmarks/serving.py --skip-build --peers llama.cpp --llama-dtypes bfloat16 --concurrency 1 \
        --prefill-lengths --output -                              # single stream: our two rows, one peer

Every engine gets the same load through HTTP: for each concurrency C, `--num-prompts` requests (default
max(C, 4)) of `--input-len` random token ids, `--output-len` greedy tokens with EOS ignored, streamed,
at most C in flight; reported are output tokens/s, and the median time to first token (TTFT) and time
per output token (TPOT). pallas-serve runs `python -m serving.main --dtype D` (native `/generate`),
llama.cpp runs `llama-server` (native `/completion`, `-np` = the largest C, one unified KV buffer) on
a GGUF of D written from the same weights by llama.cpp's own converter (benchmarks/llama_cpp.py);
transformers runs batched `generate` (float32, batches of C) in process, so only its tok/s is shown.
Prefill at each `--prefill-lengths` L is one fresh L-token prompt with one output token: its TTFT
through HTTP, the same definition for both servers (`llama-bench` pp rates are printed beside). The
copy bandwidth (benchmarks/copy_bandwidth.py) and the warm restart to ready (benchmarks/restart.py)
are measured in the same run. The table replaces the top of docs/performance.md; the sections below
it are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # before benchmarks/ (the script's own folder), so `serving` is the package

import llama_cpp  # noqa: E402
from copy_bandwidth import copy_bandwidth  # noqa: E402
from restart import time_to_ready  # noqa: E402

from serving.utils import launch_server_cmd, reserve_port, terminate_process, wait_for_server  # noqa: E402

PEERS = ("llama.cpp", "transformers")
DTYPES = ("float32", "bfloat16")
KEPT_SECTIONS = "\n## Where the time goes"  # what follows it in docs/performance.md is kept across runs


@dataclass
class Row:
    """One engine and dtype: per-concurrency loads and per-length prefill TTFTs (seconds)."""

    engine: str
    dtype: str
    loads: dict[int, dict[str, float]] = field(default_factory=dict)
    prefill: dict[int, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Client:
    """How to stream one request from a server: its URL, a body builder and a token counter."""

    url: str
    body: Callable[[list[int], int], dict]
    count: Callable[[dict, int], int]


def ours_client(url: str) -> Client:
    def body(ids: list[int], output_len: int) -> dict:
        return {"input_ids": ids, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}}

    return Client(url + "/generate", body, lambda chunk, _: chunk["meta_info"]["completion_tokens"])


def llama_client(url: str) -> Client:
    return Client(url + "/completion", llama_cpp.completion_body, llama_cpp.count_tokens)


def one_request(client: Client, ids: list[int], output_len: int) -> dict:
    start = time.perf_counter()
    first, tokens = None, 0
    with requests.post(client.url, json=client.body(ids, output_len), stream=True, timeout=3600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():  # bytes, split at newlines only
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            tokens = client.count(json.loads(line[len(b"data: "):]), tokens)
            if first is None and tokens > 0:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / max(tokens - 1, 1), "tokens": tokens}


def run_load(client: Client, prompts: list[list[int]], output_len: int, concurrency: int) -> dict[str, float]:
    one_request(client, prompts[0], 4)  # warm whatever this load uses, uncounted
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda ids: one_request(client, ids, output_len), prompts))
    wall = time.perf_counter() - start
    return {"throughput": sum(r["tokens"] for r in results) / wall,
            "ttft": statistics.median(r["ttft"] for r in results),
            "tpot": statistics.median(r["tpot"] for r in results)}


def measure(client: Client, row: Row, workload: dict[int, list[list[int]]], prefill: dict[int, list[int]],
            output_len: int) -> Row:
    for concurrency, prompts in workload.items():
        row.loads[concurrency] = run_load(client, prompts, output_len, concurrency)
        print(f"{row.engine} {row.dtype} concurrency {concurrency}: "
              f"{row.loads[concurrency]['throughput']:.1f} tok/s", flush=True)
    for length, ids in prefill.items():
        row.prefill[length] = one_request(client, ids, 1)["ttft"]
        print(f"{row.engine} {row.dtype} prefill {length}: {row.prefill[length]:.2f} s", flush=True)
    return row


def run_ours(model_dir: Path, dtype: str, max_c: int, extra: str, **work) -> Row:
    command = (f"{sys.executable} -m serving.main --model-path {model_dir} --dtype {dtype} --log-level warning "
               f"--max-running-requests {max_c} {extra}")
    process, port = launch_server_cmd(command, host="127.0.0.1")
    try:
        wait_for_server(f"http://127.0.0.1:{port}", timeout=1800, settle_seconds=0, process=process)
        return measure(ours_client(f"http://127.0.0.1:{port}"), Row("pallas-serve", dtype), **work)
    finally:
        terminate_process(process)


def run_llama(build_dir: Path, model_dir: Path, dtype: str, max_c: int, context: int, **work) -> Row:
    gguf = llama_cpp.write_gguf(build_dir, model_dir, dtype)
    threads = os.cpu_count() or 1
    port, lock = reserve_port("127.0.0.1")
    lock.close()  # llama-server may not bind a port another socket holds, even with SO_REUSEADDR
    process = llama_cpp.launch_server(build_dir, gguf, port, max_c, context, threads)
    try:
        llama_cpp.wait_ready(f"http://127.0.0.1:{port}", process)
        row = measure(llama_client(f"http://127.0.0.1:{port}"), Row("llama-server", dtype), **work)
    finally:
        process.terminate()
        process.wait(30)
    if work["prefill"]:
        rates = llama_cpp.prefill_rates(build_dir, gguf, sorted(work["prefill"]), threads)
        row.note = "llama-bench " + ", ".join(f"pp{n} {rate:.0f} tok/s" for n, rate in sorted(rates.items()))
    return row


def run_transformers(model_dir: Path, workload: dict[int, list[list[int]]], output_len: int) -> Row:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    row = Row("transformers generate", "float32", note="batched in process: no TTFT / TPOT")
    for batch, prompts in workload.items():
        tokens, start = 0, time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                ids = torch.tensor(prompts[i : i + batch])
                out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                     pad_token_id=0)
                tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
        row.loads[batch] = {"throughput": tokens / (time.perf_counter() - start), "ttft": float("nan"),
                            "tpot": float("nan")}
        print(f"transformers batch {batch}: {row.loads[batch]['throughput']:.1f} tok/s", flush=True)
    return row


def _cell(value: float, fmt: str) -> str:
    return "—" if value is None or np.isnan(value) else format(value, fmt)


def render_table(rows: list[Row], concurrency: list[int], prefill_lengths: list[int]) -> str:
    """The Markdown table: tok/s, TTFT and TPOT per concurrency, prefill TTFT (prompt tok/s) per length."""
    head = ["engine", "dtype"]
    head += [f"{c} {'stream' if c == 1 else 'concurrent'} tok/s" for c in concurrency]
    head += [f"TTFT @{c} (s)" for c in concurrency] + [f"TPOT @{c} (ms)" for c in concurrency]
    head += [f"prefill {n:,}: TTFT s (tok/s)" for n in prefill_lengths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        nan = {"throughput": float("nan"), "ttft": float("nan"), "tpot": float("nan")}
        loads = [row.loads.get(c, nan) for c in concurrency]
        cells = [row.engine, row.dtype]
        cells += [_cell(load["throughput"], ".1f") for load in loads]
        cells += [_cell(load["ttft"], ".3f") for load in loads]
        cells += [_cell(load["tpot"] * 1000, ".1f") for load in loads]
        for n in prefill_lengths:
            ttft = row.prefill.get(n)
            cells.append("—" if ttft is None else f"{ttft:.2f} ({n / ttft:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(rows: list[Row], args: argparse.Namespace, *, bandwidth: float | None, weight_bytes: int,
                  restarts: list[float]) -> str:
    lines = [
        "# Performance", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} ({platform.processor() or 'cpu'}) "
        f"with {os.cpu_count()} CPU threads, model `{args.model_name}`, {args.input_len} input / "
        f"{args.output_len} output tokens per request (random ids, greedy, ignore_eos), streaming over HTTP.", "",
        f"Command: `python benchmarks/serving.py {' '.join(args.argv)}`".replace("  ", " ").rstrip(), "",
        render_table(rows, args.concurrency, args.prefill_lengths), "",
    ]
    lines += [f"- {row.engine} {row.dtype}: {row.note}" for row in rows if row.note]
    if bandwidth is not None:
        lines.append(f"- Copy bandwidth, 2 threads: {bandwidth / 1e9:.1f} GB/s (`python benchmarks/copy_bandwidth.py`); "
                     f"a single stream reading every weight once per token is capped at "
                     f"{bandwidth / weight_bytes:.0f} tok/s in float32 ({weight_bytes / 1e6:.0f} MB) and "
                     f"{2 * bandwidth / weight_bytes:.0f} tok/s in bfloat16.")
    if restarts:
        lines.append(f"- Restart to ready (default model, warm caches, spawn to the first 200 from "
                     f"/health_generate): median {statistics.median(restarts):.1f} s of "
                     f"{', '.join(f'{t:.1f}' for t in restarts)} (`python benchmarks/restart.py`).")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="a Hugging Face directory; default: the bundled model")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES,
                        help="pallas-serve and llama-server rows to run")
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=[*PEERS, "none"])
    parser.add_argument("--llama-dtypes", nargs="+", default=None, choices=DTYPES,
                        help="llama-server's rows (default: --dtypes), e.g. one peer row beside our two")
    parser.add_argument("--skip-build", action="store_true",
                        help="use the cached llama.cpp build; fail instead of building it (several minutes)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--num-prompts", type=int, default=None, help="per concurrency; default max(C, 4)")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-lengths", type=int, nargs="*", default=[512, 4096])
    parser.add_argument("--restart-repeats", type=int, default=3, help="warm restarts to time; 0 skips them")
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving.main")
    parser.add_argument("--output", default=str(REPO / "docs" / "performance.md"), help="'-' prints only")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if "none" in args.peers:
        args.peers = []
    return args


def write_report(text: str, output: str) -> None:
    """Replace the generated top of `output`, keeping the sections from KEPT_SECTIONS on."""
    if output == "-":
        return
    path = Path(output)
    previous = path.read_text() if path.exists() else ""
    path.write_text(text + (previous[previous.index(KEPT_SECTIONS):] if KEPT_SECTIONS in previous else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    build_dir = None
    if "llama.cpp" in args.peers:
        build_dir = llama_cpp.cached_build_dir() if args.skip_build else llama_cpp.build()
        if build_dir is None:
            sys.exit("--skip-build: no cached llama.cpp build; run `python benchmarks/llama_cpp.py build` first")
    if args.model_path is None:
        from checkpoints.default import default_model_dir

        args.model_path = str(default_model_dir())
    model_dir = Path(args.model_path)
    args.model_name = model_dir.name
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    fresh = lambda n: rng.integers(100, vocab - 100, n).tolist()  # noqa: E731
    workload = {c: [fresh(args.input_len) for _ in range(args.num_prompts or max(c, 4))] for c in args.concurrency}
    prefill = {n: fresh(n) for n in args.prefill_lengths}
    max_c = max(args.concurrency)
    work = {"workload": workload, "prefill": prefill, "output_len": args.output_len}
    # One unified KV buffer: every slot's request fits at once, and so does the longest prefill.
    context = max(max_c * (args.input_len + args.output_len + 8), max(args.prefill_lengths, default=0) + 16)

    bandwidth = copy_bandwidth(threads=2)
    print(f"copy bandwidth, 2 threads: {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = [run_ours(model_dir, dtype, max_c, args.server_args, **work) for dtype in args.dtypes]
    if build_dir is not None:
        rows += [run_llama(build_dir, model_dir, dtype, max_c, context, **work)
                 for dtype in args.llama_dtypes or args.dtypes]
    if "transformers" in args.peers:
        rows.append(run_transformers(model_dir, workload, args.output_len))
    if args.restart_repeats:
        time_to_ready(args.server_args)  # uncounted: compiles what a changed checkout or config needs
    restarts = [time_to_ready(args.server_args) for _ in range(args.restart_repeats)]
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    text = render_report(rows, args, bandwidth=bandwidth, weight_bytes=weight_bytes, restarts=restarts)
    print(text)
    write_report(text, args.output)


if __name__ == "__main__":
    main()
