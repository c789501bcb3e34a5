"""Streaming safetensors loader: HF tensors -> the model's NNX param state, through a name map.

The file format is read directly (8-byte header length, JSON header, raw little-endian data) over a
memory map, so any dtype numpy knows through ml_dtypes (bfloat16, float8) loads without torch, one
param at a time, each device reading only its own block of it (`load_params`), and a corrupt file is a
clear error naming the file.
"""

from __future__ import annotations

import functools
import itertools
import json
import mmap
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

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
    for name, array, release in _tensor_views(path):
        yield name, array
        release()


def _tensor_views(path: Path) -> Iterator[tuple[str, np.ndarray, Callable[[], None]]]:
    """`(name, view, release)` for every tensor of one file: `view` reads nothing until it is sliced, and
    `release()` drops the pages read so far from the resident set (`_release_pages`)."""
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
            view = np.frombuffer(data, dtype=dtype, count=expected // np.dtype(dtype).itemsize,
                                 offset=base + start).reshape(shape)
            yield name, view, functools.partial(_release_pages, data, base + start, base + end)
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
    tensors in their expert's row). Every header is read and checked first: missing, unexpected and
    mis-shaped tensors are errors before any data is read. Then each param is built with
    `jax.make_array_from_callback` on `sharding_for(path)` (default: the first device): every device's
    block is read from the memory-mapped files (only that block's rows and columns) and cast to `dtype` as
    it is copied, so a sharded param never exists whole on one device, a bfloat16 load never holds a
    float32 copy, and the host holds one param's blocks at a time. A weight swap passes the served params'
    shardings.
    """
    name_map = name_map or weight_name_map_for(model)
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}
    host_dtype = np.dtype(dtype)
    num_layers = model.config.num_layers
    axes = {path: _stacked_axes(name_map, path) for path in flat}
    # (layer, expert) index -> the tensor's lazy view, already transposed to the param's layout.
    sources: dict[tuple[str, ...], dict[tuple[int, ...], _Source]] = {path: {} for path in flat}
    tied = model.config.tie_word_embeddings

    files = safetensors_files(Path(model_dir))
    for file in files:
        for name, array, release in _tensor_views(file):
            if name_map.skips(name, tie_word_embeddings=tied):
                continue
            target = name_map.to_param(name, flat)
            if target is None:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {file.name} for {model.config.architecture}"
                )
            path, index, transpose = target
            shape = tuple(flat[path].shape)
            assert len(index) == axes[path], (name, path, index)  # to_param maps per-layer onto stacked only
            if path[0] in name_map.stacked and index[0] >= num_layers:
                raise CheckpointError(f"tensor {name!r} names layer {index[0]}, but the model has {num_layers}")
            if any(i >= n for i, n in zip(index, shape[: len(index)], strict=True)):
                raise CheckpointError(f"tensor {name!r} names expert {index[-1]}, but the model has "
                                      f"{shape[len(index) - 1]}")
            value = array.T if transpose else array
            want = shape[len(index):]
            if value.shape != want:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                    f"{tuple(want[::-1]) if transpose else tuple(want)}"
                )
            sources[path][index] = _Source(value, release)

    for path, found in sources.items():
        expected = set(itertools.product(*(range(n) for n in flat[path].shape[: axes[path]])))
        if set(found) != expected:
            missing = sorted(expected - set(found))
            raise CheckpointError(f"missing tensor {name_map.to_hf_name(path, missing[0])!r} in {model_dir}"
                                  + (f" ({len(missing)} layers lack it)" if len(missing) > 1 else ""))

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    leaves = nnx.to_flat_state(state)
    for path, leaf in tqdm(leaves, desc="Loading safetensors", unit="param", disable=not progress):
        key = tuple(str(k) for k in path)
        found, stacked = sources.pop(key), axes[key]
        # Each device's block is read straight from the files (only the slice it holds) and cast to
        # `dtype` on the way; one param at a time, so the host peak is one param's blocks, never the model.
        value = jax.make_array_from_callback(
            tuple(leaf.shape), sharding_for(key) if sharding_for is not None else default,
            functools.partial(_read_block, found, stacked, host_dtype, tuple(leaf.shape)))
        leaf.set_value(value.block_until_ready())
        for source in found.values():
            source.release()
    return state


class _Source(NamedTuple):
    view: np.ndarray  # one checkpoint tensor, lazy (memory-mapped), in the param's layout
    release: Callable[[], None]


def _read_block(sources: dict[tuple[int, ...], _Source], stacked: int, dtype: np.dtype, shape: tuple[int, ...],
                index: tuple) -> np.ndarray:
    """The block `index` (a tuple of slices, one per axis) of a param of `shape` whose first `stacked` axes
    pick tensors (layer, expert) out of `sources`: only the rows and columns of that block are read."""
    ranges = [range(*s.indices(n)) for s, n in zip(index, shape, strict=True)]
    out = np.empty([len(r) for r in ranges], dtype)
    inner = tuple(index[stacked:])
    for position in itertools.product(*(enumerate(r) for r in ranges[:stacked])):
        where, which = tuple(p for p, _ in position), tuple(i for _, i in position)
        out[where] = sources[which].view[inner]  # the cast to `dtype` happens here
    return out


def _stacked_axes(name_map: WeightNameMap, path: tuple[str, ...]) -> int:
    """How many leading axes of param `path` index tensors (layer, expert) rather than values."""
    return int(path[0] in name_map.stacked) + int(name_map.is_expert_param(path))
