"""The machine's copy bandwidth with N threads: the ceiling a weight-streaming decode step can reach.

    python benchmarks/copy_bandwidth.py --threads 2

Each thread copies its share of a buffer much larger than the caches with `np.copyto` (which releases
the GIL); the figure is bytes copied per second (each byte read once and written once), the median of
`--repeats` copies. A single decode stream reads every weight once per token, so its tokens/s ceiling
is this bandwidth over the weights' bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def copy_bandwidth(threads: int = 2, megabytes: int = 512, repeats: int = 7) -> float:
    """Median bytes/s copied by `threads` threads over a `megabytes` buffer."""
    src = np.ones(megabytes << 20, np.uint8)
    dst = np.zeros_like(src)  # written once first: page faults are not part of the figure
    bounds = np.linspace(0, len(src), threads + 1).astype(int)
    parts = [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    times = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(lambda part: np.copyto(*part), parts))
            times.append(time.perf_counter() - start)
    return len(src) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--megabytes", type=int, default=512)
    args = parser.parse_args()
    print(f"{copy_bandwidth(args.threads, args.megabytes) / 1e9:.1f} GB/s with {args.threads} threads")


if __name__ == "__main__":
    main()
