"""Attention backends as objects: what `--attention-backend` resolved to, and everything that follows from it.

`resolve_attention_backend` runs once (the runner calls it when it loads the model) and answers one
`AttentionBackend`. Every consequence of the choice is a property or method of that value, so no other
file asks which implementation runs:

| implementation | cache layout | storage of a bfloat16 cache | K stored | KV written |
|---|---|---|---|---|
| `tpu`, `gpu` (Pallas) | token-major | bfloat16 | as is | per layer, inside the step |
| `cpu` (native kernel) | head-major | uint16 bits | transposed per page | once per step, after it |
| `reference` (jnp) | head-major | uint16 bits | as is | once per step, after it |

Why the CPU path writes after the step: with the write inside the step XLA:CPU copied the whole cache
(docs/architecture.md). The value is hashable and holds no arrays, so it is a static argument of the jits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kernels.attention import cache_layout, encoder, reference
from kernels.attention.dispatch import resolve_backend
from kernels.shard_map import shard_map
from model.sharding import HEADS, NEW_KV_LAYERS, kv_cache_spec


@dataclass(frozen=True)
class AttentionBackend:
    """One resolved attention implementation for one cache dtype.

    `name`: 'tpu', 'gpu', 'cpu' or 'reference'; `requested`: the flag's value it came from; `interpret`:
    a Pallas kernel run in interpret mode off its own platform; `cache_dtype`: the dtype of the values the
    cache holds; `writes_in_step`: the Pallas kernels write their token-major cache in place inside the
    step; the others read a head-major cache and hand the step's K/V back as a `KVWrite`. The reference
    can do either (`with_in_step_write`), which is how tests compare the two paths.

    `mesh`: with tensor parallelism (`serving.mesh`), q / k / v and the cache arrive split by head over
    the mesh's `tensor` axis, and every implementation runs once per shard on its own heads under
    `shard_map` (a custom call or Pallas kernel cannot be partitioned by XLA SPMD)."""

    name: str
    requested: str = "auto"
    interpret: bool = False
    cache_dtype: jnp.dtype = field(default=jnp.dtype(jnp.float32))
    writes_in_step: bool = False
    mesh: jax.sharding.Mesh | None = None

    @property
    def label(self) -> str:
        """What runs, as `/get_server_info` reports it: cpu, reference, pallas_tpu or pallas_gpu, with
        `_interpret` when a Pallas kernel runs in interpret mode off its own platform."""
        if self.name in ("tpu", "gpu"):
            return f"pallas_{self.name}" + ("_interpret" if self.interpret else "")
        return self.name

    @property
    def head_major(self) -> bool:
        return not self.writes_in_step

    @property
    def k_transposed(self) -> bool:
        """The native kernel reads each page's K block as K^T in place (`cache_layout.write_kv_layers`)."""
        return self.name == "cpu" and not self.writes_in_step

    @property
    def storage_dtype(self) -> jnp.dtype:
        """The cache array's dtype: bfloat16 is kept as uint16 bits on the head-major path."""
        return cache_layout.storage_dtype(self.cache_dtype) if self.head_major else jnp.dtype(self.cache_dtype)

    def with_in_step_write(self) -> AttentionBackend:
        """The same implementation over a token-major cache written inside the step (reference / cpu /
        Pallas all take that contract)."""
        return AttentionBackend(self.name, self.requested, self.interpret, self.cache_dtype, True, self.mesh)

    # -- inside the step -----------------------------------------------------------------------------
    def step_attention(self, q, k, v, kv_pages, layer, meta, layout, *, sm_scale, sliding_window=None,
                       soft_cap=None):
        """Attend the step's tokens (`q`/`k`/`v` `[T, heads, D]`) over the paged cache, causally.

        Returns `(out, kv)`: with `writes_in_step`, `kv` is the updated cache; otherwise the cache is only
        read and `kv` is this layer's new K/V rows (`[T, 2 * kv_heads, D]`) for `write_layers`. `layout`
        is `cache_layout.token_layout(...)` of the step (the read-only path computes it once per step)."""
        options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        if self.mesh is not None:
            cache = kv_cache_spec(self.head_major)
            local = functools.partial(self._local_step_attention, **options)
            replicated = PartitionSpec()
            return shard_map(local, self.mesh, in_specs=(HEADS, HEADS, HEADS, cache, replicated, replicated, replicated),
                             out_specs=(HEADS, cache if self.writes_in_step else HEADS))(
                q, k, v, kv_pages, layer, tuple(meta), layout)
        return self._local_step_attention(q, k, v, kv_pages, layer, meta, layout, **options)

    def _local_step_attention(self, q, k, v, kv_pages, layer, meta, layout, **options):
        if self.writes_in_step:
            return self._attend_and_write(q, k, v, kv_pages, layer, *meta, **options)
        out = self._read_only_attention()(q, k, v, kv_pages, layer, *meta, layout=layout, cache_is_finite=True,
                                          **options)
        return out, cache_layout.interleave_kv(k, v)

    def _read_only_attention(self):
        if self.name == "cpu":
            from kernels.attention import cpu

            return functools.partial(cpu.attend, k_transposed=self.k_transposed)
        if self.name == "reference":
            return reference.attend
        raise ValueError(f"the {self.name} attention kernel writes its cache inside the step")

    def _attend_and_write(self, q, k, v, kv_pages, layer, *meta, **options):
        args = (q, k, v, kv_pages, layer, *meta)
        if self.name == "reference":
            return reference.ragged_paged_attention(*args, **options)
        if self.name == "cpu":
            from kernels.attention import cpu

            return cpu.ragged_paged_attention(*args, **options)
        if self.name == "tpu":
            from kernels.attention import tpu

            return tpu.ragged_paged_attention(*args, **options, interpret=self.interpret)
        from kernels.attention import gpu

        return gpu.ragged_paged_attention(*args, **options, interpret=self.interpret)

    def step_layout(self, meta, num_tokens: int):
        """Per-token (sequence, position, valid) of the step, once for every layer (None when the kernels
        derive it themselves). Materialized: fused into every layer's masks, the sequence lookup was
        recomputed per element."""
        if self.writes_in_step:
            return None
        return jax.lax.optimization_barrier(
            cache_layout.token_layout(meta.kv_lens, meta.cu_q_lens, meta.num_seqs, num_tokens))

    # -- after the step --------------------------------------------------------------------------------
    def write_layers(self, kv_pages, kv_write):
        """Apply a step's `KVWrite` to the head-major cache (the runner's second, cache-donating jit)."""
        write = functools.partial(cache_layout.write_kv_layers, k_transposed=self.k_transposed)
        if self.mesh is None:
            return write(kv_pages, *kv_write)
        cache, replicated = kv_cache_spec(self.head_major), PartitionSpec()
        return shard_map(write, self.mesh, in_specs=(cache, NEW_KV_LAYERS) + (replicated,) * 4, out_specs=cache)(
            kv_pages, *kv_write)

    # -- no paged cache --------------------------------------------------------------------------------
    def encoder_attention(self, q, k, v, segment_ids, *, sm_scale, causal: bool = False):
        """Attention within each segment of a flat batch, without a paged cache (bidirectional encoders,
        e.g. cross-encoder rerankers); plain jnp on every platform for now."""
        return encoder.segment_attention(q, k, v, segment_ids, sm_scale=sm_scale, causal=causal)


def resolve_attention_backend(requested: str, *, head_dim: int, page_size: int, num_kv_heads: int, cache_dtype,
                              platform: str | None = None) -> AttentionBackend:
    """The flag's value and the platform -> the backend that will run (after any fallback, logged once)."""
    name, interpret = resolve_backend(requested, head_dim=head_dim, page_size=page_size, num_kv_heads=num_kv_heads,
                                      dtype=cache_dtype, platform=platform)
    return AttentionBackend(name, requested, interpret, jnp.dtype(cache_dtype), writes_in_step=name in ("tpu", "gpu"))
