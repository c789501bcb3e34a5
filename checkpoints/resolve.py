"""--model-path -> a local model: a Hugging Face directory, a GGUF file, a hub id, or an Orbax checkpoint.

Nothing here touches the network. A hub id is looked up in the local Hugging Face cache only, so a
server starts (or fails fast) the same way offline as online.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MODEL_KINDS = ("hf", "orbax")
# What --load-format can name: the formats this resolver tells apart. "safetensors": a Hugging Face
# directory (local or a hub id in the cache) read by checkpoints.safetensors; "gguf": a .gguf file,
# converted once into such a directory; "orbax": an Orbax checkpoint directory with config.json beside
# (checkpoints.orbax_io).
LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax")
# Files orbax writes into every checkpoint it saves (StandardCheckpointer, PyTreeCheckpointer, and
# each step of a CheckpointManager).
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_HUB_ID = re.compile(r"[\w.-]+(?:/[\w.-]+)?")


@dataclass(frozen=True)
class ResolvedModel:
    """A local model directory: `kind` "hf" has config.json and weights, "orbax" a saved param pytree."""

    path: Path
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")


class ModelNotFoundError(ValueError):
    """--model-path names nothing usable. The text is SGLang's, which its clients match exactly."""

    def __init__(self, model_path: str) -> None:
        super().__init__(f"{model_path} (repository not found)")


class RevisionNotFoundError(ValueError):
    """--revision names no snapshot of the hub id in the local cache."""


def cache_dir() -> Path:
    """pallas-serve's directory in the user's cache (converted models live here)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pallas-serve"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment on every call (huggingface_hub's own
    constant is frozen at import, which would ignore a later HF_HOME / HF_HUB_CACHE)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg_cache) / "huggingface").expanduser() / "hub"


def check_load_format(model_path: str | os.PathLike | None, load_format: str) -> None:
    """Raise ValueError unless `model_path` can be read as `load_format` (judged from the path's
    spelling alone, so it runs before anything is read). None, the bundled default model, fits every
    format: it ships as GGUF and is loaded from the safetensors directory converted from it."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got {load_format!r}.")
    if model_path is None:
        return  # the bundled default model: shipped as GGUF, loaded from its converted safetensors
    text = os.fspath(model_path)
    is_gguf = text.lower().endswith(".gguf")
    if load_format == "gguf" and not is_gguf:
        raise ValueError(f"--load-format gguf needs a .gguf file as --model-path, got {text!r}.")
    if load_format in ("safetensors", "orbax") and is_gguf:
        wanted = "a Hugging Face directory or hub id" if load_format == "safetensors" else "an Orbax checkpoint directory"
        raise ValueError(f"--load-format {load_format} needs {wanted} as --model-path, "
                         f"got the GGUF file {text!r} (use --load-format auto or gguf).")


def resolve_model_path(model_path: str | os.PathLike, *, load_format: str = "auto",
                       revision: str | None = None) -> ResolvedModel:
    """Resolve --model-path: a local directory, a `.gguf` file (converted once, cached), or a hub id
    found in the local Hugging Face cache (matched case-insensitively, as the hub does).

    `load_format` must fit the path (`check_load_format`). `revision` (a branch, tag or commit) picks
    a hub id's snapshot from the cache: `refs/{revision}`, or `snapshots/{revision}` for a commit;
    None means `refs/main` (else the newest complete snapshot). Local paths ignore it, as
    transformers does.
    """
    text = os.fspath(model_path)
    check_load_format(text, load_format)
    local = Path(text).expanduser()
    if local.is_dir():
        if is_orbax_checkpoint(local):
            return ResolvedModel(local.absolute(), "orbax")
        if (local / "config.json").is_file():
            return ResolvedModel(local.absolute(), "hf")
        raise ModelNotFoundError(text)
    if local.is_file() and local.suffix.lower() == ".gguf":
        return ResolvedModel(_converted_gguf_dir(local), "hf")
    snapshot = _hub_cache_snapshot(text, revision) if _HUB_ID.fullmatch(text) else None
    if snapshot is None:
        raise ModelNotFoundError(text)
    return ResolvedModel(snapshot, "hf")


def is_orbax_checkpoint(directory: Path) -> bool:
    """Whether `directory` is an Orbax checkpoint (or a CheckpointManager root of them)."""
    # Checked before config.json: an Orbax save keeps config.json beside it for the architecture.
    if not directory.is_dir():
        return False
    if any((directory / marker).exists() for marker in _ORBAX_MARKERS):
        return True
    # A CheckpointManager root holds one directory per saved step.
    return any((child / "_CHECKPOINT_METADATA").is_file() for child in directory.iterdir() if child.is_dir())


def _converted_gguf_dir(gguf_path: Path) -> Path:
    """The Hugging Face directory for a GGUF file, converted on first use. The cache key covers the
    file's path, size and modification time, so an edited file is converted again."""
    # Imported here: it pulls in gguf and tokenizers, which resolving a directory does not need.
    from checkpoints.gguf import convert_gguf_to_hf_dir, is_converted_dir

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if is_converted_dir(target):
        return target
    if target.exists():
        # Conversions appear by atomic rename, so an incomplete directory was damaged by hand.
        shutil.rmtree(target)
    source = {"gguf": str(gguf_path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return convert_gguf_to_hf_dir(gguf_path, target, source=source)


def _hub_cache_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot directory of `repo_id` in the local hub cache, or None when the repo is not there.

    The cache keeps one folder per repo, `models--{owner}--{name}`, spelled as the id was first
    downloaded; hub ids are case-insensitive, so an exact spelling wins and any other casing is
    accepted. A `revision` the cached repo lacks is a RevisionNotFoundError.
    """
    cache = hub_cache_dir()
    if not cache.is_dir():
        return None
    wanted = "models--" + repo_id.replace("/", "--")
    exact = cache / wanted
    candidates = [exact] if exact.is_dir() else []
    candidates += sorted(c for c in cache.iterdir() if c.name.lower() == wanted.lower() and c != exact)
    for repo_dir in candidates:
        snapshot = _snapshot_with_config(repo_dir) if revision is None else _revision_snapshot(repo_dir, revision)
        if snapshot is not None:
            return snapshot
    if revision is not None and candidates:
        raise RevisionNotFoundError(
            f"{repo_id}: revision {revision!r} is not in the local Hugging Face cache ({candidates[0]})"
        )
    return None


def _revision_snapshot(repo_dir: Path, revision: str) -> Path | None:
    """`refs/{revision}` (a branch or tag, e.g. "main" or "v1.0") or a commit `snapshots/{revision}`."""
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    if "/" in commit or commit in ("", ".", ".."):
        return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


def _snapshot_with_config(repo_dir: Path) -> Path | None:
    """The snapshot refs/main points at, else the newest snapshot that has a config.json."""
    snapshots = repo_dir / "snapshots"
    main_ref = repo_dir / "refs" / "main"
    if main_ref.is_file():
        pinned = snapshots / main_ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    if not snapshots.is_dir():
        return None
    complete = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
    return max(complete, key=lambda s: s.stat().st_mtime) if complete else None


def resolve_model_dir(model_path: str | None, *, revision: str | None = None, load_format: str = "auto") -> Path:
    """`--model-path` (with `--revision` / `--load-format`) -> a model directory with a config.json: a
    Hugging Face directory, or an Orbax checkpoint with the config beside it; None = the bundled default
    model. A `load_format` naming the other kind of directory is a ValueError."""
    if model_path is None:
        from checkpoints.default import default_model_dir

        return default_model_dir()
    resolved = resolve_model_path(model_path, load_format=load_format, revision=revision)
    if resolved.kind == "orbax" and not (resolved.path / "config.json").is_file():
        raise ValueError(f"{model_path}: an Orbax checkpoint needs the model's config.json beside it (write one with "
                         "`python -m checkpoints.convert SRC --to orbax DST`)")
    if load_format == "orbax" and resolved.kind != "orbax":
        raise ValueError(f"--load-format orbax needs an Orbax checkpoint directory, got {model_path!r}")
    if load_format == "safetensors" and resolved.kind != "hf":
        raise ValueError(f"--load-format safetensors needs a Hugging Face directory, got the Orbax checkpoint "
                         f"{model_path!r}")
    return resolved.path
