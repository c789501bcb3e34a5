"""Where each param lives on a device mesh: param path -> `PartitionSpec` over the axes `tensor` and `expert`.

Megatron-style tensor parallelism, which XLA SPMD turns into one all-reduce after each row-parallel layer:

| params | spec (after any stacked layer / expert axis) | why |
|---|---|---|
| `q_proj`, `k_proj`, `v_proj` kernel `[in, heads * head_dim]` (+ bias) | columns over `tensor` | each shard holds whole heads (the head count is checked divisible) |
| `o_proj` kernel `[heads * head_dim, hidden]` | rows over `tensor` | consumes the local heads' outputs; partial sums all-reduced |
| `gate_proj`, `up_proj` (dense MLP, shared expert) | columns over `tensor` | SwiGLU is elementwise per column |
| `down_proj` (dense MLP, shared expert) | rows over `tensor` | as `o_proj` |
| routed experts `[E, in, out]` | experts over `tensor` x `expert` (every device of the mesh) | `model.qwen2_moe` runs them under `shard_map` |
| embeddings, LM head, norms, routers, q/k norms, heads of pooled models | replicated | see below |

Embeddings and LM head stay replicated: the step samples from full-vocabulary logits on every device
(penalties, grammar masks and logprobs all index the vocabulary), and a vocab-parallel head would add an
all-gather of `[S, vocab]` logits per step for a weight that is small next to the layers' at the sizes we
shard. The fused projections of the CPU path (`model.layers.FusedDense`: q|k|v, gate|up concatenated
column-wise) would put whole parts on one shard, so a sharded model is arranged unfused
(`model.decoder.arrange_params(fuse=False)`).
"""

from __future__ import annotations

from jax.sharding import PartitionSpec

TENSOR = "tensor"
EXPERT = "expert"
DATA = "data"
MESH_AXES = (DATA, TENSOR, EXPERT)
# The routed experts go over both model axes: with --tp-size alone a MoE model's experts (most of its
# weights) still split over the devices, and --ep-size adds devices that hold experts only.
EXPERT_DEVICES = (TENSOR, EXPERT)

_COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW_PARALLEL = ("o_proj", "down_proj")
_EXPERTS = "experts"


def param_spec(path: tuple[str, ...], ndim: int, *, stacked_axes: int) -> PartitionSpec:
    """The spec of param `path` (`("layers", "self_attn", "q_proj", "kernel")`, ...) with `ndim` dims, of
    which the first `stacked_axes` index layers (the scan's stacked params), not values."""
    lead = (None,) * stacked_axes
    if _EXPERTS in path:  # routed experts: [E, in, out] after the layer axis, over every device of the mesh
        return PartitionSpec(*lead, EXPERT_DEVICES, *(None,) * (ndim - stacked_axes - 1))
    module, leaf = (path[-2], path[-1]) if len(path) >= 2 else ("", path[-1])
    value_dims = ndim - stacked_axes
    if module in _COLUMN_PARALLEL:  # kernel [in, out] or bias [out]: the output columns
        return PartitionSpec(*lead, *(None,) * (value_dims - 1), TENSOR)
    if module in _ROW_PARALLEL and leaf == "kernel":  # [in, out]: the input rows; a bias stays whole
        return PartitionSpec(*lead, TENSOR, None)
    return PartitionSpec()


def kv_cache_spec(head_major: bool) -> PartitionSpec:
    """The KV cache over `tensor` by KV head: its `2 * kv_heads` axis (K/V interleaved per head, so each
    shard's block holds whole heads' K and V)."""
    if head_major:  # [layers, pages, 2 * kv_heads, page_size, head_dim]
        return PartitionSpec(None, None, TENSOR, None, None)
    return PartitionSpec(None, None, None, TENSOR, None)  # [layers, pages, page_size, 2 * kv_heads, head_dim]


HEADS = PartitionSpec(None, TENSOR, None)  # q / k / v / attention output `[T, heads, head_dim]`; new K/V rows
NEW_KV_LAYERS = PartitionSpec(None, None, TENSOR, None)  # `KVWrite.new_kv` `[layers, T, 2 * kv_heads, head_dim]`
