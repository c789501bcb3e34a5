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

from kernels.attention import ragged_paged_attention, read_only_attention, resolve_backend
from kernels.attention.reference import cache_value_dtype, interleave_kv, token_layout
from model.config import ModelConfig
from model.layers import (
    Dense,
    FusedDense,
    GatedMLP,
    RMSNorm,
    apply_rope,
    rope_inverse_frequencies,
    rope_tables,
)


class AttentionMetadata(NamedTuple):
    """Where each sequence's KV lives; see docs/architecture.md for the exact meaning."""

    kv_lens: jax.Array  # int32[S]
    page_indices: jax.Array  # int32[S, pages_per_seq]
    cu_q_lens: jax.Array  # int32[S + 1]
    num_seqs: jax.Array  # int32[1]


class KVWrite(NamedTuple):
    """The step's K/V, not yet in the cache: `write_kv_layers(kv_pages, *kv_write)` puts it there."""

    new_kv: jax.Array  # [layers, T, 2 * kv_heads, head_dim]
    page_indices: jax.Array
    seq: jax.Array
    pos: jax.Array
    valid: jax.Array


class Attention(nnx.Module):
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

    def __call__(self, x, positions, kv_pages, layer, meta: AttentionMetadata, rope, backend: str, layout=None):
        """Returns `(out, kv_pages)`, or with `layout` (the deferred-write path, see
        `LlamaForCausalLM.hidden_states`) `(out, new_kv)` with the cache untouched."""
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
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        options = dict(sm_scale=cfg.head_dim**-0.5, sliding_window=cfg.sliding_window)
        if layout is not None:
            impl, _ = resolve_backend(backend, head_dim=cfg.head_dim, page_size=kv_pages.shape[3],
                                      num_kv_heads=cfg.num_kv_heads, dtype=cache_value_dtype(kv_pages.dtype))
            out = read_only_attention(impl)(q, k, v, kv_pages, layer, *meta, layout=layout, cache_is_finite=True, **options)
            return self.o_proj(out.reshape(num_tokens, -1)), interleave_kv(k, v)
        out, kv_pages = ragged_paged_attention(q, k, v, kv_pages, layer, *meta, backend=backend, **options)
        return self.o_proj(out.reshape(num_tokens, -1)), kv_pages


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def fuse_projections(self) -> None:
        self.self_attn.fuse_projections()
        self.mlp.fuse_projections()

    def __call__(self, x, positions, kv_pages, layer, meta, rope, backend, layout=None):
        h, kv = self.self_attn(self.input_layernorm(x), positions, kv_pages, layer, meta, rope, backend, layout)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


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

    def __call__(self, input_ids, positions, kv_pages, meta: AttentionMetadata, logits_indices, layers=None,
                 deferred_kv: bool = False, rope=None):
        """Returns float32 logits `[S, vocab]` for the rows `logits_indices`, and the updated cache.

        `layers`: optional list of per-layer modules with their own (unstacked) params, run as an
        unrolled loop instead of the scan over `self.layers` (see `hidden_states`).
        `deferred_kv`: the CPU serving path (see `hidden_states`): `kv_pages` is head-major and only
        read, and a `KVWrite` comes back instead of the updated cache.
        `rope`: `(cos, sin)` tables for `positions` (`model.layers.rope_tables`) if the caller has them
        (the runner builds them on the host); computed here otherwise.
        """
        x, kv = self.hidden_states(input_ids, positions, kv_pages, meta, layers, deferred_kv, rope)
        return self.logits(x[logits_indices]), kv

    def attention_impl(self, kv_dtype, page_size: int) -> str:
        """What the attention backend resolves to here: 'tpu' / 'gpu' (Pallas kernels, token-major cache
        written per layer), 'cpu' (the native kernel) or 'reference' (both read-only, head-major; see
        `kernels.attention.cache_k_transposed` for the layout each reads)."""
        cfg = self.config
        return resolve_backend(self.attention_backend, head_dim=cfg.head_dim, page_size=page_size,
                               num_kv_heads=cfg.num_kv_heads, dtype=kv_dtype)[0]

    def hidden_states(self, input_ids, positions, kv_pages, meta: AttentionMetadata, layers=None,
                      deferred_kv: bool = False, rope=None):
        """Scan over the stacked layers (compile time independent of depth), or, given `layers`, an
        unrolled loop: XLA:CPU copies each layer's weights out of a stacked array before using them
        (measured 3.4x slower weight reads at batch 1), so the CPU path keeps one array per layer.

        Without `deferred_kv` every layer writes its K/V through `ragged_paged_attention` (token-major
        cache; the Pallas kernels do it in place). With it (the runner's choice for the jnp attention)
        the cache is head-major and only read (`attend`), and every layer's new K/V comes back as a
        `KVWrite` for a separate jit that donates the cache: with reads and writes in one jit XLA:CPU
        copied the whole cache, per layer or per step, so a step grew with the pool size."""
        cfg = self.config
        x = self.embed_tokens[...][input_ids]
        if rope is None:
            rope = rope_tables(positions, *rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
        backend = self.attention_backend
        layout = None
        if deferred_kv:
            # Materialized once: fused into every layer's masks, the sequence lookup was recomputed per element.
            layout = jax.lax.optimization_barrier(
                token_layout(meta.kv_lens, meta.cu_q_lens, meta.num_seqs, x.shape[0]))
        if layers is not None:
            new_kv = []
            for index, layer in enumerate(layers):
                x, kv = layer(x, positions, kv_pages, jnp.int32(index), meta, rope, backend, layout)
                if deferred_kv:
                    new_kv.append(kv)
                else:
                    kv_pages = kv
            if deferred_kv:
                return self.norm(x), KVWrite(jnp.stack(new_kv), meta.page_indices, *layout)
            return self.norm(x), kv_pages
        graphdef, layer_state = nnx.split(self.layers)
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)

        if deferred_kv:
            def read_only_body(h, xs):
                state, layer_index = xs
                return nnx.merge(graphdef, state)(h, positions, kv_pages, layer_index, meta, rope, backend, layout)

            x, new_kv = jax.lax.scan(read_only_body, x, (layer_state, layer_ids))
            return self.norm(x), KVWrite(new_kv, meta.page_indices, *layout)

        def body(carry, xs):
            h, pages = carry
            state, layer_index = xs
            h, pages = nnx.merge(graphdef, state)(h, positions, pages, layer_index, meta, rope, backend)
            return (h, pages), None

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
