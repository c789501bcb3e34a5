"""The Llama decoder family: Llama 2/3 and SmolLM2, Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

One forward serves prefill, decode and mixed batches: it takes a flat ragged batch of tokens with their
positions and the paged KV cache (a value, returned updated), runs the stacked layers with a scan, and
projects only the rows named by `logits_indices` (the last new token of each sequence) to the vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.attention import ragged_paged_attention
from model.config import ModelConfig
from model.layers import Dense, GatedMLP, RMSNorm, apply_rope, rope_inverse_frequencies


class AttentionMetadata(NamedTuple):
    """Where each sequence's KV lives; see docs/architecture.md for the exact meaning."""

    kv_lens: jax.Array  # int32[S]
    page_indices: jax.Array  # int32[S, pages_per_seq]
    cu_q_lens: jax.Array  # int32[S + 1]
    num_seqs: jax.Array  # int32[1]


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden, head_dim = config.hidden_size, config.head_dim
        bias = config.attention_bias
        self.q_proj = Dense(hidden, config.num_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(hidden, config.num_kv_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.v_proj = Dense(hidden, config.num_kv_heads * head_dim, bias=bias, dtype=dtype, rngs=rngs)
        self.o_proj = Dense(config.num_heads * head_dim, hidden, bias=False, dtype=dtype, rngs=rngs)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=config.rms_norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        self.config = config

    def __call__(self, x, positions, kv_pages, layer, meta: AttentionMetadata, rope, backend: str):
        cfg = self.config
        num_tokens = x.shape[0]
        q = self.q_proj(x).reshape(num_tokens, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(num_tokens, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, attention_factor = rope
        q = apply_rope(q, positions, inv_freq, attention_factor)
        k = apply_rope(k, positions, inv_freq, attention_factor)
        out, kv_pages = ragged_paged_attention(
            q, k, v, kv_pages, layer, *meta,
            sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window, backend=backend,
        )
        return self.o_proj(out.reshape(num_tokens, -1)), kv_pages


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, kv_pages, layer, meta, rope, backend):
        h, kv_pages = self.self_attn(self.input_layernorm(x), positions, kv_pages, layer, meta, rope, backend)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_pages


class LlamaForCausalLM(nnx.Module):
    """Also registered for Qwen2ForCausalLM and Qwen3ForCausalLM: the config switches bias and q/k norm."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 attention_backend: str = "auto"):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.attention_backend = attention_backend
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype) * 0.02
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return DecoderLayer(config, dtype=dtype, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else Dense(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(self, input_ids, positions, kv_pages, meta: AttentionMetadata, logits_indices, layers=None):
        """Returns float32 logits `[S, vocab]` for the rows `logits_indices`, and the updated cache.

        `layers`: optional list of per-layer modules with their own (unstacked) params, run as an
        unrolled loop instead of the scan over `self.layers` (see `hidden_states`).
        """
        x, kv_pages = self.hidden_states(input_ids, positions, kv_pages, meta, layers)
        return self.logits(x[logits_indices]), kv_pages

    def hidden_states(self, input_ids, positions, kv_pages, meta: AttentionMetadata, layers=None):
        """Scan over the stacked layers (compile time independent of depth), or, given `layers`, an
        unrolled loop: XLA:CPU copies each layer's weights out of a stacked array before using them
        (measured 3.4x slower weight reads at batch 1), so the CPU path keeps one array per layer."""
        cfg = self.config
        x = self.embed_tokens[...][input_ids]
        rope = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        backend = self.attention_backend
        if layers is not None:
            for index, layer in enumerate(layers):
                x, kv_pages = layer(x, positions, kv_pages, jnp.int32(index), meta, rope, backend)
            return self.norm(x), kv_pages
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, xs):
            h, pages = carry
            state, layer_index = xs
            h, pages = nnx.merge(graphdef, state)(h, positions, pages, layer_index, meta, rope, backend)
            return (h, pages), None

        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, kv_pages), _ = jax.lax.scan(body, (x, kv_pages), (layer_state, layer_ids))
        return self.norm(x), kv_pages

    def logits(self, x):
        if self.lm_head is None:
            # `E @ x.T` reads the [vocab, hidden] table row-major as it is stored; `x @ E.T` made XLA:CPU
            # copy the whole transposed table every step.
            out = (self.embed_tokens[...] @ x.T).T
        else:
            out = self.lm_head(x)
        return out.astype(jnp.float32)
