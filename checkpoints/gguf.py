"""Convert a Llama-architecture GGUF file into a Hugging Face model directory (float32 safetensors).

The rest of pallas-serve reads Hugging Face directories, so a GGUF (how the bundled default model
ships) is converted once: tensors are dequantized to float32 with gguf's numpy code (no torch) and
written under Hugging Face names, with config.json, tokenizer.json (rebuilt from the
`tokenizer.ggml.*` metadata), tokenizer_config.json and generation_config.json beside them.

The directory appears atomically: it is built under a temporary name next to the target and renamed
into place, so a crash never leaves a half-written model where a later run would trust it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from checkpoints.gguf_tokenizer import GGUFConversionError, build_tokenizer

SOURCE_MARKER = "pallas_serve_source.json"
CONVERTED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    SOURCE_MARKER,
)

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

def is_converted_dir(path: Path) -> bool:
    """Whether `path` holds every file a finished conversion writes (the marker is written last)."""
    return all((path / name).is_file() for name in CONVERTED_FILES)


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {name: field.contents() for name, field in reader.fields.items()}


def convert_gguf_to_hf_dir(
    gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, source: dict | None = None
) -> Path:
    """Write a Hugging Face Llama directory for `gguf_path` at `out_dir`, which must not exist yet.

    `source` is recorded in the directory's marker file (default: the GGUF's path and size). If
    another process finishes the same `out_dir` first, its complete directory is kept and returned.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another directory")
    reader = GGUFReader(gguf_path)
    metadata = read_metadata(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = hf_config(metadata, tensors, gguf_path)
    weights = _weight_plan(tensors, config, gguf_path)
    tokenizer, tokenizer_config = build_tokenizer(metadata, gguf_path)
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the finished model is an ordinary cache dir
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", _generation_config(metadata))
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_safetensors(staging / "model.safetensors", weights)
        marker = source or {"gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
        _write_json(staging / SOURCE_MARKER, marker)
        # On disk before the rename publishes them, so not even a power cut leaves empty files behind.
        for written in staging.iterdir():
            with open(written, "rb") as file:
                os.fsync(file.fileno())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if is_converted_dir(out_dir):
            return out_dir
        raise
    return out_dir


def _remove_stale_staging(out_dir: Path) -> None:
    """Delete staging directories that a killed conversion left beside `out_dir` (an hour old: one that
    another process is writing right now is younger than that)."""
    for staging in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            if time.time() - staging.stat().st_mtime > 3600:
                shutil.rmtree(staging, ignore_errors=True)
        except FileNotFoundError:  # its owner finished or cleaned up meanwhile
            continue


def hf_config(metadata: dict[str, Any], tensors: dict[str, ReaderTensor], gguf_path: Path) -> dict[str, Any]:
    """config.json for a LlamaForCausalLM, from the `llama.*` metadata and the tensor shapes."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GGUFConversionError(
            f"{gguf_path}: architecture {architecture!r} is not supported (only 'llama')"
        )

    def key(name: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{name}", default)
        if value is None:
            raise GGUFConversionError(f"{gguf_path}: metadata key llama.{name} is missing")
        if isinstance(value, list):
            raise GGUFConversionError(f"{gguf_path}: per-layer llama.{name} is not supported")
        return value

    if metadata.get("llama.expert_count"):
        raise GGUFConversionError(f"{gguf_path}: mixture-of-experts Llama GGUFs are not supported")
    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden_size // num_heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFConversionError(f"{gguf_path}: partial rotary embeddings are not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFConversionError(f"{gguf_path}: no token_embd.weight tensor")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": _shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": _float32_decimal(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_decimal(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, gguf_path),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(token_id)
    return config


def _rope_scaling(metadata: dict[str, Any], gguf_path: Path) -> dict[str, Any] | None:
    kind = metadata.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_decimal(metadata["llama.rope.scaling.factor"])}
    raise GGUFConversionError(f"{gguf_path}: rope scaling {kind!r} is not supported")


def _float32_decimal(value: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that round-trips
    # through float32 is what the original config.json said.
    return float(str(np.float32(value)))


def _shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first; numpy (and Hugging Face's [out, in]) is the reverse.
    return tuple(int(dim) for dim in reversed(tensor.shape))


WeightPlan = list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]


def _weight_plan(tensors: dict[str, ReaderTensor], config: dict[str, Any], gguf_path: Path) -> WeightPlan:
    """(Hugging Face name, shape, loader) per tensor, shapes checked against the config up front."""
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    expected = {
        "token_embd": (config["vocab_size"], hidden),
        "output": (config["vocab_size"], hidden),
        "output_norm": (hidden,),
        "attn_norm": (hidden,),
        "ffn_norm": (hidden,),
        "attn_q": (num_heads * head_dim, hidden),
        "attn_k": (num_kv_heads * head_dim, hidden),
        "attn_v": (num_kv_heads * head_dim, hidden),
        "attn_output": (hidden, num_heads * head_dim),
        "ffn_gate": (config["intermediate_size"], hidden),
        "ffn_up": (config["intermediate_size"], hidden),
        "ffn_down": (hidden, config["intermediate_size"]),
    }
    # llama.cpp's converter reorders the rows of each q / k head for its rotary layout.
    rotary_heads = {"attn_q": num_heads, "attn_k": num_kv_heads}
    plan: WeightPlan = []
    for gguf_name, tensor in tensors.items():
        match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.weight", gguf_name)
        layer, role = (match.group(1), match.group(2)) if match else (None, None)
        if layer is None and role in _GLOBAL_TENSORS:
            hf_name = f"{_GLOBAL_TENSORS[role]}.weight"
        elif layer is not None and role in _LAYER_TENSORS and int(layer) < config["num_hidden_layers"]:
            hf_name = f"model.layers.{layer}.{_LAYER_TENSORS[role]}.weight"
        elif gguf_name == "rope_freqs.weight":
            raise GGUFConversionError(
                f"{gguf_path}: Llama 3.1-style rope scaling (rope_freqs) is not supported"
            )
        else:
            raise GGUFConversionError(
                f"{gguf_path}: tensor {gguf_name!r} has no Hugging Face Llama counterpart"
            )
        shape = _shape(tensor)
        if shape != expected[role]:
            raise GGUFConversionError(
                f"{gguf_path}: {gguf_name} has shape {shape}, expected {expected[role]}"
            )
        plan.append((hf_name, shape, _loader(tensor, shape, rotary_heads.get(role), gguf_path)))
    required = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{part}.weight"
        for i in range(config["num_hidden_layers"])
        for part in _LAYER_TENSORS.values()
    }
    missing = required - {name for name, _, _ in plan}
    if missing:
        raise GGUFConversionError(f"{gguf_path}: missing tensors for {sorted(missing)[:3]} ...")
    return sorted(plan)


def _loader(tensor: ReaderTensor, shape: tuple[int, ...], rotary_heads: int | None, gguf_path: Path):
    def load() -> np.ndarray:
        try:
            weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except NotImplementedError as error:
            raise GGUFConversionError(
                f"{gguf_path}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, "
                "which gguf cannot dequantize"
            ) from error
        if rotary_heads is not None:
            weight = undo_rotary_permutation(weight, rotary_heads)
        return np.ascontiguousarray(weight, dtype=np.float32)

    return load


def undo_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face q_proj / k_proj rows from llama.cpp's: each head's rows are stored as interleaved
    (first-half, second-half) pairs; [heads, head_dim/2, 2, in] -> [heads, 2, head_dim/2, in]."""
    rows, columns = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _write_safetensors(path: Path, weights: WeightPlan) -> None:
    """safetensors written one tensor at a time, so peak memory is one tensor, not the model."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in weights:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for _, _, load in weights:
            file.write(memoryview(load().astype("<f4", copy=False)).cast("B"))


def _generation_config(metadata: dict[str, Any]) -> dict[str, Any]:
    # Chat models often end a turn with an end-of-turn token distinct from end-of-sequence (Llama 3's
    # <|eot_id|>); generation must stop on either.
    stop_ids = [
        int(metadata[f"tokenizer.ggml.{name}_token_id"])
        for name in ("eos", "eot", "eom")
        if metadata.get(f"tokenizer.ggml.{name}_token_id") is not None
    ]
    stop_ids = list(dict.fromkeys(stop_ids))
    config: dict[str, Any] = {}
    if metadata.get("tokenizer.ggml.bos_token_id") is not None:
        config["bos_token_id"] = int(metadata["tokenizer.ggml.bos_token_id"])
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    if metadata.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return config


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
