"""Loads the model and runs one jitted step per scheduler iteration.

`(params, kv_pages, batch) -> (next_tokens, kv_pages)` with `kv_pages` donated, so the cache is a value
updated in place. Token counts and sequence counts are padded to power-of-two buckets, all compiled at
start-up (with a progress bar, and persisted in JAX's compilation cache so a second start is fast).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from checkpoints.safetensors import load_params
from kernels.attention import cache_k_transposed
from kernels.attention.reference import cache_storage_dtype, write_kv_layers
from model.config import ModelConfig
from model.layers import rope_inverse_frequencies, rope_tables
from model.llama import AttentionMetadata, KVWrite
from model.registry import model_class_for
from serving.kv_cache import KVCacheSpec, allocate_kv_pages, params_bytes, plan_kv_cache
from serving.sampler import SamplingBatch, sample

logger = logging.getLogger(__name__)

_DTYPES = {"float32": jnp.float32, "float": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "half": jnp.float16}


def resolve_dtype(name: str, config: ModelConfig):
    """`auto`: float32 on CPU (XLA:CPU's bf16 matvec is ~20x slower), the checkpoint's dtype elsewhere."""
    if name != "auto":
        return _DTYPES[name]
    if jax.default_backend() == "cpu":
        return jnp.float32
    return _DTYPES.get(str(config.torch_dtype or "bfloat16").replace("torch.", ""), jnp.bfloat16)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class StepBatch(NamedTuple):
    input_ids: jax.Array  # int32[T]
    positions: jax.Array  # int32[T]
    meta: AttentionMetadata
    logits_indices: jax.Array  # int32[S]
    sampling: SamplingBatch
    rope: tuple[jax.Array, jax.Array]  # float32[T, 1, head_dim // 2] x 2 (cos, sin), see `rope_tables`


@dataclass
class HostBatch:
    """What the scheduler fills for one step (unpadded); the runner pads it to a bucket."""

    input_ids: np.ndarray  # int32[num_tokens]
    positions: np.ndarray  # int32[num_tokens]
    kv_lens: np.ndarray  # int32[num_seqs]
    page_indices: list[list[int]]  # per sequence
    q_lens: np.ndarray  # int32[num_seqs]
    sampling: dict[str, np.ndarray]  # SamplingBatch fields, [num_seqs]


def _step(graphdef, layer_graphdef, abstract_layers, deferred_kv, treedef, param_leaves, kv_pages,
          batch: StepBatch):
    rest, layers = jax.tree.unflatten(treedef, param_leaves)
    if isinstance(layers, list):  # one state per layer: the unrolled loop
        model = nnx.merge(graphdef, abstract_layers, rest)
        layer_modules = [nnx.merge(layer_graphdef, state) for state in layers]
    else:
        model = nnx.merge(graphdef, layers, rest)
        layer_modules = None
    logits, kv = model(batch.input_ids, batch.positions, kv_pages, batch.meta, batch.logits_indices,
                       layer_modules, deferred_kv, batch.rope)
    return sample(logits, batch.sampling), kv


def _write_kv(k_transposed, kv_pages, kv_write: KVWrite):
    return write_kv_layers(kv_pages, *kv_write, k_transposed=k_transposed)


class ModelRunner:
    def __init__(self, model_dir: Path, *, dtype: str, page_size: int, attention_backend: str,
                 max_running_requests: int, max_step_tokens: int, context_length: int | None,
                 max_total_tokens: int | None, mem_fraction_static: float | None,
                 unroll_layers: bool | None = None, kv_cache_dtype: str = "auto"):
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_dir(self.model_dir)
        self.dtype = resolve_dtype(dtype, self.config)
        self.kv_dtype = self.dtype if kv_cache_dtype == "auto" else _DTYPES[kv_cache_dtype]
        self.context_length = context_length or self.config.max_position_embeddings
        inv_freq, attention_factor = rope_inverse_frequencies(self.config.head_dim, self.config.rope_theta,
                                                              self.config.rope_scaling)
        self._rope_frequencies = (np.asarray(inv_freq), attention_factor)
        cls = model_class_for(self.config)
        abstract = nnx.eval_shape(
            lambda: cls(self.config, dtype=self.dtype, rngs=nnx.Rngs(0), attention_backend=attention_backend)
        )
        # On CPU the layers run as an unrolled loop over per-layer arrays (see LlamaForCausalLM.hidden_states);
        # on accelerators as a scan over the stacked params.
        self.unroll_layers = jax.default_backend() == "cpu" if unroll_layers is None else unroll_layers
        self.graphdef, abstract_layers, _ = nnx.split(abstract, nnx.PathContains("layers"), ...)
        self._layer_graphdef = None  # the unrolled path's per-layer graphdef, set by `arrange_params`
        self._abstract = abstract
        self.params = self.arrange_params(load_params(abstract, self.model_dir, self.dtype))
        self.weight_bytes = params_bytes(self.params)

        self.max_seqs = next_pow2(max_running_requests)
        self.max_tokens = next_pow2(max(max_step_tokens, self.max_seqs))
        # With the jnp attention the step only reads the (head-major) cache and a second jit, donating
        # it, writes the step's K/V: one jit doing both made XLA:CPU copy the whole cache every step.
        # The Pallas kernels write their token-major cache in place inside the step.
        attention_impl = abstract.attention_impl(self.kv_dtype, page_size)
        self.deferred_kv = attention_impl not in ("tpu", "gpu")
        if not self.deferred_kv and self.kv_dtype != self.dtype:
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype} with a {jnp.dtype(self.dtype).name} model: the "
                             f"{attention_impl.upper()} attention kernel takes q, k, v and the cache in one dtype; "
                             "use --dtype bfloat16 or --attention-backend reference")
        self.kv_spec: KVCacheSpec = plan_kv_cache(
            # The CPU path keeps a bfloat16 cache as uint16 bit patterns (see `cache_storage_dtype`).
            self.config, page_size=page_size, weight_bytes=self.weight_bytes,
            dtype=cache_storage_dtype(self.kv_dtype) if self.deferred_kv else self.kv_dtype,
            max_total_tokens=max_total_tokens, mem_fraction_static=mem_fraction_static,
            max_running_requests=max_running_requests, context_length=self.context_length,
            head_major=self.deferred_kv,
        )
        self.page_size = page_size
        self.pages_per_seq = -(-self.context_length // page_size)
        self.kv_pages = allocate_kv_pages(self.kv_spec)
        step = partial(_step, self.graphdef, self._layer_graphdef, abstract_layers, self.deferred_kv,
                       self._param_treedef)
        self._step = jax.jit(step) if self.deferred_kv else jax.jit(step, donate_argnums=(1,))
        self._write_kv = jax.jit(partial(_write_kv, cache_k_transposed(attention_impl)), donate_argnums=(0,))
        logger.info(
            "Model %s loaded: %s, %.1f MB of weights; KV cache %d pages x %d tokens, %s (%.1f MB); attention: %s",
            self.config.architecture, jnp.dtype(self.dtype).name, self.weight_bytes / 1e6,
            self.kv_spec.num_pages, page_size, jnp.dtype(self.kv_dtype).name, self.kv_spec.total_bytes / 1e6,
            attention_impl,
        )

    @property
    def params(self):
        return jax.tree.unflatten(self._param_treedef, self._param_leaves)

    @params.setter
    def params(self, value) -> None:
        # The step takes the flat list of arrays: flattening the nnx state on every call cost ~0.8 ms.
        leaves, treedef = jax.tree.flatten(value)
        if getattr(self, "_param_treedef", treedef) != treedef:
            raise ValueError("new params do not have the structure of the served ones")
        self._param_leaves, self._param_treedef = leaves, treedef

    def arrange_params(self, state: nnx.State):
        """Full param state -> `(rest, layers)`: layers stacked for the scan, or (the CPU path) a list of
        per-layer states with q/k/v and gate/up fused into one matmul each."""
        _, layers, rest = nnx.split(nnx.merge(nnx.split(self._abstract)[0], state), nnx.PathContains("layers"), ...)
        if not self.unroll_layers:
            return rest, layers
        stacked_graphdef = nnx.split(self._abstract.layers)[0]
        per_layer = []
        for i in range(self.config.num_layers):
            layer = nnx.merge(stacked_graphdef, jax.tree.map(lambda x, i=i: x[i], layers["layers"]))
            layer.fuse_projections()
            graphdef, layer_state = nnx.split(layer)
            per_layer.append(layer_state)
        # Same for every layer and every load (a weight swap must keep the structure: see `params`).
        self._layer_graphdef = graphdef
        return rest, per_layer

    def read_weights(self, model_dir: Path):
        """Load another checkpoint of the same architecture and shapes (for a weight swap)."""
        config = ModelConfig.from_dir(model_dir)
        mine, theirs = self.config, config
        for field in ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias",
                      "qk_norm"):
            if getattr(mine, field) != getattr(theirs, field):
                raise ValueError(f"{field} differs: serving {getattr(mine, field)}, new checkpoint "
                                 f"{getattr(theirs, field)}")
        return self.arrange_params(load_params(self._abstract, Path(model_dir), self.dtype))

    # -- buckets -------------------------------------------------------------------------------
    def bucket(self, num_tokens: int, num_seqs: int) -> tuple[int, int]:
        """Padded (T, S). S follows T up to the sequence cap, so there is one bucket per token count."""
        tokens = next_pow2(max(num_tokens, num_seqs, 1))
        if tokens > self.max_tokens:
            raise ValueError(f"step of {num_tokens} tokens exceeds the compiled maximum {self.max_tokens}")
        return tokens, min(tokens, self.max_seqs)

    def buckets(self) -> list[tuple[int, int]]:
        out, t = [], 1
        while t <= self.max_tokens:
            out.append(self.bucket(t, 1))
            t *= 2
        return out

    # -- steps ---------------------------------------------------------------------------------
    def _pad(self, host: HostBatch, tokens: int, seqs: int) -> StepBatch:
        num_tokens, num_seqs = len(host.input_ids), len(host.kv_lens)
        input_ids = np.zeros(tokens, np.int32)
        input_ids[:num_tokens] = host.input_ids
        positions = np.zeros(tokens, np.int32)
        positions[:num_tokens] = host.positions
        kv_lens = np.zeros(seqs, np.int32)
        kv_lens[:num_seqs] = host.kv_lens
        page_indices = np.zeros((seqs, self.pages_per_seq), np.int32)
        for i, pages in enumerate(host.page_indices):
            page_indices[i, : len(pages)] = pages
        cu_q_lens = np.zeros(seqs + 1, np.int32)
        cu_q_lens[1 : num_seqs + 1] = np.cumsum(host.q_lens)
        cu_q_lens[num_seqs + 1 :] = cu_q_lens[num_seqs]
        logits_indices = np.zeros(seqs, np.int32)
        logits_indices[:num_seqs] = cu_q_lens[1 : num_seqs + 1] - 1
        sampling = SamplingBatch.pad(host.sampling, seqs)
        meta = AttentionMetadata(kv_lens, page_indices, cu_q_lens, np.array([num_seqs], np.int32))
        rope = rope_tables(positions, *self._rope_frequencies, xp=np)
        return StepBatch(input_ids, positions, meta, logits_indices, SamplingBatch(**sampling), rope)

    def run(self, host: HostBatch) -> np.ndarray:
        """Run one step; returns the sampled token of each sequence (`int32[num_seqs]`)."""
        # Host arrays go straight into the jit call: an explicit device_put of the batch cost ~0.7 ms.
        tokens = self._run(self._pad(host, *self.bucket(len(host.input_ids), len(host.kv_lens))))
        return np.asarray(tokens)[: len(host.kv_lens)]

    def _run(self, batch: StepBatch) -> jax.Array:
        tokens, kv = self._step(self._param_leaves, self.kv_pages, batch)
        self.kv_pages = self._write_kv(self.kv_pages, kv) if self.deferred_kv else kv
        return tokens

    def precompile(self, progress: bool = True) -> float:
        """Compile (and run once, on an all-padding batch that writes nothing) every bucket."""
        start = time.perf_counter()
        empty = HostBatch(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), [],
                          np.zeros(0, np.int32), {})
        for tokens, seqs in tqdm(self.buckets(), desc="Compiling step buckets", disable=not progress):
            self._run(self._pad(empty, tokens, seqs)).block_until_ready()
        return time.perf_counter() - start

    def reset_kv_cache(self) -> None:
        self.kv_pages = allocate_kv_pages(self.kv_spec)
