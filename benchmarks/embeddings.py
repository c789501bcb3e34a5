"""Embedding benchmark: our HTTP server (`--is-embedding`, /v1/embeddings) against transformers, same run.

    python benchmarks/embeddings.py                          # default model, float32, 256 x 64 tokens
    python benchmarks/embeddings.py --batch-sizes 1 8 32 --num-texts 512 --input-len 128

For each batch size B it sends the texts (random token ids) as `/v1/embeddings` requests of B inputs,
one request at a time, and reports embeddings per second; the baseline runs transformers' base model on
the same token ids in batches of B (last token's final hidden state, L2-normalised: what the server
returns), and the table also shows the worst cosine between the two. Not a test: print and paste.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.utils import launch_server_cmd, terminate_process, wait_for_server  # noqa: E402


def run_server(url: str, texts: list[list[int]], batch: int) -> tuple[float, np.ndarray]:
    vectors = []
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        response = requests.post(url + "/v1/embeddings", json={"input": texts[i:i + batch]}, timeout=600)
        response.raise_for_status()
        vectors += [d["embedding"] for d in response.json()["data"]]
    return len(texts) / (time.perf_counter() - start), np.asarray(vectors)


def run_transformers(model_path: str, texts: list[list[int]], batch: int, dtype: str) -> tuple[float, np.ndarray]:
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    vectors = []
    with torch.no_grad():
        model(torch.tensor(texts[:batch]))  # warm-up
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            last = model(torch.tensor(texts[i:i + batch])).last_hidden_state[:, -1].float()
            vectors.append(torch.nn.functional.normalize(last, dim=-1).numpy())
        elapsed = time.perf_counter() - start
    return len(texts) / elapsed, np.concatenate(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the bundled default model")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-texts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--server-args", default="", help="extra flags for python -m serving.main")
    args = parser.parse_args()

    if args.model_path is None:
        from checkpoints.default import default_model_dir

        args.model_path = str(default_model_dir())
    config = json.loads((Path(args.model_path) / "config.json").read_text())
    rng = np.random.default_rng(0)
    texts = [rng.integers(100, config["vocab_size"] - 100, args.input_len).tolist() for _ in range(args.num_texts)]
    largest = max(args.batch_sizes)
    # One step holds the largest batch whole (a pooled prompt runs in one step).
    command = (f"{sys.executable} -m serving.main --model-path {args.model_path} --dtype {args.dtype} --is-embedding "
               f"--log-level warning --max-running-requests {largest} "
               f"--chunked-prefill-size {largest * args.input_len} {args.server_args}")
    process, port = launch_server_cmd(command, host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    ours = {}
    try:
        wait_for_server(url, timeout=1800, settle_seconds=0, process=process)
        for batch in args.batch_sizes:
            run_server(url, texts[:batch], batch)  # warm-up
            ours[batch] = run_server(url, texts, batch)
            print(f"pallas-serve batch {batch}: {ours[batch][0]:.1f} embeddings/s", flush=True)
    finally:
        terminate_process(process)

    rows = ["| batch | texts x tokens | pallas-serve emb/s | transformers emb/s | speed-up | min cosine |",
            "|---|---|---|---|---|---|"]
    for batch in args.batch_sizes:
        rate, vectors = ours[batch]
        base, base_vectors = run_transformers(args.model_path, texts, batch, args.dtype)
        cos = float(np.min(np.sum(vectors * base_vectors, axis=1)))
        rows.append(f"| {batch} | {args.num_texts} x {args.input_len} | {rate:.1f} | {base:.1f} | "
                    f"{rate / base:.2f}x | {cos:.6f} |")
    print(f"\nModel {args.model_path}, {args.dtype}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
