"""Shared fixtures: tiny random checkpoints generated with transformers, and a server launcher.

Nothing is downloaded: tokenizers are trained here on a few sentences, weights are random.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from checkpoints import tiny
from checkpoints.tiny import CORPUS, write_tokenizer  # noqa: F401  (tests import them from here)

REPO = Path(__file__).resolve().parents[1]
# The tiny checkpoints' weights: fresh each run, shown in pytest's header; set CHECKPOINT_SEED to replay.
CHECKPOINT_SEED = int(os.environ.get("CHECKPOINT_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"CHECKPOINT_SEED={CHECKPOINT_SEED} (tiny checkpoints' random weights; set it to replay a run)"


def pytest_terminal_summary(terminalreporter):
    # Again at the end: `pytest -q` (what `make test` runs) shows no header, and a failure needs the seed.
    terminalreporter.write_line(f"CHECKPOINT_SEED={CHECKPOINT_SEED} (set it to replay this run's checkpoints)")


def make_tiny_checkpoint(out: Path, arch: str = "llama", **overrides) -> Path:
    """`checkpoints.tiny.make_tiny_checkpoint` with this run's CHECKPOINT_SEED (fresh each run, printed)."""
    return tiny.make_tiny_checkpoint(out, arch, seed=CHECKPOINT_SEED, **overrides)


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a busy 2-core machine two torch threads stall on each other: greedy generation measured
    1.6-3.7 s with one thread and 19-22 s with two."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir, one_torch_thread):
    """transformers' model of `tiny_llama_dir` (float32, eval): the reference the server tests compare with."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def replayable_seed(env_var: str) -> int:
    """A fresh random seed each run, or `$env_var` to replay one; printed so a failure shows it."""
    seed = int(os.environ.get(env_var, int.from_bytes(os.urandom(4), "little")))
    print(f"{env_var}={seed}")
    return seed


def sse_lines(response):
    """The lines of a streamed response, decoded. Not `iter_lines(decode_unicode=True)`: that splits with
    `str.splitlines`, which also breaks at U+0085, U+2028 and U+2029, and random-weight models emit those
    inside the JSON text (which leaves them unescaped, as SGLang's does). SSE lines end only at CR/LF."""
    for line in response.iter_lines():
        yield line.decode("utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving.main` on 127.0.0.1, waited on until /health_generate answers 200."""

    def __init__(self, model_path: Path | str | None, *extra: str, timeout: float = 600.0,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serving.main", "--port", str(self.port), "--log-level", "warning"]
        if model_path is not None:
            cmd += ["--model-path", str(model_path)]
        cmd += list(extra)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pallas-serve-test-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout} s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def post(self, path: str, **kwargs):
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 300), **kwargs)

    def get(self, path: str, **kwargs):
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def tpu_abstract_mesh():
    """Mosaic's lowering asks the device kind: name a TPU v5e (there is none here). This goes through
    private jax API (0.10); a jax that moved it skips the TPU half of the lowering tests."""
    try:
        import jax
        from jax._src import mesh as mesh_lib

        device = mesh_lib.AbstractDevice("TPU v5 lite", 1, "tpu")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"cannot name an abstract TPU device in this jax: {exc}")
