"""llama.cpp as the benchmark's peer: build `llama-server` / `llama-bench` once, write GGUFs, drive them.

The peer comes from the `llama-cpp-python` sdist's vendored llama.cpp (the package registry is the only
network this project may use), built with CMake once per version under
~/.cache/pallas-serve/llama.cpp-<version>/ (Release, native CPU, no curl/openssl, only the two targets).
GGUFs are written by that sdist's own `convert_hf_to_gguf.py` from a Hugging Face directory holding the
very float32 weights pallas-serve serves, so both engines run identical weights.

    python benchmarks/llama_cpp.py build     # build (or find) the binaries and print their paths
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("PALLAS_SERVE_CACHE", Path.home() / ".cache" / "pallas-serve"))
PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-bench")
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}


def _log(message: str) -> None:
    print(f"[llama.cpp] {message}", file=sys.stderr, flush=True)


def cached_build_dir() -> Path | None:
    """The newest finished build in the cache (one holding every target), or None."""
    builds = sorted(CACHE_ROOT.glob("llama.cpp-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for build in builds:
        if all((build / "bin" / t).exists() for t in TARGETS) and (build / "src").is_dir():
            return build
    return None


def download_sdist(dest: Path) -> Path:
    """`pip download` the sdist (no wheel: we need the vendored C++ sources and converter)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
                    "-d", str(dest), "--quiet"], check=True)
    return next(dest.glob("llama_cpp_python-*.tar.gz"))


def build(jobs: int = 2) -> Path:
    """Return a cache directory with bin/llama-server, bin/llama-bench and src/ (the vendored llama.cpp).

    Builds only when no finished build is cached: on 2 cores the two targets take several minutes.
    """
    found = cached_build_dir()
    if found is not None:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(Path(tmp))
        version = sdist.name.removeprefix("llama_cpp_python-").removesuffix(".tar.gz")
        out = CACHE_ROOT / f"llama.cpp-{version}"
        _log(f"building {TARGETS} from {sdist.name} into {out} (several minutes on 2 cores)")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        vendored = Path(tmp) / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shutil.copytree(vendored, out / "src")
    build_dir = out / "build"
    subprocess.run(["cmake", "-S", str(out / "src"), "-B", str(build_dir), "-G", "Ninja",
                    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    start = time.perf_counter()
    subprocess.run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TARGETS], check=True)
    _log(f"built in {time.perf_counter() - start:.0f} s")
    (out / "bin").mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, out / "bin" / target)
    shutil.rmtree(build_dir)
    return out


def write_gguf(build_dir: Path, model_dir: Path, dtype: str) -> Path:
    """`model_dir` (a Hugging Face directory) as a GGUF of `dtype`, written once by the sdist's converter
    (cached beside the build, keyed by the weights' size and mtime and the config)."""
    outtype = GGUF_TYPES[dtype]
    weights = sorted(model_dir.glob("*.safetensors"))
    stamp = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in weights)
    key = hashlib.sha256((stamp + (model_dir / "config.json").read_text()).encode()).hexdigest()[:12]
    out = build_dir / "gguf" / f"{model_dir.name}-{key}-{outtype}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    src = build_dir / "src"
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    partial = out.with_suffix(".partial")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
                    "--outfile", str(partial)], check=True, env=env, stdout=subprocess.DEVNULL)
    partial.rename(out)
    return out


def launch_server(build_dir: Path, gguf: Path, port: int, parallel: int, context: int,
                  threads: int) -> subprocess.Popen:
    """`llama-server` with `parallel` slots sharing one unified KV buffer of `context` tokens (so a
    single long prompt fits too), continuous batching (its default), no web UI."""
    command = [str(build_dir / "bin" / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(parallel), "-c", str(context), "--kv-unified", "-t", str(threads), "--no-webui"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    """Until `/health` answers 200 (503 while the model loads)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=10) as reply:
                if reply.status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"llama-server not ready after {timeout:.0f} s")


def completion_body(ids: list[int], output_len: int) -> dict:
    """llama-server's native `/completion`: a token-id prompt (no BOS added), greedy, no prompt reuse."""
    return {"prompt": ids, "n_predict": output_len, "ignore_eos": True, "temperature": 0, "stream": True,
            "cache_prompt": False}


def count_tokens(chunk: dict, so_far: int) -> int:
    """Tokens generated so far after one streamed `/completion` chunk (each carries its new token ids)."""
    return so_far + len(chunk.get("tokens") or [])


def prefill_rates(build_dir: Path, gguf: Path, lengths: list[int], threads: int) -> dict[int, float]:
    """`llama-bench -p L -n 0`: prompt tokens per second for each prompt length (one repetition)."""
    command = [str(build_dir / "bin" / "llama-bench"), "-m", str(gguf), "-p", ",".join(map(str, lengths)),
               "-n", "0", "-t", str(threads), "-r", "1", "-o", "json"]
    rows = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return {row["n_prompt"]: row["avg_ts"] for row in rows}


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit(__doc__)
    print(json.dumps({t: str(build() / "bin" / t) for t in TARGETS}))
