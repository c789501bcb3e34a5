"""The decoder, written once for every family: embed, the layer loop, the final norm; and its params' layout.

A family (llama.py, ...) supplies a layer class (`interface.DecoderLayerModule`) and sets `layer_class`
on a `DecoderModel` subclass; heads live in heads.py. The layer loop runs either

- as a `jax.lax.scan` over the stacked layer params (compile time independent of depth; TPU / GPU), or
- as an unrolled loop over per-layer params (`layers=[...]`, the CPU path): XLA:CPU copies each layer's
  weights out of a stacked array before using them (measured 3.4x slower weight reads at batch 1);

and either writes each layer's K/V inside the step (the Pallas kernels, in place) or only reads the cache
and returns every layer's new K/V as one `KVWrite` (the CPU path: with reads and writes in one jit XLA:CPU
copied the whole cache, per layer or per step). The attention backend decides which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from checkpoints.name_maps import DEFAULT_DECODER_MAP
from model.config import ModelConfig
from model.heads import LMHead, pool
from model.interface import ForwardOutput, KVWrite, StepInputs
from model.layers import RMSNorm, rope_inverse_frequencies, rope_tables

LAYERS = "layers"  # the attribute holding the stacked layers; its params are split off by `arrange_params`


def _runs(windows: tuple) -> list[tuple[int, int, int | None]]:
    """`(start, end, window)` for each run of consecutive layers with the same sliding window."""
    runs: list[list] = []
    for index, window in enumerate(windows):
        if runs and runs[-1][2] == window:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1, window])
    return [tuple(run) for run in runs]


def run_layers(layers, x, inputs: StepInputs, kv_pages, backend, windows: tuple) -> tuple[Any, Any, dict]:
    """Run every layer; returns `(x, kv, aux)` with `kv` the updated cache or a `KVWrite` (see the module
    docstring) and `aux` each layer's auxiliary outputs stacked along a leading layer axis.

    `windows`: each layer's sliding window (None: full attention), static, passed to the layer as
    `sliding_window`; the scan runs once per stretch of layers that share a window (one stretch for
    every model whose layers all attend alike)."""
    layout = backend.step_layout(inputs.meta, x.shape[0])
    if isinstance(layers, list | tuple):  # one module per layer: the unrolled loop
        collected, auxes = [], []
        for index, layer in enumerate(layers):
            x, kv, aux = layer(x, inputs, kv_pages, jnp.int32(index), backend, layout, sliding_window=windows[index])
            if backend.writes_in_step:
                kv_pages = kv
            else:
                collected.append(kv)
            auxes.append(aux)
        aux = _stack_aux(auxes)
        if backend.writes_in_step:
            return x, kv_pages, aux
        return x, KVWrite(jnp.stack(collected), inputs.meta.page_indices, *layout), aux

    graphdef, layer_state = nnx.split(layers)
    runs = _runs(windows)
    new_kv, auxes = [], []
    for start, end, window in runs:
        state = layer_state if len(runs) == 1 else jax.tree.map(lambda a, s=start, e=end: a[s:e], layer_state)
        layer_ids = jnp.arange(start, end, dtype=jnp.int32)
        if backend.writes_in_step:
            def write_body(carry, xs, window=window):
                h, pages = carry
                state, index = xs
                h, pages, aux = nnx.merge(graphdef, state)(h, inputs, pages, index, backend, None,
                                                           sliding_window=window)
                return (h, pages), aux

            (x, kv_pages), aux = jax.lax.scan(write_body, (x, kv_pages), (state, layer_ids))
        else:
            def read_only_body(h, xs, window=window, kv_pages=kv_pages):
                state, index = xs
                h, kv, aux = nnx.merge(graphdef, state)(h, inputs, kv_pages, index, backend, layout,
                                                        sliding_window=window)
                return h, (kv, aux)

            x, (kv, aux) = jax.lax.scan(read_only_body, x, (state, layer_ids))
            new_kv.append(kv)
        auxes.append(aux)
    aux = auxes[0] if len(auxes) == 1 else jax.tree.map(lambda *xs: jnp.concatenate(xs), *auxes)
    if backend.writes_in_step:
        return x, kv_pages, aux
    kv = new_kv[0] if len(new_kv) == 1 else jnp.concatenate(new_kv)
    return x, KVWrite(kv, inputs.meta.page_indices, *layout), aux


def _stack_aux(auxes: list[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *auxes) if auxes and auxes[0] else {}


class DecoderModel(nnx.Module):
    """Token embedding, `config.num_layers` layers of `layer_class`, final RMSNorm, LM head (`task="generate"`).

    Param paths (what checkpoints map Hugging Face names onto): `embed_tokens`, `layers.<param>` stacked
    along a leading layer axis, `norm.weight`, `lm_head.kernel` (absent when the embeddings are tied)."""

    task = "generate"
    layer_class: type[nnx.Module]
    weight_name_map = DEFAULT_DECODER_MAP  # Hugging Face names -> param paths; a family with others sets its own

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.hidden_size), dtype) * 0.02)
        layer_class = self.layer_class

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(layer_rngs):
            return layer_class(config, dtype=dtype, rngs=layer_rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, tied=config.tie_word_embeddings, dtype=dtype,
                              rngs=rngs)

    def forward(self, inputs: StepInputs, kv_pages, backend, layers=None) -> ForwardOutput:
        """`layers`: per-layer modules for the unrolled loop (the CPU path); the stacked `self.layers` else."""
        if inputs.rope is None:
            cfg = self.config
            rope = rope_tables(inputs.positions, *rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta,
                                                                           cfg.rope_scaling))
            inputs = inputs._replace(rope=rope)
        x = self.embed_tokens[...][inputs.input_ids]
        x, kv, aux = run_layers(self.layers if layers is None else layers, x, inputs, kv_pages, backend,
                                self.config.layer_windows)
        return ForwardOutput(self.norm(x), kv, aux)

    def logits(self, hidden_rows):
        return self.lm_head(hidden_rows, self.embed_tokens[...])

    def pool(self, hidden, inputs: StepInputs, *, method: str = "last", normalize: bool = False):
        """One float32 vector per sequence of the step from the final hidden states (`heads.pool`)."""
        return pool(hidden, inputs.meta.cu_q_lens, inputs.meta.num_seqs, method=method, normalize=normalize)


# -- params: how the runner holds them ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BoundParams:
    """The static half of an arranged param pytree: rebuilds the model (and the per-layer modules of the
    unrolled loop) from the arrays inside a jit (the runner closes over it)."""

    graphdef: Any
    abstract_layers: Any
    layer_graphdef: Any  # None: the layers stay stacked (scan)

    def bind(self, params):
        rest, layers = params
        if self.layer_graphdef is None:
            return nnx.merge(self.graphdef, layers, rest), None
        model = nnx.merge(self.graphdef, self.abstract_layers, rest)
        return model, [nnx.merge(self.layer_graphdef, state) for state in layers]


def arrange_params(abstract: DecoderModel, state: nnx.State, *, unroll: bool,
                   fuse: bool = True) -> tuple[Any, BoundParams]:
    """A full param state -> `((rest, layers), BoundParams)`: the layers stacked for the scan, or (the CPU
    path, `unroll`) a list of per-layer states with each layer's `fuse_projections()` applied unless
    `fuse` is False (a sharded model: a fused kernel's parts would land on different shards)."""
    graphdef, abstract_layers, _ = nnx.split(abstract, nnx.PathContains(LAYERS), ...)
    _, layers, rest = nnx.split(nnx.merge(nnx.split(abstract)[0], state), nnx.PathContains(LAYERS), ...)
    if not unroll:
        return (rest, layers), BoundParams(graphdef, abstract_layers, None)
    stacked_graphdef = nnx.split(getattr(abstract, LAYERS))[0]
    per_layer, layer_graphdef = [], None
    for i in range(abstract.config.num_layers):
        layer = nnx.merge(stacked_graphdef, jax.tree.map(lambda x, i=i: x[i], layers[LAYERS]))
        if fuse:
            layer.fuse_projections()
        layer_graphdef, layer_state = nnx.split(layer)
        per_layer.append(layer_state)
    return (rest, per_layer), BoundParams(graphdef, abstract_layers, layer_graphdef)
