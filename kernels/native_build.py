"""Building and loading the native CPU kernels (`kernels/*/cpu_*.cc`) as XLA FFI targets, once per process.

Each source is compiled with the system's C++ compiler (`$CXX`, else `c++` / `g++` / `clang++`) against
the FFI headers jaxlib ships and `kernels/*.h`, with `-march=native`, into the user's cache directory
(`$PALLAS_SERVE_CACHE`, else `$XDG_CACHE_HOME/pallas-serve`, else `~/.cache/pallas-serve`), under a name
that hashes the source (and those headers), the flags, jaxlib's version, the compiler and this CPU, so an edit, an upgrade or
another machine sharing the home directory gets its own build. `load` says why a kernel is unavailable
(no compiler, not x86 / ARM Linux, a build error), or None once its targets are registered; callers fall
back to their jnp reference on that reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jaxlib

FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC"]

HEADERS_DIR = Path(__file__).resolve().parent  # kernels/: headers the kernels share

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_errors: dict[Path, str | None] = {}  # per source: why it is unavailable, None once registered


def cache_dir() -> Path:
    if os.environ.get("PALLAS_SERVE_CACHE"):
        return Path(os.environ["PALLAS_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pallas-serve"


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(source_path: Path, compiler: str) -> Path:
    # The kernel and the shared headers it may include (`native_vectors.h`): an edit to either rebuilds.
    source = b"\0".join(p.read_bytes() for p in [source_path, *sorted(HEADERS_DIR.glob("*.h"))])
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     compiler.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"{source_path.stem}-{key}.so"
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home, say: build per user under the temp directory instead
        library = Path(tempfile.gettempdir()) / f"pallas-serve-{os.getuid()}" / library.name
        if library.exists():
            return library
        library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        command = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(HEADERS_DIR), str(source_path),
                   "-o", str(built)]
        _log.info("Building the native CPU kernel %s into %s (once per machine and version)", source_path.name, library)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent builders each install a complete file
    return library


def load(source_path: Path, targets: dict[str, str]) -> str | None:
    """Build `source_path` and register its handler symbols as FFI targets (`{target name: symbol}`) on
    the CPU, once per process; returns why that is impossible here, or None."""
    with _lock:
        if source_path in _errors:
            return _errors[source_path]
        error = None
        compiler = _compiler()
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
            error = f"it is built for Linux on x86_64 / aarch64, not {platform.system()} {platform.machine()}"
        elif compiler is None:
            error = "no C++ compiler was found (set CXX, or install g++)"
        else:
            try:
                library = ctypes.cdll.LoadLibrary(str(_build(source_path, compiler)))
                for target, symbol in targets.items():
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
                error = f"it did not build or load: {exc}"
        _errors[source_path] = error
        return error
