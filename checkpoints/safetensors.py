"""Streaming safetensors loader: HF tensors -> the model's NNX param state, through a name map.

The file format is read directly (8-byte header length, JSON header, raw little-endian data) over a
memory map, so any dtype numpy knows through ml_dtypes (bfloat16, float8) loads without torch, one
tensor at a time, and a corrupt file is a clear error naming the file.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from checkpoints.name_maps import WeightNameMap, weight_name_map_for

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file or tensor."""


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir}")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` for every tensor of one file; arrays are views of a memory map, meant to
    be copied out before the next one is asked for (their pages then leave the resident set)."""
    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    try:
        if len(data) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {len(data)} bytes)")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > len(data) - 8:
            raise CheckpointError(f"{path} is corrupt: header length {header_len} exceeds the file size")
        try:
            header = json.loads(bytes(data[8 : 8 + header_len]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupt: unreadable header ({exc})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is corrupt: the header is not a JSON object")
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_name, (start, end), shape = info["dtype"], info["data_offsets"], tuple(info["shape"])
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{path} is corrupt: malformed header entry for tensor {name!r}") from None
            if not all(type(v) is int and v >= 0 for v in (start, end, *shape)):
                raise CheckpointError(f"{path} is corrupt: malformed header entry for tensor {name!r}")
            dtype = _DTYPES.get(dtype_name)
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - start != expected or base + end > len(data):
                raise CheckpointError(f"{path} is corrupt: tensor {name!r} data is truncated or misplaced")
            yield (
                name,
                np.frombuffer(
                    data, dtype=dtype, count=expected // np.dtype(dtype).itemsize, offset=base + start
                ).reshape(shape),
            )
            _release_pages(data, base + start, base + end)
    finally:
        del data


def _release_pages(data: mmap.mmap, start: int, end: int) -> None:
    """Drop the pages of a tensor the caller is done with from this process's resident set.

    The mapping is read-only and file-backed, so a later read of those bytes (a caller that kept the
    array) faults them in again from the page cache: correct either way. Without this, every page read
    stays resident until the file is closed, which adds a whole copy of the checkpoint to the peak.
    """
    if not hasattr(data, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or end <= start:
        return
    first = start - start % mmap.PAGESIZE
    data.madvise(mmap.MADV_DONTNEED, first, end - first)


def load_params(model: nnx.Module, model_dir: Path, dtype, *, progress: bool = True,
                name_map: WeightNameMap | None = None, sharding_for=None) -> nnx.State:
    """Read every tensor of `model_dir` into a state shaped like `model`'s params, in `dtype`.

    Names are mapped by `name_map` (default: the one `type(model)` declares, see
    `checkpoints.name_maps`): torch Linear weights `[out, in]` land transposed in our `kernel`
    `[in, out]`, `layers.N.*` tensors land in row N of the stacked layer params (and per-expert
    tensors in their expert's row). Host buffers are allocated in `dtype` and each tensor is cast as it
    is copied in, so a bfloat16 load never holds a float32 copy of the model. Missing, unexpected and
    mis-shaped tensors are errors. `sharding_for(path)`, when given, is where each param is placed
    (a weight swap puts the new params onto the served ones' shardings); default the first device.
    """
    name_map = name_map or weight_name_map_for(model)
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}
    host_dtype = np.dtype(dtype)
    buffers = {path: np.empty(leaf.shape, dtype=host_dtype) for path, leaf in flat.items()}
    num_layers = model.config.num_layers
    axes = {path: _stacked_axes(name_map, path) for path in flat}
    seen: dict[tuple[str, ...], set[tuple[int, ...]]] = {path: set() for path in flat}
    tied = model.config.tie_word_embeddings

    files = safetensors_files(Path(model_dir))
    bar = tqdm(total=len(files), desc="Loading safetensors", unit="file", disable=not progress)
    for file in files:
        for name, array in iter_tensors(file):
            if name_map.skips(name, tie_word_embeddings=tied):
                continue
            target = name_map.to_param(name, flat)
            if target is None:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {file.name} for {model.config.architecture}"
                )
            path, index, transpose = target
            buffer = buffers[path]
            assert len(index) == axes[path], (name, path, index)  # to_param maps per-layer onto stacked only
            if path[0] in name_map.stacked and index[0] >= num_layers:
                raise CheckpointError(f"tensor {name!r} names layer {index[0]}, but the model has {num_layers}")
            if any(i >= n for i, n in zip(index, buffer.shape[: len(index)], strict=True)):
                raise CheckpointError(f"tensor {name!r} names expert {index[-1]}, but the model has "
                                      f"{buffer.shape[len(index) - 1]}")
            value = array.T if transpose else array
            want = buffer.shape[len(index):]
            if value.shape != want:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                    f"{tuple(want[::-1]) if transpose else tuple(want)}"
                )
            buffer[index] = value  # the cast to `dtype` happens here, one tensor at a time
            seen[path].add(index)
        bar.update(1)
    bar.close()

    for path, indices in seen.items():
        expected = set(itertools.product(*(range(n) for n in buffers[path].shape[: axes[path]])))
        if indices != expected:
            missing = sorted(expected - indices)
            raise CheckpointError(f"missing tensor {name_map.to_hf_name(path, missing[0])!r} in {model_dir}"
                                  + (f" ({len(missing)} layers lack it)" if len(missing) > 1 else ""))

    for path, leaf in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        # One param at a time, waiting for each copy: the host buffer is freed before the next copy
        # starts, so the peak is the host buffers plus one param, not two copies of the model.
        target = sharding_for(key) if sharding_for is not None else None
        leaf.set_value(jax.device_put(buffers.pop(key), target).block_until_ready())
    return state


def _stacked_axes(name_map: WeightNameMap, path: tuple[str, ...]) -> int:
    """How many leading axes of param `path` index tensors (layer, expert) rather than values."""
    return int(path[0] in name_map.stacked) + int(name_map.is_expert_param(path))
