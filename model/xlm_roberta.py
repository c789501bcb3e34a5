"""XLM-RoBERTa cross-encoders (`XLMRobertaForSequenceClassification`, e.g. BAAI/bge-reranker-v2-m3).

An encoder (`model.interface.EncoderModel`): bidirectional attention within each sequence of a flat
batch (`AttentionBackend.encoder_attention`), no paged cache, nothing kept after the step. Post-norm
BERT layers; absolute position embeddings offset by the padding index (RoBERTa numbers a sequence's
tokens from `pad_token_id + 1`); the token-type embedding of type 0 (XLM-R has one type); the
classification head (dense, tanh, out_proj) on the first (`<s>`) token. The score is the raw logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.name_maps import PrefixRule, WeightNameMap
from model.config import ModelConfig
from model.decoder_pooling import num_labels
from model.heads import pool
from model.interface import StepInputs
from model.layers import Dense

_ACTIVATIONS = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu,
                "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}

XLM_ROBERTA_MAP = WeightNameMap(
    prefixes=(
        PrefixRule("roberta.encoder.layer.{layer}.attention.self.", "layers.attention."),
        PrefixRule("roberta.encoder.layer.{layer}.attention.output.", "layers.attention_output."),
        PrefixRule("roberta.encoder.layer.{layer}.intermediate.", "layers.intermediate."),
        PrefixRule("roberta.encoder.layer.{layer}.output.", "layers.output."),
        PrefixRule("roberta.embeddings.", "embeddings."),
        PrefixRule("classifier.", "classifier."),
    ),
    stacked=("layers",),
    # Buffers (position / token-type ids) and the pooler that a sequence classifier does not use.
    ignored=(r".*position_ids", r".*token_type_ids", r"roberta\.pooler\..*"),
)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * self.weight[...] + self.bias[...]


class Table(nnx.Module):
    """An embedding table; the param is named `weight` as in the checkpoint."""

    def __init__(self, rows: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (rows, dim), dtype) * 0.02)


class DenseNorm(nnx.Module):
    """BERT's `*.output`: dense, then LayerNorm of (residual + it)."""

    def __init__(self, dim_in: int, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        self.dense = Dense(dim_in, dim, bias=True, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(dim, eps=eps, dtype=dtype)

    def __call__(self, x, residual):
        return self.LayerNorm(residual + self.dense(x))


class SelfAttention(nnx.Module):
    def __init__(self, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.query = Dense(hidden, hidden, bias=True, dtype=dtype, rngs=rngs)
        self.key = Dense(hidden, hidden, bias=True, dtype=dtype, rngs=rngs)
        self.value = Dense(hidden, hidden, bias=True, dtype=dtype, rngs=rngs)


class Intermediate(nnx.Module):
    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        self.dense = Dense(hidden, intermediate, bias=True, dtype=dtype, rngs=rngs)


class XLMRobertaLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden, eps = config.hidden_size, float(config.raw.get("layer_norm_eps", 1e-5))
        self.attention = SelfAttention(hidden, dtype=dtype, rngs=rngs)
        self.attention_output = DenseNorm(hidden, hidden, eps=eps, dtype=dtype, rngs=rngs)
        self.intermediate = Intermediate(hidden, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.output = DenseNorm(config.intermediate_size, hidden, eps=eps, dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.act = config.raw.get("hidden_act", "gelu")

    def fuse_projections(self) -> None:
        """Nothing fused: the encoder runs whole prompts, where the matmuls are large already."""

    def __call__(self, x, segment_ids, backend):
        shape = (x.shape[0], self.num_heads, self.head_dim)
        att = self.attention
        q, k, v = (proj(x).reshape(shape) for proj in (att.query, att.key, att.value))
        out = backend.encoder_attention(q, k, v, segment_ids, sm_scale=self.head_dim**-0.5)
        x = self.attention_output(out.reshape(x.shape), x)
        return self.output(_ACTIVATIONS[self.act](self.intermediate.dense(x)), x)


class ClassificationHead(nnx.Module):
    def __init__(self, hidden: int, labels: int, *, dtype, rngs: nnx.Rngs):
        self.dense = Dense(hidden, hidden, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Dense(hidden, labels, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.out_proj(jnp.tanh(self.dense(x)))


class Embeddings(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.word_embeddings = Table(config.vocab_size, hidden, dtype=dtype, rngs=rngs)
        self.position_embeddings = Table(config.max_position_embeddings, hidden, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Table(int(config.raw.get("type_vocab_size", 1)), hidden, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(hidden, eps=float(config.raw.get("layer_norm_eps", 1e-5)), dtype=dtype)


class XLMRobertaForSequenceClassification(nnx.Module):
    task = "score"
    cross_encoder = True  # takes (query, document) pairs: /v1/rerank
    default_pooling = ("cls", False)
    weight_name_map = XLM_ROBERTA_MAP

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.padding_idx = int(config.raw.get("pad_token_id", 1))
        self.embeddings = Embeddings(config, dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return XLMRobertaLayer(config, dtype=dtype, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.classifier = ClassificationHead(config.hidden_size, num_labels(config), dtype=dtype, rngs=rngs)

    @staticmethod
    def context_length(config: ModelConfig) -> int:
        """Tokens a sequence may have: positions start at `pad_token_id + 1` in the position table."""
        return config.max_position_embeddings - int(config.raw.get("pad_token_id", 1)) - 1

    def encode(self, input_ids, positions, segment_ids, backend, layers=None):
        """Hidden states `[T, hidden]` of a flat batch of whole sequences (`segment_ids` < 0: padding).
        `layers`: per-layer modules (the unrolled CPU path); the stacked `self.layers` under a scan else."""
        emb = self.embeddings
        # transformers' `create_position_ids_from_input_ids`: non-padding tokens count from padding_idx + 1
        # within their sequence, padding tokens sit at padding_idx (so a pad id inside a text stays exact).
        real = (input_ids != self.padding_idx).astype(jnp.int32)
        counts = jnp.cumsum(real)
        first = jnp.arange(input_ids.shape[0]) - positions  # each token's sequence start
        before = counts[first] - real[first]
        positions = (counts - before) * real + self.padding_idx
        x = (emb.word_embeddings.weight[...][input_ids]
             + emb.position_embeddings.weight[...][positions]
             + emb.token_type_embeddings.weight[...][0])
        x = emb.LayerNorm(x)
        if layers is not None:
            for layer in layers:
                x = layer(x, segment_ids, backend)
            return x
        graphdef, state = nnx.split(self.layers)

        def body(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, segment_ids, backend), None

        return jax.lax.scan(body, x, state)[0]

    def pool(self, hidden, inputs: StepInputs, *, method: str = "cls", normalize: bool = False):
        """float32 `[S, num_labels]`: the classification head on each sequence's first token."""
        first = pool(hidden, inputs.meta.cu_q_lens, inputs.meta.num_seqs, method="cls")
        return self.classifier(first.astype(hidden.dtype)).astype(jnp.float32)
