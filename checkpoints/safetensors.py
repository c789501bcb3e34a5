"""Streaming safetensors loader: HF tensors -> the model's NNX param state, through a name map.

The file format is read directly (8-byte header length, JSON header, raw little-endian data) over a
memory map, so any dtype numpy knows through ml_dtypes (bfloat16, float8) loads without torch, one
tensor at a time, and a corrupt file is a clear error naming the file.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

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
# Buffers transformers writes that are not parameters.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


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
    """Yield `(name, array)` for every tensor of one file; arrays are views of a memory map."""
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
    finally:
        del data


def _target(name: str) -> tuple[tuple[str, ...], int | None]:
    """HF tensor name -> (our param path with 'weight' as the leaf, layer index or None)."""
    layer = None
    m = _LAYER.match(name)
    if m:
        layer, name = int(m.group(1)), "layers." + m.group(2)
    elif name.startswith("model."):
        name = name[len("model.") :]
    if name == "embed_tokens.weight":
        return ("embed_tokens",), None
    return tuple(name.split(".")), layer


def _hf_name(path: tuple[str, ...], layer: int) -> str:
    """Our param path -> the transformers tensor name it is read from (for error messages)."""
    leaf = "weight" if path[-1] == "kernel" else path[-1]
    if path == ("embed_tokens",):
        return "model.embed_tokens.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    if path[0] == "layers":
        return ".".join(("model.layers", str(layer), *path[1:-1], leaf))
    return ".".join(("model", *path[:-1], leaf))


def load_params(model: nnx.Module, model_dir: Path, dtype, *, progress: bool = True) -> nnx.State:
    """Read every tensor of `model_dir` into a state shaped like `model`'s params, cast to `dtype`.

    Torch Linear weights `[out, in]` land transposed in our `kernel` `[in, out]`; `layers.N.*` tensors
    land in row N of the stacked layer params. Missing, unexpected and mis-shaped tensors are errors.
    """
    state = nnx.state(model, nnx.Param)
    flat = {tuple(str(k) for k in path): leaf for path, leaf in nnx.to_flat_state(state)}
    buffers = {path: np.zeros(leaf.shape, dtype=np.float32) for path, leaf in flat.items()}
    stacked = {path for path in flat if path[0] == "layers"}
    num_layers = model.config.num_layers
    seen: dict[tuple[str, ...], set[int]] = {path: set() for path in flat}
    tied = model.config.tie_word_embeddings

    files = safetensors_files(Path(model_dir))
    bar = tqdm(total=len(files), desc="Loading safetensors", unit="file", disable=not progress)
    for file in files:
        for name, array in iter_tensors(file):
            if _IGNORED.match(name) or (tied and name == "lm_head.weight"):
                continue
            path, layer = _target(name)
            transpose = False
            if path not in flat and path[-1] == "weight":
                path, transpose = path[:-1] + ("kernel",), True
            if path not in flat or (layer is None) == (path in stacked):
                raise CheckpointError(
                    f"unexpected tensor {name!r} in {file.name} for {model.config.architecture}"
                )
            if layer is not None and layer >= num_layers:
                raise CheckpointError(f"tensor {name!r} names layer {layer}, but the model has {num_layers}")
            value = array.T if transpose else array
            want = buffers[path].shape[1:] if layer is not None else buffers[path].shape
            if value.shape != want:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                    f"{tuple(want[::-1]) if transpose else tuple(want)}"
                )
            if layer is None:
                buffers[path][...] = value
                seen[path].add(0)
            else:
                buffers[path][layer] = value
                seen[path].add(layer)
        bar.update(1)
    bar.close()

    for path, layers in seen.items():
        expected = set(range(num_layers)) if path in stacked else {0}
        if layers != expected:
            missing = sorted(expected - layers)
            raise CheckpointError(f"missing tensor {_hf_name(path, missing[0])!r} in {model_dir}"
                                  + (f" ({len(missing)} layers lack it)" if len(missing) > 1 else ""))

    for path, leaf in nnx.to_flat_state(state):
        key = tuple(str(k) for k in path)
        leaf.set_value(jnp.asarray(buffers.pop(key), dtype=dtype))
    return state
