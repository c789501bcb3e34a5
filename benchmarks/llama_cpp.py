"""llama.cpp as the benchmark's peer: build `llama-server` / `llama-bench` once, write GGUFs, drive them.

The peer comes from the `llama-cpp-python` sdist's vendored llama.cpp (the package registry is the only
network this project may use), built with CMake once per version under
~/.cache/pallas-serve/llama.cpp-<version>/ (Release, native CPU, no curl/openssl, only the two targets).
GGUFs are written by that sdist's own `convert_hf_to_gguf.py` from a Hugging Face directory holding the
very float32 weights pallas-serve serves, so both engines run identical weights.

    python benchmarks/llama_cpp.py build     # build (or find) the binaries and print their paths
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
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


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit(__doc__)
    print(json.dumps({t: str(build() / "bin" / t) for t in TARGETS}))
