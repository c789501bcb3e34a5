"""Arranged params kept on disk, so a restart reads them back instead of reading and arranging the checkpoint.

A warm restart of the default model spent ~2.3 s of its ~6 s (docs/performance.md, "Restart to ready")
reading the checkpoint's tensors (transposed from torch's `[out, in]` as they are copied) and arranging
them for the step (per-layer states, q/k/v and gate/up fused). After a start that did that, the arranged
params are written once, on a background thread, as one file of raw arrays under the compilation cache
directory (`<compilation-cache-dir>/params`); a later start with the same checkpoint files (names, sizes,
modification times), dtype, runtime configuration and model / checkpoint code maps that file into
memory as the params (on the CPU, XLA uses the mapped pages as the arrays' buffers: nothing is copied). Each file is a full copy of a model's weights, so each model
directory keeps one (the newest) and the directory at most `KEEP` (the least recently used go).
Only for a model on one device: a sharded placement reads just its shards from the checkpoint.

File layout: 8 bytes (little-endian header length), a JSON header (`treedef`: the arranged pytree's
structure; `leaves`: shape, dtype, offset of each array), then each array's bytes at its offset.
Anything unexpected in a file (another structure, a short read) is a miss: the checkpoint is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np

from serving.executable_cache import source_digest

logger = logging.getLogger(__name__)

KEEP = 4  # files in the directory: each is a whole model's weights
_ALIGN = 4096
# The code that decides what an arranged param holds: the model definitions and the checkpoint readers.
_ARRANGEMENT_DIRS = ("model", "checkpoints")


def _checkpoint_identity(model_dir: Path) -> str:
    """Every file under `model_dir` by name, size and modification time: a rewritten checkpoint misses."""
    parts = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        parts.append(f"{path.relative_to(model_dir).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "\n".join(parts)


class ParamsCache:
    """One model's arranged params on disk (`directory` None: no cache, every call a miss / no-op)."""

    def __init__(self, directory: Path | None, model_dir: Path, context: str):
        self.path: Path | None = None
        if directory is None:
            return
        model_dir = Path(model_dir).resolve()
        self._directory = Path(directory)
        self._model_tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
        key = hashlib.sha256("\n".join([source_digest(dirs=_ARRANGEMENT_DIRS), context, _checkpoint_identity(model_dir)]).encode())
        self.path = self._directory / f"params-{self._model_tag}-{key.hexdigest()[:24]}.bin"

    def load(self, abstract: Any, device: Any) -> Any | None:
        """The params shaped like `abstract` (a pytree of `jax.ShapeDtypeStruct`, the arranged structure)
        on `device`, or None when there is no matching file."""
        if self.path is None or not self.path.exists():
            return None
        leaves, treedef = jax.tree.flatten(abstract)
        try:
            with open(self.path, "rb") as file:
                header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
                size = os.fstat(file.fileno()).st_size
                # Read-only and shared with the page cache; populated up front where the OS can (one pass
                # instead of a fault per page during the first step).
                mapped = mmap.mmap(file.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                   prot=mmap.PROT_READ)
            if header["treedef"] != str(treedef) or len(header["leaves"]) != len(leaves):
                logger.warning("ignoring %s: it holds another structure", self.path.name)
                return None
            arrays = []
            for want, (shape, dtype, offset) in zip(leaves, header["leaves"], strict=True):
                dtype = np.dtype(dtype)
                count = int(np.prod(shape, dtype=np.int64))
                if tuple(shape) != tuple(want.shape) or offset + count * dtype.itemsize > size:
                    logger.warning("ignoring %s: a param has shape %s, expected %s", self.path.name, shape, want.shape)
                    return None
                # On the CPU, XLA takes the mapped pages as the array's buffer (no copy; params are never
                # donated, so nothing writes them); on an accelerator this is the host side of the transfer.
                host = np.frombuffer(mapped, dtype, count=count, offset=offset).reshape(shape)
                arrays.append(jax.device_put(host, device))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring %s: %s", self.path.name, exc)
            return None
        os.utime(self.path)  # recently used: pruned last
        return jax.tree.unflatten(treedef, arrays)

    def save_in_background(self, params: Any) -> threading.Thread | None:
        """Write `params` (the arranged pytree) for the next start, on a daemon thread; None when the
        file is already there, there is no directory, or the disk lacks room for it and a margin."""
        if self.path is None or self.path.exists():
            return None
        leaves, treedef = jax.tree.flatten(params)
        total = sum(leaf.nbytes for leaf in leaves)
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(self._directory).free < 2 * total + (1 << 30):
                logger.info("not caching the arranged params: too little free disk under %s", self._directory)
                return None
        except OSError as exc:
            logger.warning("not caching the arranged params: %s", exc)
            return None
        thread = threading.Thread(target=self._write, args=(leaves, str(treedef)), name="params-cache", daemon=True)
        thread.start()
        return thread

    def _write(self, leaves: list, treedef: str) -> None:
        entries, offset = [], 0
        for leaf in leaves:
            offset = -(-offset // _ALIGN) * _ALIGN
            entries.append([list(leaf.shape), np.dtype(leaf.dtype).name, offset])
            offset += leaf.nbytes
        # Room for the header once the data's start is added to every offset (up to 16 more digits each).
        draft = json.dumps({"treedef": treedef, "leaves": entries}).encode()
        start = -(-(8 + len(draft) + 16 * len(entries)) // _ALIGN) * _ALIGN
        for entry in entries:
            entry[2] += start
        header = json.dumps({"treedef": treedef, "leaves": entries}).encode().ljust(start - 8)
        tmp = None
        try:
            with tempfile.NamedTemporaryFile(dir=self._directory, prefix=".params-", delete=False) as file:
                tmp = file.name
                file.write(len(header).to_bytes(8, "little") + header)
                for leaf, (_, _, at) in zip(leaves, entries, strict=True):
                    file.seek(at)
                    file.write(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8).data)
            os.replace(tmp, self.path)  # atomic: a reader sees a whole file or none
            tmp = None
            self._prune()
        except Exception as exc:  # noqa: BLE001 (a background nicety: never an unhandled thread error)
            logger.warning("not caching the arranged params: %s", exc)
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _prune(self) -> None:
        """This model's older files, then the least recently used beyond KEEP."""
        files = sorted(self._directory.glob("params-*.bin"), key=lambda p: p.stat().st_mtime, reverse=True)
        stale = [p for p in files if p.name.startswith(f"params-{self._model_tag}-") and p != self.path]
        kept = [p for p in files if p not in stale]
        for path in stale + kept[KEEP:]:
            path.unlink(missing_ok=True)
