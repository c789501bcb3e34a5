"""Soak run: mixed traffic with aborts, disconnects and bad input against one server for a long time.

    python benchmarks/soak.py                       # default model, 20 minutes, 8 clients
    python benchmarks/soak.py --minutes 5 --clients 16 --model-path /path/to/checkpoint

Each client loops over a weighted mix: plain greedy generations (random prompt and output lengths),
streamed ones, streams the client abandons after a few chunks, requests aborted through /abort_request,
and malformed bodies. It reports requests served and errors by kind, the p50/p99 latency of plain
requests in the first and the last quarter of the run (drift), the server's resident memory at the start,
every minute and at the end, and the KV page accounting once the traffic stops (every page free or
evictable, none locked). Anything unexpected (a 5xx, a timeout, a dropped connection, a stream without
its end) is an error. The report is printed and written to docs/soak.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serving.utils import _children_of, launch_server_cmd, terminate_process, wait_for_server  # noqa: E402

MIX = {"plain": 5, "stream": 2, "abandon": 1, "abort": 1, "bad": 1}
BAD_BODIES = [b"{", b"[]", b'{"text": 5}', b'{"input_ids": [-1]}', b'{"text": "x", "sampling_params": {"top_p": 7}}',
              b'{"text": "x", "sampling_params": {"max_new_tokens": -3}}', b"\xff\xfe", b'{"rid": []}',
              b'{"input_ids": [[1], 2]}', b'{"text": "", "sampling_params": {"temperature": "hot"}}']


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children (VmRSS), in MiB."""
    total = 0
    for p in [pid, *_children_of(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (FileNotFoundError, StopIteration):
            pass
    return total / 1024


class Client(threading.Thread):
    def __init__(self, url: str, vocab: int, deadline: float, seed: int, record):
        super().__init__(daemon=True)
        self.url, self.vocab, self.deadline, self.record = url, vocab, deadline, record
        self.rng = random.Random(seed)
        self.session = requests.Session()

    def body(self, stream: bool, rid: str | None = None) -> dict:
        ids = [self.rng.randrange(100, self.vocab - 100) for _ in range(self.rng.randint(8, 256))]
        body = {"input_ids": ids, "stream": stream, "sampling_params": {
            "temperature": 0, "max_new_tokens": self.rng.randint(8, 64), "ignore_eos": True}}
        return body if rid is None else {**body, "rid": rid}

    def run(self) -> None:
        kinds, weights = zip(*MIX.items(), strict=True)
        while time.monotonic() < self.deadline:
            kind = self.rng.choices(kinds, weights)[0]
            start = time.monotonic()
            try:
                outcome = getattr(self, kind)()
            except requests.RequestException as exc:
                outcome = f"error: {type(exc).__name__}"
            self.record(kind, outcome, start, time.monotonic() - start)

    def plain(self) -> str:
        r = self.session.post(self.url + "/generate", json=self.body(False), timeout=600)
        if r.status_code != 200:
            return f"error: HTTP {r.status_code}"
        return "ok" if r.json()["meta_info"]["finish_reason"]["type"] == "length" else "error: not finished"

    def _events(self, response, limit: int | None = None) -> list[str]:
        events = []
        for line in (raw.decode("utf-8") for raw in response.iter_lines()):  # SSE lines end at CR/LF only
            if line:
                events.append(line[len("data: "):])
                if limit is not None and len(events) >= limit:
                    break
        return events

    def stream(self) -> str:
        with self.session.post(self.url + "/generate", json=self.body(True), stream=True, timeout=600) as r:
            events = self._events(r)
        if r.status_code != 200 or not events or events[-1] != "[DONE]":
            return f"error: stream without its end (HTTP {r.status_code})"
        return "ok" if json.loads(events[-2])["meta_info"]["finish_reason"]["type"] == "length" else "error: bad end"

    def abandon(self) -> str:
        with requests.post(self.url + "/generate", json=self.body(True), stream=True, timeout=600) as r:
            self._events(r, limit=self.rng.randint(1, 4))
        return "ok"  # closing the connection mid-stream must abort the request in the engine

    def abort(self) -> str:
        rid = uuid.uuid4().hex
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", requests.post(
            self.url + "/generate", json=self.body(False, rid), timeout=600)))
        worker.start()
        time.sleep(self.rng.uniform(0.0, 0.5))
        self.session.post(self.url + "/abort_request", json={"rid": rid}, timeout=60)
        worker.join()
        r = result.get("r")
        if r is None or r.status_code != 200:
            return f"error: HTTP {None if r is None else r.status_code}"
        return "ok"  # aborted, or finished before the abort arrived: both are answers

    def bad(self) -> str:
        r = self.session.post(self.url + "/generate", data=self.rng.choice(BAD_BODIES),
                              headers={"content-type": "application/json"}, timeout=60)
        return "ok" if 400 <= r.status_code < 500 else f"error: HTTP {r.status_code} for a bad body"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server-args", default="--max-running-requests 16 --max-total-tokens 4096")
    parser.add_argument("--output", default=str(REPO / "docs" / "soak.md"))
    args = parser.parse_args()
    if args.model_path is None:
        from checkpoints.default import default_model_dir

        args.model_path = str(default_model_dir())
    vocab = json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"]
    process, port = launch_server_cmd(f"{sys.executable} -m serving.main --model-path {args.model_path} "
                                      f"--log-level warning {args.server_args}", host="127.0.0.1")
    url = f"http://127.0.0.1:{port}"
    lock = threading.Lock()
    records: list[tuple[str, str, float, float]] = []

    def record(kind: str, outcome: str, start: float, seconds: float) -> None:
        with lock:
            records.append((kind, outcome, start, seconds))

    try:
        wait_for_server(url, timeout=1800, settle_seconds=0, process=process)
        start = time.monotonic()
        memory = [(0.0, rss_mib(process.pid))]
        deadline = start + args.minutes * 60
        clients = [Client(url, vocab, deadline, seed, record) for seed in range(args.clients)]
        for client in clients:
            client.start()
        while any(c.is_alive() for c in clients):  # a sample a minute, and one when the last client is done
            time.sleep(0.5)
            now = time.monotonic() - start
            if now - memory[-1][0] >= 60 or not any(c.is_alive() for c in clients):
                memory.append((now, rss_mib(process.pid)))
        settle = time.monotonic() + 60
        while requests.get(url + "/get_load", timeout=60).json()[0]["num_reqs"] and time.monotonic() < settle:
            time.sleep(0.5)
        pages = requests.get(url + "/get_server_info", timeout=60).json()["internal_states"][0]["kv_pages"]
        healthy = requests.get(url + "/health_generate", timeout=60).status_code
    finally:
        terminate_process(process)

    elapsed = max(r[2] + r[3] for r in records) - start if records else 0.0
    outcomes = Counter((kind, outcome) for kind, outcome, _, _ in records)
    plain = [(s - start, d) for kind, outcome, s, d in records if kind == "plain" and outcome == "ok"]
    quarter = elapsed / 4

    def pct(window: list[float], q: float) -> str:
        return f"{np.percentile(window, q):.2f}" if window else "-"

    first = [d for s, d in plain if s < quarter]
    last = [d for s, d in plain if s >= 3 * quarter]
    lines = [
        "# Soak run", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} with {os.cpu_count()} CPU threads: "
        f"model `{Path(args.model_path).name}`, {args.clients} clients for {elapsed / 60:.1f} minutes, "
        f"server flags `{args.server_args}`.", "",
        f"Command: `python benchmarks/soak.py {' '.join(sys.argv[1:])}`".rstrip(), "",
        "| kind | outcome | requests |", "|---|---|---|",
        *[f"| {kind} | {outcome} | {n} |" for (kind, outcome), n in sorted(outcomes.items())], "",
        f"Requests: {len(records)} ({len(records) / max(elapsed, 1e-9):.1f}/s); errors: "
        f"{sum(n for (_, o), n in outcomes.items() if o != 'ok')}.", "",
        "| plain-request latency (s) | p50 | p99 | requests |", "|---|---|---|---|",
        f"| first quarter | {pct(first, 50)} | {pct(first, 99)} | {len(first)} |",
        f"| last quarter | {pct(last, 50)} | {pct(last, 99)} | {len(last)} |", "",
        "Resident memory of the server (MiB): " + ", ".join(f"{t / 60:.0f} min {m:.0f}" for t, m in memory) + ".", "",
        f"After the traffic: KV pages {pages}; /health_generate {healthy}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
