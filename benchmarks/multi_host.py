"""What multi-host lock-step costs: the command broadcast alone, and single-stream decode on one host vs two.

    python benchmarks/multi_host.py                      # tiny generated llama (8 heads), 64 tokens, 5 rounds
    python benchmarks/multi_host.py --model-path DIR --new-tokens 128 --repeats 3

1. The command channel (serving/multihost.py) between two bare processes on 127.0.0.1: the time node 0
   takes to send one decode step's batch (`--seqs` sequences), median of 300 sends after 50 warm-ups.
2. The same model at `--tp-size 2` served two ways, back to back: one process with 2 simulated CPU devices,
   and two processes (`--nnodes 2`, one device each, gloo over loopback). Each answers one greedy request of
   `--new-tokens` tokens per round; output tokens/s, median of `--repeats` rounds after a warm-up. Both
   runs split the same cores, so the difference is the lock-step's broadcast plus gloo's collectives
   between processes against XLA's within one.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.utils import launch_server_cmd, terminate_process, wait_for_server  # noqa: E402

ONE_DEVICE = "--xla_force_host_platform_device_count=1"
FLAGS = "--tp-size 2 --log-level warning --max-running-requests 4 --max-total-tokens 4096 --disable-compilation-cache"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel_process(rank: int, port: int, seqs: int) -> None:
    """One of the two processes of part 1 (run by `main` as a subprocess); node 0 prints the result."""
    from serving.multihost import STOP, CommandChannel, initialize
    from serving.server_args import ServerArgs
    from serving.steps import HostBatch

    initialize(ServerArgs(nnodes=2, node_rank=rank, dist_init_addr=f"127.0.0.1:{port}", tp_size=2))
    channel = CommandChannel()
    if rank == 1:
        while channel.receive()[0] != STOP:
            pass
        return
    sampling = {key: np.zeros(seqs, np.float32) for key in ("temperature", "top_p", "min_p")}
    sampling.update(top_k=np.full(seqs, -1, np.int32), seeds=np.zeros(seqs, np.uint32),
                    steps=np.zeros(seqs, np.int32), banned_ids=np.full((seqs, 8), -1, np.int32))
    host = HostBatch(np.arange(seqs, dtype=np.int32), np.full(seqs, 400, np.int32), np.full(seqs, 401, np.int32),
                     [list(range(26))] * seqs, np.ones(seqs, np.int32), sampling)
    times = []
    for _ in range(350):
        start = time.perf_counter()
        channel.send("run", host)
        times.append(time.perf_counter() - start)
    channel.stop()
    size = len(pickle.dumps(("run", (host,), {}), protocol=pickle.HIGHEST_PROTOCOL))
    print(f"command channel: a decode batch of {seqs} sequences ({size} B pickled): "
          f"median {statistics.median(times[50:]) * 1e3:.2f} ms per step, p90 "
          f"{np.percentile(times[50:], 90) * 1e3:.2f} ms", flush=True)


def decode_rate(url: str, new_tokens: int) -> float:
    start = time.perf_counter()
    r = requests.post(url + "/generate", timeout=600, json={"input_ids": [5, 6, 7], "sampling_params": {
        "temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}})
    r.raise_for_status()
    return len(r.json()["output_ids"]) / (time.perf_counter() - start)


def serve_and_measure(model: str, nnodes: int, new_tokens: int, repeats: int) -> list[float]:
    follower = None
    if nnodes == 1:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        command = f"python -m serving.main --model-path {model} {FLAGS}"
    else:
        os.environ["XLA_FLAGS"] = ONE_DEVICE
        nodes = f"--nnodes 2 --dist-init-addr 127.0.0.1:{_free_port()}"
        follower = subprocess.Popen([sys.executable, "-m", "serving.main", "--model-path", model, *FLAGS.split(),
                                     *nodes.split(), "--node-rank", "1"], cwd=REPO)
        command = f"python -m serving.main --model-path {model} {FLAGS} {nodes} --node-rank 0"
    process, port = launch_server_cmd(command)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout=900, process=process)
        decode_rate(url, 4)
        return [decode_rate(url, new_tokens) for _ in range(repeats)]
    finally:
        terminate_process(process)
        if follower is not None:
            follower.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: a tiny generated llama (8 heads, 2 KV heads)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seqs", type=int, default=8, help="sequences in part 1's decode batch")
    parser.add_argument("--channel-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.channel_rank is not None:
        channel_process(args.channel_rank, args.port, args.seqs)
        return

    port, env = _free_port(), {**os.environ, "XLA_FLAGS": ONE_DEVICE}
    procs = [subprocess.Popen([sys.executable, __file__, "--channel-rank", str(rank), "--port", str(port),
                               "--seqs", str(args.seqs)], env=env) for rank in (0, 1)]
    for proc in procs:
        proc.wait(timeout=300)

    model = args.model_path
    if model is None:
        from checkpoints.tiny import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "llama", seed=0, num_attention_heads=8,
                                         num_key_value_heads=2))
    rows = [(label, serve_and_measure(model, nnodes, args.new_tokens, args.repeats))
            for label, nnodes in (("one process, 2 devices", 1), ("--nnodes 2, 1 device each", 2))]
    print(f"\n--tp-size 2, one greedy request of {args.new_tokens} tokens per round, median of {args.repeats} "
          f"rounds, {os.cpu_count()} CPUs")
    print("| served as | output tok/s (median) | min | max |")
    print("|---|---|---|---|")
    for label, rates in rows:
        print(f"| {label} | {statistics.median(rates):.1f} | {min(rates):.1f} | {max(rates):.1f} |")


if __name__ == "__main__":
    main()
