"""Convert a model between a Hugging Face safetensors directory and an Orbax checkpoint.

    python -m checkpoints.convert SRC --to orbax DST
    python -m checkpoints.convert SRC --to safetensors DST

SRC is anything `--model-path` accepts (a directory, a hub id in the local cache, a .gguf file, an Orbax
checkpoint). The params are read as the server reads them (through the model class's
`checkpoints.name_maps.WeightNameMap`) in the checkpoint's own dtype, so nothing is rounded: a round trip
safetensors -> Orbax -> safetensors gives the same tensors bit for bit. `--to orbax` writes the param
pytree (`checkpoints.orbax_io`) with config.json, the tokenizer and the other model files copied beside
it; `--to safetensors` writes `model.safetensors` with Hugging Face tensor names (the same map, inverted)
and copies the same files. DST must not exist.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import struct
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints.load import load_checkpoint
from checkpoints.name_maps import weight_name_map_for
from checkpoints.orbax_io import ORBAX_OWNED, save_state
from checkpoints.resolve import resolve_model_dir
from checkpoints.safetensors import _DTYPES
from model.config import ModelConfig
from model.registry import model_class_for

FORMATS = ("orbax", "safetensors")
# Weight files of the source that are not copied beside the converted params.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_SAFETENSORS_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}


def read_state(model_dir: Path, dtype: str | None = None) -> tuple[nnx.Module, nnx.State]:
    """The abstract model and its params read from a resolved `model_dir`, in `dtype` (default: the
    checkpoint's `torch_dtype`, float32 when it names none)."""
    config = ModelConfig.from_dir(model_dir)
    dtype = jnp.dtype(dtype or config.torch_dtype or "float32")
    cls = model_class_for(config)
    model = nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return model, load_checkpoint(model, model_dir, dtype, progress=False)


def hf_tensors(model: nnx.Module, state: nnx.State):
    """Yield `(Hugging Face name, host array)` for every tensor the params hold: stacked params split
    per layer (and expert), Linear kernels transposed back to torch's `[out, in]`."""
    name_map = weight_name_map_for(model)
    kernel_leaf = name_map.linear_weight[1]
    for path, leaf in nnx.to_flat_state(state):
        path = tuple(str(k) for k in path)
        value = np.asarray(leaf.get_value())
        axes = int(path[0] in name_map.stacked) + int(name_map.is_expert_param(path))
        renamed = ".".join(path) in {ours for _, ours in name_map.renames}
        for index in itertools.product(*(range(n) for n in value.shape[:axes])):
            tensor = value[index]
            if path[-1] == kernel_leaf and not renamed:
                tensor = tensor.T
            yield name_map.to_hf_name(path, index), np.ascontiguousarray(tensor)


def write_safetensors(tensors, path: Path) -> None:
    """Write `(name, array)` pairs as one safetensors file (8-byte header length, JSON header, data)."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors:
        data = array.tobytes()
        header[name] = {"dtype": _SAFETENSORS_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for chunk in chunks:
            f.write(chunk)


def copy_model_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other model files (not weights, not orbax's own files) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name in ORBAX_OWNED or item.name.endswith(_WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)
        elif item.is_dir() and not item.name.isdigit() and not (item / "_METADATA").exists():
            shutil.copytree(item, dst / item.name)  # e.g. sentence-transformers' 1_Pooling/


def convert(src: str, to: str, dst: Path, dtype: str | None = None) -> Path:
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    dst = Path(dst)
    if dst.exists():
        raise ValueError(f"{dst} already exists")
    model_dir = resolve_model_dir(src)
    model, state = read_state(model_dir, dtype)
    if to == "orbax":
        save_state(state, dst)
    else:
        dst.mkdir(parents=True)
        write_safetensors(hf_tensors(model, state), dst / "model.safetensors")
    copy_model_files(model_dir, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a model directory, hub id in the local cache, .gguf file or Orbax checkpoint")
    parser.add_argument("--to", required=True, choices=FORMATS)
    parser.add_argument("dst", type=Path, help="the directory to write (must not exist)")
    parser.add_argument("--dtype", default=None, help="dtype of the written params (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.to, args.dst, args.dtype)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
