"""Building blocks shared by the decoder families: RMSNorm, rotary embeddings, dense layers, gated MLP."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kernels.dense import dense


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)`; kernel is `[in, out]` (the transpose of a torch Linear weight). The product
    is `kernels.dense.dense`: the native CPU kernel inside the runner's steps where it runs, XLA's dot else."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (in_features, out_features), dtype) / math.sqrt(in_features)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x):
        return dense(x, self.kernel[...], None if self.bias is None else self.bias[...])


class FusedDense(nnx.Module):
    """Several `Dense` layers that read the same input, as one `[in, sum(out)]` matmul; returns the parts.

    The CPU path fuses q/k/v and gate/up this way: XLA:CPU runs one larger matrix-vector product at a
    better rate than three small ones (a batch-1 step of the default model: 32 -> 26.5 ms of matvecs)."""

    def __init__(self, parts: list[Dense]):
        self.kernel = nnx.Param(jnp.concatenate([p.kernel[...] for p in parts], axis=1))
        biases = [p.bias for p in parts]
        self.bias = None if biases[0] is None else nnx.Param(jnp.concatenate([b[...] for b in biases]))
        self.sizes = tuple(int(p.kernel.shape[1]) for p in parts)

    def __call__(self, x):
        y = dense(x, self.kernel[...], None if self.bias is None else self.bias[...])
        ends = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes))]
        return [y[..., end - size : end] for end, size in zip(ends, self.sizes, strict=True)]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalize in float32 whatever the compute dtype, as transformers does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32.astype(x.dtype)) * self.weight[...]


class GatedMLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Dense(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(hidden, intermediate, bias=False, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(intermediate, hidden, bias=False, dtype=dtype, rngs=rngs)
        self.gate_up_proj = None

    def fuse_projections(self) -> None:
        """Replace gate and up by one `FusedDense` (same values; see `FusedDense`)."""
        self.gate_up_proj = nnx.data(FusedDense([self.gate_proj, self.up_proj]))
        self.gate_proj = self.up_proj = None

    def __call__(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(jax.nn.silu(gate) * up)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None):
    """Inverse frequencies (float32 numpy: constants, computed at start-up without a jit per op) and the
    attention factor, following transformers' rope_type variants."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen = old_len / low_freq_factor
        high_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        old_len = float(scaling["original_max_position_embeddings"])
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)

        def correction_dim(rotations):
            return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):  # transformers' default: a whole-dimension ramp
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / max(high - low, 1e-3), 0, 1)
        extrapolation = 1 - ramp
        inv = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv, float(_yarn_attention_factor(scaling, factor))
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3, yarn)")


def _yarn_attention_factor(scaling: dict[str, Any], factor: float) -> float:
    """The cos / sin scale: given, or from `mscale` / `mscale_all_dim` (DeepSeek style), else YaRN's
    `0.1 ln(factor) + 1`, as transformers computes it."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, float(m)) / mscale(factor, float(m_all))
    return mscale(factor)


def rope_tables(positions, inv_freq, attention_factor: float = 1.0, xp=jnp):
    """`(cos, sin)`, each float32 `[T, 1, head_dim // 2]`, for `positions[T]`: what `apply_rope` rotates by.

    `xp=np` computes them on the host, which is what the runner does for every step: computed inside the
    jit, XLA:CPU fuses the cos / sin into every layer's rotation and evaluates them per head and per
    layer (about 50 ms of a 512-token prefill step with the default model)."""
    freqs = xp.asarray(positions).astype(xp.float32)[:, None] * xp.asarray(inv_freq, xp.float32)[None, :]
    return ((xp.cos(freqs) * xp.float32(attention_factor))[:, None, :].astype(xp.float32),
            (xp.sin(freqs) * xp.float32(attention_factor))[:, None, :].astype(xp.float32))


def apply_rope(x, cos, sin):
    """Rotate `x[T, heads, head_dim]` by `rope_tables(...)` in transformers' rotate-half layout."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
