"""The Llama decoder family: Llama 2/3 and SmolLM2, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

One layer class, `LlamaDecoderLayer`; the layer loop, embeddings and heads are `model.decoder`'s. The
config switches the variants: `attention_bias` (Qwen2), `qk_norm` (Qwen3), per-layer sliding windows
(`ModelConfig.layer_windows`, handed to each layer by the layer loop).
"""

from __future__ import annotations

from flax import nnx

from model.config import ModelConfig
from model.decoder import DecoderModel
from model.interface import StepInputs
from model.layers import Dense, FusedDense, GatedMLP, RMSNorm, apply_rope


class LlamaAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        bias = config.attention_bias
        self.q_proj = Dense(hidden, config.num_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(hidden, config.num_kv_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(hidden, config.num_kv_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(config.num_heads * head_dim, hidden, bias=False, dtype=dtype, rngs=rngs)
        self.qkv_proj = None
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.config = config

    def fuse_projections(self) -> None:
        """Replace q, k and v by one `FusedDense` (same values; see `FusedDense`)."""
        self.qkv_proj = nnx.data(FusedDense([self.q_proj, self.k_proj, self.v_proj]))
        self.q_proj = self.k_proj = self.v_proj = None

    def __call__(self, x, inputs: StepInputs, kv_pages, layer, backend, layout, sliding_window=None):
        """-> `(out, kv)` as `AttentionBackend.step_attention` returns `kv`."""
        cfg = self.config
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = k.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *inputs.rope), apply_rope(k, *inputs.rope)
        out, kv = backend.step_attention(q, k, v, kv_pages, layer, inputs.meta, layout, sm_scale=cfg.head_dim**-0.5,
                                         sliding_window=sliding_window)
        return self.o_proj(out.reshape(num_tokens, -1)), kv


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm attention, then a pre-norm feed-forward block. A family with another feed-forward (the MoE
    layers) subclasses it and overrides `make_mlp` / `feed_forward`."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = self.make_mlp(config, dtype=dtype, rngs=rngs)

    def make_mlp(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return GatedMLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def feed_forward(self, x, inputs: StepInputs):
        """-> `(out, aux)`: the block's output and its auxiliary outputs (none for a dense MLP)."""
        return self.mlp(x), {}

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()

    def __call__(self, x, inputs: StepInputs, kv_pages, layer, backend, layout, sliding_window=None):
        h, kv = self.self_attn(self.input_layernorm(x), inputs, kv_pages, layer, backend, layout, sliding_window)
        x = x + h
        out, aux = self.feed_forward(self.post_attention_layernorm(x), inputs)
        return x + out, kv, aux


class LlamaForCausalLM(DecoderModel):
    """Also registered for Mistral, Qwen2 and Qwen3: the config switches bias, q/k norm and windows."""

    layer_class = LlamaDecoderLayer
