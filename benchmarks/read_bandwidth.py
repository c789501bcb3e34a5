"""The read-only ceiling of a single decode stream: its weights' sizes read in order by two threads, a
barrier between buffers as between products (`read_chain.cc`, no arithmetic kept), beside the copy
bandwidth measured in the same run (not a test).

    python benchmarks/read_bandwidth.py                 # the default model's chain, float32 and bfloat16

A single stream's step reads every weight once, product after product; this is what that pattern
reaches with nothing but the reads, so the kernel's rate (`dense_rows.py --chain`) and the whole step's
(`serving.py`) can be put against it as well as against the copy rate. Built with the system C++
compiler on first use, cached as the kernels are (kernels/native_build.py).
"""

from __future__ import annotations

import ctypes
import functools
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.copy_bandwidth import copy_bandwidth  # noqa: E402
from benchmarks.dense_rows import LAYER, LAYERS, SHAPES  # noqa: E402
from kernels import native_build  # noqa: E402

_SOURCE = Path(__file__).with_name("read_chain.cc")


@functools.cache
def _library() -> ctypes.CDLL:
    """read_chain.cc built (and cached) the way the kernels are (kernels/native_build.py)."""
    compiler = native_build._compiler()
    if compiler is None:
        sys.exit("no C++ compiler was found (set CXX, or install g++)")
    lib = ctypes.CDLL(str(native_build._build(_SOURCE, compiler)))
    lib.read_chain.restype = ctypes.c_double
    lib.read_chain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    return lib


def decode_chain_bytes(itemsize: int) -> list[int]:
    """The weight bytes of one decode step's products on the default model, in order."""
    head_k, head_n, _ = SHAPES["lm_head"]
    return [k * n * itemsize for _ in range(LAYERS) for k, n in LAYER] + [head_k * head_n * itemsize]


def read_chain_seconds(sizes: list[int], rounds: int = 9) -> list[float]:
    """Seconds per round to read fresh buffers of `sizes` bytes in order (two threads, a barrier each)."""
    buffers = [np.ones(size, np.uint8) for size in sizes]  # written: no page faults inside the timing
    pointers = (ctypes.c_void_p * len(sizes))(*[b.ctypes.data for b in buffers])
    lengths = (ctypes.c_int64 * len(sizes))(*sizes)
    lib = _library()
    lib.read_chain(pointers, lengths, len(sizes))  # warm-up
    return [lib.read_chain(pointers, lengths, len(sizes)) for _ in range(rounds)]


def main() -> None:
    copy = copy_bandwidth(2)
    print(f"Copy bandwidth, 2 threads: {copy / 1e9:.1f} GB/s\n")
    print("| weights | bytes | median ms | min ms | read GB/s (median) | vs copy |\n|---|---|---|---|---|---|")
    for name, itemsize in (("float32", 4), ("bfloat16", 2)):
        sizes = decode_chain_bytes(itemsize)
        times = read_chain_seconds(sizes)
        rate = sum(sizes) / statistics.median(times)
        print(f"| {name} chain | {sum(sizes) / 1e6:.0f} MB | {statistics.median(times) * 1e3:.1f} | "
              f"{min(times) * 1e3:.1f} | {rate / 1e9:.1f} | {rate / copy:.0%} |", flush=True)
    whole = [sum(decode_chain_bytes(4))]
    times = read_chain_seconds(whole)
    rate = whole[0] / statistics.median(times)
    print(f"| one buffer, same bytes | {whole[0] / 1e6:.0f} MB | {statistics.median(times) * 1e3:.1f} | "
          f"{min(times) * 1e3:.1f} | {rate / 1e9:.1f} | {rate / copy:.0%} |")
    print(f"\nCopy bandwidth, 2 threads, after: {copy_bandwidth(2) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
