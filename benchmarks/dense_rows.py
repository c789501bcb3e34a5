"""Time one dense product on the native CPU kernel against XLA's dot, by rows of `x` (not a test).

    python benchmarks/dense_rows.py                      # float32 and bfloat16, the default model's shapes
    python benchmarks/dense_rows.py --rows 1 64 256 --repeats 30

Shapes are the default model's (SmolLM2-135M): fused q/k/v 576 -> 960, fused gate/up 576 -> 3072, down
1536 -> 576, and the tied LM head (49152 x 576, transposed). Per row count it prints the median ms of
the kernel, of XLA's dot on the weights as stored, for bfloat16 of XLA's float32 dot on a float32 copy
(what `--dtype float32` runs), plus the kernel's weight read rate. The runs alternate, so a busy machine
slows all of them alike. `kernels/dense/tuning.py` takes its row thresholds from this table.

    python benchmarks/dense_rows.py --chain              # one decode step's products, kernel vs XLA

`--chain` times what a single-stream decode step streams: the products of 30 layers and the LM head,
each on its own weights (538 MB in float32, more than the caches hold, where the table above re-reads one
weight; placed as the server places them, in one huge-page arena: serving/host_arena.py), chained as the model chains them, and prints the weight read rate beside the copy bandwidth
(benchmarks/copy_bandwidth.py) measured in the same run, before and after. Rounds in which other
processes used the CPU (from /proc/stat) are dropped and counted: on a shared machine they only add noise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.copy_bandwidth import copy_bandwidth  # noqa: E402
from benchmarks.gpu_check import median_seconds  # noqa: E402
from kernels.dense import cpu, reference  # noqa: E402
from serving import host_arena  # noqa: E402

SHAPES = {"qkv": (576, 960, False), "gate_up": (576, 3072, False), "down": (1536, 576, False),
          "lm_head": (576, 49152, True)}
LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # q/k/v, o, gate/up, down: [K, N]
LAYERS = 30


def _busy_jiffies() -> tuple[int, int]:
    """(CPU jiffies the machine spent busy, jiffies this process spent): their growth apart is others' use."""
    with open("/proc/stat") as stat:
        fields = list(map(int, stat.readline().split()[1:]))
    with open("/proc/self/stat") as own:
        mine = own.read().rsplit(")", 1)[1].split()
    return sum(fields) - fields[3] - fields[4], int(mine[11]) + int(mine[12])


def chain(dtype, rounds: int) -> None:
    """The decode step's chain of products on distinct weights, on the kernel and on XLA's dot, alternating."""
    rng = np.random.default_rng(0)
    shapes = [(k, n, False) for _ in range(LAYERS) for k, n in LAYER] + [(576, 49152, True)]
    weights = [jnp.asarray(rng.standard_normal((n, k) if t else (k, n), np.float32) / np.sqrt(k), dtype)
               for k, n, t in shapes]
    weights = host_arena.gather(weights, jax.devices("cpu")[0])  # where the server keeps them (huge pages)
    nbytes = sum(w.nbytes for w in weights)

    def step(product):
        def run(x, *ws):
            for w, (k, _, t) in zip(ws, shapes, strict=True):
                x = product(jnp.resize(x, (1, k)), w, transposed=t)  # each product's input is the last output
            return x
        return jax.jit(run)

    runs = {"kernel": step(cpu.dense), "XLA dot": step(reference.dense)}
    x = jnp.ones((1, 576), dtype)
    times, dropped = {name: [] for name in runs}, 0
    for run in runs.values():
        jax.block_until_ready(run(x, *weights))  # compile
    for _ in range(rounds):
        start = _busy_jiffies()
        took = {}
        for name, run in runs.items():
            begin = time.perf_counter()
            jax.block_until_ready(run(x, *weights))
            took[name] = time.perf_counter() - begin
        end = _busy_jiffies()
        if (end[0] - start[0]) - (end[1] - start[1]) > 2:  # others ran meanwhile
            dropped += 1
            continue
        for name, seconds in took.items():
            times[name].append(seconds)
    for name, runs_s in times.items():
        if runs_s:
            ms = statistics.median(runs_s) * 1e3
            print(f"| {jnp.dtype(dtype).name} | {name} | {ms:.1f} | {min(runs_s) * 1e3:.1f} | {nbytes / ms / 1e6:.1f} | "
                  f"{len(runs_s)} ({dropped} dropped) |", flush=True)


def median_ms(fn, args, repeats: int) -> float:
    return median_seconds(fn, *args, repeats=repeats, warmup=1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chain", action="store_true", help="time one decode step's chain of products instead")
    args = parser.parse_args()
    if cpu.unavailable_reason():
        sys.exit(f"the CPU dense kernel is unavailable: {cpu.unavailable_reason()}")
    if args.chain:
        print(f"Copy bandwidth, 2 threads: {copy_bandwidth(2) / 1e9:.1f} GB/s\n\n"
              "| dtype | products on | median ms | min ms | weights GB/s | rounds |\n|---|---|---|---|---|---|")
        for name in args.dtypes:
            chain(jnp.dtype(name), args.repeats)
        print(f"\nCopy bandwidth, 2 threads, after: {copy_bandwidth(2) / 1e9:.1f} GB/s")
        return
    rng = np.random.default_rng(0)
    print("| dtype | shape | rows | kernel ms | XLA dot ms | XLA f32 copy ms | kernel GB/s |\n|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = jnp.dtype(name)
        for shape in args.shapes:
            k, n, transposed = SHAPES[shape]
            w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)) / np.sqrt(k), dtype)
            w32 = w.astype(jnp.float32)
            kernel = jax.jit(lambda x, w, t=transposed: cpu.dense(x, w, transposed=t))
            xla = jax.jit(lambda x, w, t=transposed: reference.dense(x, w, transposed=t))
            for rows in args.rows:
                x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
                ms = median_ms(kernel, (x, w), args.repeats)
                xla_ms = median_ms(xla, (x, w), args.repeats)
                copy_ms = xla_ms if name == "float32" else median_ms(xla, (x.astype(jnp.float32), w32), args.repeats)
                print(f"| {name} | {shape} | {rows} | {ms:.3f} | {xla_ms:.3f} | "
                      f"{copy_ms:.3f} | {w.nbytes / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
