"""Hugging Face `config.json` -> a typed, validated `ModelConfig`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that this runtime cannot serve; the message names the offending field."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None  # the window of the layers that have one (None: no layer does)
    layer_windows: tuple[int | None, ...]  # per layer: its sliding window, or None for full attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # Mixture of experts (Qwen2-MoE / Qwen3-MoE); num_experts 0 for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # 0: no shared expert (Qwen3-MoE)
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        arch = archs[0]

        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"config.json for {arch} is missing '{key}'")
            return raw[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        model_type = raw.get("model_type", "")
        # Qwen2 always has q/k/v biases; Llama only when attention_bias says so; Qwen2-MoE says `qkv_bias`.
        attention_bias = bool(raw.get("attention_bias", raw.get("qkv_bias", model_type in ("qwen2", "qwen2_moe"))))
        num_layers = int(need("num_hidden_layers"))
        sliding, layer_windows = _sliding_windows(raw, model_type, num_layers)
        # transformers >= 5 writes rope settings as `rope_parameters`; older configs use
        # `rope_theta` + `rope_scaling`.
        rope = dict(raw.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling") or rope or None
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            layer_windows=layer_windows,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=raw,
            **_moe_fields(raw),
        )

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its MLP is the routed experts (transformers' Qwen2-MoE rule)."""
        return tuple(self.num_experts > 0 and i not in self.mlp_only_layers
                     and (i + 1) % self.decoder_sparse_step == 0 for i in range(self.num_layers))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple]:
    """`(window, per-layer windows)` as transformers applies them:
    - `layer_types` (written by transformers >= 5): "sliding_attention" layers use the window;
    - Qwen2 / Qwen3 style (`use_sliding_window`): layers from `max_window_layers` on use it;
    - Mistral: every layer when `sliding_window` is set."""
    window = raw.get("sliding_window")
    if model_type == "mistral":
        enabled = window is not None
    else:
        enabled = bool(raw.get("use_sliding_window")) and window is not None
    if not enabled:
        return None, (None,) * num_layers
    window = int(window)
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise ConfigError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        sliding = [kind == "sliding_attention" for kind in layer_types]
    elif model_type == "mistral":
        sliding = [True] * num_layers
    else:
        first = int(raw.get("max_window_layers", 0))
        sliding = [i >= first for i in range(num_layers)]
    layer_windows = tuple(window if s else None for s in sliding)
    return (window if any(sliding) else None), layer_windows


def _moe_fields(raw: dict[str, Any]) -> dict[str, Any]:
    # transformers >= 5 writes Qwen3-MoE's expert count as `num_local_experts`; released configs say `num_experts`.
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    if not num_experts:
        return {}
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if not 0 < top_k <= num_experts:
        raise ConfigError(f"num_experts_per_tok must be in [1, num_experts={num_experts}], got {top_k}")
    step = int(raw.get("decoder_sparse_step") or 1)
    if step < 1:
        raise ConfigError(f"decoder_sparse_step must be at least 1, got {step}")
    # Qwen3-MoE configs carry a shared_expert_intermediate_size, but the model has no shared expert.
    shared = int(raw.get("shared_expert_intermediate_size") or 0) if raw.get("model_type") == "qwen2_moe" else 0
    return dict(num_experts=num_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
                shared_expert_intermediate_size=shared, norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                decoder_sparse_step=step, mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()))
