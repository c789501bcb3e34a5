"""Compiled step executables kept on disk, so a restart loads them instead of tracing and lowering again.

JAX's persistent compilation cache skips XLA's compile on a second start, but its key is the lowered
module, so every start still traces and lowers each bucket's step, its KV write and its resampler: on
the default model that was most of a warm restart (docs/performance.md, "Restart to ready"). Here an
executable is keyed by what its lowering depends on instead (this checkout's model / kernel / serving
sources, jax and jaxlib, the device and CPU features, XLA_FLAGS, the model config, the runtime config
and the shapes, dtypes and shardings of the arguments) and serialized with
`jax.experimental.serialize_executable`. A key that changes with any of those simply misses; an entry
that fails to load (a truncated file, a native kernel not registered) is compiled afresh and rewritten.
Native kernels must be registered before `prepare` runs (the attention backend registers when it is
resolved in `ModelRunner.__init__`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Everything a step's lowering can read: the model, the kernels (and their native sources), the serving code.
SOURCE_DIRS = ("model", "kernels", "serving", "checkpoints")
SOURCE_SUFFIXES = (".py", ".cc", ".h")
_OWN_JAX_CACHE_KEY = {"xla_embed_ir_in_executable": False}  # XLA's default: changes the key, not the code


@functools.cache
def source_digest(root: Path = REPO, dirs: tuple[str, ...] = SOURCE_DIRS) -> str:
    """sha256 over the sources under `dirs` (names and bytes); a few ms for this repository."""
    digest = hashlib.sha256()
    files = sorted(p for d in dirs for p in (root / d).rglob("*") if p.suffix in SOURCE_SUFFIXES)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def environment_digest() -> str:
    """The toolchain and machine an executable is only valid for (an AVX-512 build must not load on AVX2)."""
    device = jax.devices()[0]
    try:
        cpu_flags = sorted({line for line in Path("/proc/cpuinfo").read_text().splitlines()
                            if line.startswith(("flags", "Features", "model name"))})
    except OSError:
        cpu_flags = [platform.processor()]
    parts = [jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
             device.client.platform_version, os.environ.get("XLA_FLAGS", ""), platform.machine(), *cpu_flags]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _describe(args: tuple) -> str:
    """Shapes, dtypes and shardings of every array in `args`, and the pytree structure around them."""
    leaves, treedef = jax.tree.flatten(args)
    return repr(treedef) + "".join(
        f"|{getattr(x, 'shape', ())}:{getattr(x, 'dtype', type(x).__name__)}:{getattr(x, 'sharding', '')}"
        for x in leaves)


def shape_key(args: tuple) -> tuple:
    """The per-call lookup key: the shapes of the array leaves (None leaves count, by their absence)."""
    return tuple(getattr(x, "shape", None) for x in jax.tree.leaves(args))


class ExecutableCache:
    """A directory of serialized executables for one model and runtime configuration (`context`)."""

    def __init__(self, directory: str | os.PathLike | None, context: str, device: Any = None):
        """`device`: the one device the executables run on (default the first); in the key, and where a
        loaded executable runs (deserialized without it, an executable expects every device of the host)."""
        self.directory = None if directory is None else Path(directory)
        self.device = jax.devices()[0] if device is None else device
        self._context = hashlib.sha256(
            "\n".join([source_digest(), environment_digest(), context, str(self.device)]).encode()).hexdigest()
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the counters, and one compile at a time (`load_or_compile`)
        self._here = threading.local()  # misses of the calling thread (`misses_here`)

    def misses_here(self) -> int:
        """Executables compiled (not loaded) so far by the calling thread: `precompile` loads on several."""
        return getattr(self._here, "misses", 0)

    def path_for(self, name: str, args: tuple) -> Path | None:
        if self.directory is None:
            return None
        key = hashlib.sha256(f"{self._context}\n{name}\n{_describe(args)}".encode()).hexdigest()[:32]
        return self.directory / f"{name}-{key}.executable"

    def load_or_compile(self, name: str, jitted: Any, args: tuple) -> jax.stages.Compiled:
        """`jitted`'s executable for `args` (arrays or `jax.ShapeDtypeStruct`s), from disk when cached.
        Thread-safe: loads run side by side (XLA deserializes without the GIL), compiles one at a time."""
        path = self.path_for(name, args)
        found = path is not None and path.exists()
        compiled = self._load(name, path) if found else None
        with self._lock:
            if not found and path is not None and path.exists():
                compiled = self._load(name, path)  # another thread compiled it while this one looked
            if compiled is not None:
                self.hits += 1
                return compiled
            self.misses += 1
            self._here.misses = self.misses_here() + 1
            return self._compile(name, jitted, args, path)

    def _load(self, name: str, path: Path) -> jax.stages.Compiled | None:
        """The executable in `path`, or None (with a warning) when it does not load: then it is recompiled."""
        try:
            return _deserialize(path.read_bytes(), self.device)
        except Exception as exc:  # any unreadable entry is recompiled and replaced
            logger.warning("recompiling %s: its cached executable %s did not load (%s)", name, path.name, exc)
            return None

    def _compile(self, name: str, jitted: Any, args: tuple, path: Path | None) -> jax.stages.Compiled:
        if path is None:
            return jitted.lower(*args).compile()
        # XLA:CPU executables loaded from JAX's persistent compilation cache do not survive being serialized
        # again, nor sharing a process with ones compiled or deserialized here ("Function ... not found" when
        # run). So these compiles never touch that cache: a compiler option at XLA's default value gives them
        # keys of their own there, and nothing is written under those keys (minimum compile time: never).
        minimum = jax.config.jax_persistent_cache_min_compile_time_secs
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
        try:
            compiled = jitted.lower(*args).compile(compiler_options=_OWN_JAX_CACHE_KEY)
        finally:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except (ValueError, NotImplementedError) as exc:  # a step that cannot be serialized runs as compiled
            logger.warning("not caching %s: %s", name, exc)
            return compiled
        self._store(path, blob)
        return compiled

    @staticmethod
    def _store(path: Path, blob: bytes) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
                tmp.write(blob)
            os.replace(tmp.name, path)  # atomic: two servers starting at once each write a whole file
        except OSError as exc:  # a read-only cache directory: this start still runs
            logger.warning("not caching %s: %s", path.name, exc)


def _deserialize(blob: bytes, device: Any) -> jax.stages.Compiled:
    payload, in_tree, out_tree = pickle.loads(blob)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=[device])


class PreparedFunction:
    """A jitted function whose executables for some argument shapes were prepared (loaded or compiled)
    ahead of time; a call with those shapes runs the executable directly (no tracing, same dispatch
    cost as the jit), any other call goes to the jit as before."""

    def __init__(self, name: str, jitted: Any, cache: ExecutableCache, skip: int = 0):
        self.name = name
        self.jitted = jitted
        self._cache = cache
        self._skip = skip  # leading arguments fixed for the server's life (the params): not in the lookup key
        self._executables: dict[tuple, Callable] = {}

    def prepare(self, *args: Any) -> jax.stages.Compiled:
        compiled = self._cache.load_or_compile(self.name, self.jitted, args)
        self._executables[shape_key(args[self._skip:])] = compiled
        return compiled

    def __call__(self, *args: Any) -> Any:
        executable = self._executables.get(shape_key(args[self._skip:]))
        if executable is not None:
            try:
                return executable(*args)
            except TypeError:  # same shapes, other dtypes or weak types: refused before it ran; the jit takes it
                pass
        return self.jitted(*args)

    def lower(self, *args: Any) -> Any:
        return self.jitted.lower(*args)
