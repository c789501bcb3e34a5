"""Restart to ready: `python -m serving.main` (default model) until /health_generate answers 200.

    python benchmarks/restart.py --repeat 5          # warm caches: the figure docs/performance.md shows

Each run starts a fresh server process on the current interpreter and times the wall clock from the
spawn to the first 200 from /health_generate (a real one-token generation), then stops it. With
`--log` the server's own INFO lines (timestamped phases of the start) are printed for the last run.
"""

from __future__ import annotations

import argparse
import http.client
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.utils import reserve_port, terminate_process  # noqa: E402


def time_to_ready(server_args: str = "", timeout: float = 600.0, log: bool = False) -> float:
    """Seconds from spawning `python -m serving.main` to the first 200 from /health_generate (with `log`,
    also the server's CPU seconds, start to stop: on a shared machine wall time also counts waiting)."""
    # The reservation stays bound until the end: while the server is not listening yet, a poll could
    # otherwise get that port as its own source port and talk to itself.
    port, lock = reserve_port("127.0.0.1")
    command = [sys.executable, "-m", "serving.main", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "info" if log else "warning", *server_args.split()]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE if log else subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before it was ready")
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"server not ready after {timeout:.0f} s")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=60) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
    finally:
        terminate_process(process)
        lock.close()
        if log and process.stdout is not None:
            cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            spawned = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.perf_counter() - start)))
            print(f"spawned at {spawned}; the server's CPU seconds, start to stop: user "
                  f"{cpu.ru_utime - before.ru_utime:.1f}, system {cpu.ru_stime - before.ru_stime:.1f}\n"
                  f"{process.stdout.read()}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving.main")
    parser.add_argument("--log", action="store_true", help="print the last run's server log (timestamped phases)")
    args = parser.parse_args(argv)
    times = [time_to_ready(args.server_args, log=args.log and i == args.repeat - 1) for i in range(args.repeat)]
    print(" ".join(f"{t:.2f}" for t in times), f"median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    main()
