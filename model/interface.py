"""What a runner may call on any model: the step's inputs and outputs, and the entry points per model kind.

Every model kind is served by the same runner and scheduler; what differs is the entry point the runner's
step calls after the forward pass:

| kind | class contract | the runner's step |
|---|---|---|
| causal LM (`task = "generate"`) | `forward(...)` then `logits(hidden rows)` | sample one token per sequence |
| pooling model (`task = "embed"` / `"score"`) | `forward(...)` then `pool(...)` | return one vector per sequence |
| encoder (bidirectional, no paged cache) | `encode(input_ids, positions, segment_ids, backend)` | pool, nothing cached |

A decoder's `forward` reads (and, for kernels that write in the step, updates) the paged KV cache and
returns a `ForwardOutput`. Optional auxiliary outputs of the step (a MoE router's expert choices) have
one declared place, `ForwardOutput.aux`, a dict of arrays with a leading layer axis; the runner hands
them to the host with the step's result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import jax

if TYPE_CHECKING:
    from kernels.attention import AttentionBackend
    from model.config import ModelConfig

# What a served model does with a request: sample tokens, return an embedding, return a score.
MODEL_TASKS = ("generate", "embed", "score")
# Aux outputs with a token axis after the layer axis (the runner trims the padding tokens off); the
# others (e.g. "expert_counts" int32[layers, experts]) are whole-step values.
PER_TOKEN_AUX = frozenset({"expert_ids"})


class AttentionMetadata(NamedTuple):
    """Where each sequence's KV lives; see docs/architecture.md for the exact meaning."""

    kv_lens: jax.Array  # int32[S]: each sequence's KV length after this step
    page_indices: jax.Array  # int32[S, pages_per_seq]
    cu_q_lens: jax.Array  # int32[S + 1]: prefix sums of the new-token counts
    num_seqs: jax.Array  # int32[1]: sequences past it are padding


class KVWrite(NamedTuple):
    """The step's K/V, not yet in the cache: `backend.write_layers(kv_pages, kv_write)` puts it there."""

    new_kv: jax.Array  # [layers, T, 2 * kv_heads, head_dim]
    page_indices: jax.Array
    seq: jax.Array
    pos: jax.Array
    valid: jax.Array


class StepInputs(NamedTuple):
    """One ragged step: the new tokens of every sequence, concatenated, and where their KV lives."""

    input_ids: jax.Array  # int32[T]
    positions: jax.Array  # int32[T]
    meta: AttentionMetadata
    rope: tuple[jax.Array, jax.Array] | None  # (cos, sin) for `positions`, built on the host; None: computed


class ForwardOutput(NamedTuple):
    hidden: jax.Array  # [T, hidden]: after the final norm
    kv: Any  # the updated cache (kernels that write in the step) or a `KVWrite` (the CPU path)
    aux: dict[str, jax.Array]  # auxiliary outputs, e.g. {"expert_ids": int32[layers, T, top_k]}; {} if none


class DecoderLayerModule(Protocol):
    """What `model.decoder.run_layers` calls for each layer of any decoder family."""

    def __call__(self, x, inputs: StepInputs, kv_pages, layer, backend: AttentionBackend, layout,
                 sliding_window: int | None = None):
        """-> `(x, kv, aux)`: `kv` as `AttentionBackend.step_attention` returns it, `aux` a dict.
        `sliding_window` is this layer's (static; `ModelConfig.layer_windows`)."""

    def fuse_projections(self) -> None:
        """Merge matmuls that read the same input (the CPU path); a family without any does nothing."""


class CausalLM(Protocol):
    task: str  # "generate"
    config: ModelConfig

    def forward(self, inputs: StepInputs, kv_pages, backend: AttentionBackend, layers=None) -> ForwardOutput: ...

    def logits(self, hidden_rows) -> jax.Array:
        """float32 `[S, vocab]` for the given rows of `ForwardOutput.hidden`."""


class PoolingModel(Protocol):
    task: str  # "embed" or "score"
    config: ModelConfig

    def forward(self, inputs: StepInputs, kv_pages, backend: AttentionBackend, layers=None) -> ForwardOutput: ...

    def pool(self, hidden, inputs: StepInputs) -> jax.Array:
        """float32 `[S, dim]`: one vector (an embedding, or scores) per sequence of the step."""


class EncoderModel(Protocol):
    task: str
    config: ModelConfig

    def encode(self, input_ids, positions, segment_ids, backend: AttentionBackend) -> jax.Array:
        """Hidden states `[T, hidden]` of a flat batch of whole sequences (no cache kept)."""
