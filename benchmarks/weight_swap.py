"""Weight swap timings on the real server: /update_weights_from_disk from safetensors and from Orbax,
and a release + resume of all device memory, for the default model (SmolLM2-135M) or any --model-path.

    python benchmarks/weight_swap.py                 # default model, 3 repeats
    python benchmarks/weight_swap.py --model-path /models/llama --repeats 5

The Orbax copy is written once with `python -m checkpoints.convert` into a temporary directory. Each
timing is the HTTP round trip of one call on an idle server (read + place on device + swap between
steps + cache flush). Greedy output is checked unchanged after every call (the same weights go back
in). Not a test: print and paste.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoints.convert import convert  # noqa: E402
from checkpoints.resolve import resolve_model_dir  # noqa: E402
from serving.utils import launch_server_cmd, terminate_process, wait_for_server  # noqa: E402

PROBE = {"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}


def timed_post(url: str, path: str, body: dict) -> float:
    start = time.perf_counter()
    response = requests.post(url + path, json=body, timeout=1800)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"{path} answered {response.status_code}: {response.text}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model_path)
    with tempfile.TemporaryDirectory(prefix="weight-swap-") as scratch:
        orbax_dir = Path(scratch) / "orbax"
        start = time.perf_counter()
        convert(str(model_dir), "orbax", orbax_dir)
        convert_seconds = time.perf_counter() - start
        command = (f"{sys.executable} -m serving.main --model-path {model_dir} --host 127.0.0.1 --log-level warning "
                   "--max-running-requests 4 --max-total-tokens 4096")
        process, port = launch_server_cmd(command, host="127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, timeout=1800, settle_seconds=0, process=process)
            while requests.get(url + "/health_generate", timeout=600).status_code != 200:
                time.sleep(1)
            reference = requests.post(url + "/generate", json=PROBE, timeout=600).json()["output_ids"]
            rows = {"update from safetensors": [], "update from Orbax": [], "release + resume (all tags)": []}
            for _ in range(args.repeats):
                rows["update from safetensors"].append(timed_post(url, "/update_weights_from_disk", {
                    "model_path": str(model_dir), "load_format": "auto"}))
                rows["update from Orbax"].append(timed_post(url, "/update_weights_from_disk", {
                    "model_path": str(orbax_dir), "load_format": "auto"}))
                rows["release + resume (all tags)"].append(
                    timed_post(url, "/release_memory_occupation", {}) + timed_post(url, "/resume_memory_occupation", {}))
                output = requests.post(url + "/generate", json=PROBE, timeout=600).json()["output_ids"]
                assert output == reference, (output, reference)
            info = requests.get(url + "/get_server_info", timeout=60).json()["internal_states"][0]["memory_usage"]
        finally:
            terminate_process(process)
    print(f"\nmodel: {model_dir} ({info['weight'] * 2**30 / 1e6:.0f} MB of weights on device)")
    print(f"convert to Orbax (once): {convert_seconds:.2f} s")
    print(f"{'operation':<30} {'min s':>8} {'median s':>9}   ({args.repeats} repeats, greedy output unchanged)")
    for name, seconds in rows.items():
        print(f"{name:<30} {min(seconds):>8.2f} {statistics.median(seconds):>9.2f}")


if __name__ == "__main__":
    main()
