"""The Qwen MoE decoder family: Qwen2-MoE (Qwen1.5-MoE: shared expert behind a sigmoid gate) and Qwen3-MoE.

Attention is Llama's (`model.llama.LlamaAttention`: Qwen2-MoE has q/k/v biases, Qwen3-MoE q/k RMSNorm).
The MLP is a routed mixture of experts through `kernels.moe`: softmax router, top-k (renormalised when
`norm_topk_prob`), the token copies sorted by expert, two grouped matmuls (gate/up, down) over the stacked
`[E, ...]` expert weights, and the weighted sum back per token; never a loop over experts. Padding tokens
are sorted past every expert, so they cost no expert work and are never counted.

Every layer returns, as its auxiliary output (`model.interface.ForwardOutput.aux`), the router's choices:
`expert_counts int32[E]` (how many valid tokens chose each expert, computed on device) and `expert_ids
int32[T, top_k]` (-1 for padding). The runner copies only the ones the expert recorder asks for; unused
outputs are dropped by XLA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from checkpoints.name_maps import DEFAULT_DECODER_MAP, ExpertRule, WeightNameMap
from kernels.moe import combine, grouped_matmul, select_experts, sort_by_expert
from kernels.shard_map import shard_map
from model.config import ConfigError, ModelConfig
from model.decoder import DecoderModel
from model.interface import StepInputs
from model.layers import Dense, GatedMLP
from model.llama import LlamaDecoderLayer
from model.sharding import EXPERT_DEVICES


class StackedKernel(nnx.Module):
    """One `[E, in, out]` param named `kernel` (so a torch Linear `weight` maps onto it, transposed)."""

    def __init__(self, value):
        self.kernel = nnx.Param(value)


class ExpertWeights(nnx.Module):
    """Every expert's SwiGLU weights, stacked: `gate_proj.kernel` / `up_proj.kernel` `[E, hidden, inter]`,
    `down_proj.kernel` `[E, inter, hidden]` (the checkpoint's per-expert torch Linear weights, transposed)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        def stacked(k, n):
            return StackedKernel(jax.random.normal(rngs.params(), (num_experts, k, n), dtype) / math.sqrt(k))

        self.gate_proj = stacked(hidden, intermediate)
        self.up_proj = stacked(hidden, intermediate)
        self.down_proj = stacked(intermediate, hidden)
        self.gate_up_proj = None

    def fuse_projections(self) -> None:
        """gate and up as one `[E, hidden, 2 * inter]` grouped matmul (one pass over the sorted tokens)."""
        fused = jnp.concatenate([self.gate_proj.kernel[...], self.up_proj.kernel[...]], axis=-1)
        self.gate_up_proj = nnx.data(StackedKernel(fused))
        self.gate_proj = self.up_proj = None

    def input_kernels(self) -> tuple:
        """The kernels that read the layer's input: `(gate_up,)` fused, else `(gate, up)`."""
        if self.gate_up_proj is not None:
            return (self.gate_up_proj.kernel[...],)
        return self.gate_proj.kernel[...], self.up_proj.kernel[...]


def routed_experts(experts: ExpertWeights, x, weights, expert_ids, valid, *, backend: str):
    """`[T, hidden]`: each valid token's top-k experts, weighted; padding rows are zeros.

    The one place the experts run (the benchmark swaps in a dense loop here to compare)."""
    return _experts_from(experts.input_kernels(), experts.down_proj.kernel[...], x, weights, expert_ids, valid,
                         0, backend=backend)


def expert_parallel_experts(experts: ExpertWeights, x, weights, expert_ids, valid, *, backend: str, mesh):
    """`routed_experts` with the experts split over the devices of `mesh` (`model.sharding.EXPERT_DEVICES`:
    its `tensor` and `expert` axes): every device holds all tokens (they are replicated, so no all-to-all
    is needed to bring them), runs only the copies routed to its own experts, and a `psum` adds the
    devices' partial outputs."""
    input_kernels = experts.input_kernels()

    def shard(x, weights, expert_ids, valid, input_kernels, down):
        first_expert = jax.lax.axis_index(EXPERT_DEVICES) * down.shape[0]
        out = _experts_from(input_kernels, down, x, weights, expert_ids, valid, first_expert, backend=backend)
        return jax.lax.psum(out, EXPERT_DEVICES)

    whole, by_expert = PartitionSpec(), PartitionSpec(EXPERT_DEVICES, None, None)
    return shard_map(shard, mesh, in_specs=(whole, whole, whole, whole, (by_expert,) * len(input_kernels),
                                            by_expert), out_specs=whole)(
        x, weights, expert_ids, valid, input_kernels, experts.down_proj.kernel[...])


def _experts_from(input_kernels: tuple, down, x, weights, expert_ids, valid, first_expert, *, backend: str):
    """The contribution of experts `[first_expert, first_expert + len(down))` (all of them on one device):
    copies routed elsewhere, and padding tokens, sort past every local expert and cost no work."""
    num_local = down.shape[0]
    local = expert_ids - first_expert
    mine = valid[:, None] & (local >= 0) & (local < num_local)
    plan = sort_by_expert(jnp.where(mine, local, num_local), num_local)
    x_sorted = x[plan.token_of_row]
    products = [grouped_matmul(x_sorted, kernel, plan.group_sizes, backend=backend) for kernel in input_kernels]
    gate, up = jnp.split(products[0], 2, axis=-1) if len(products) == 1 else products
    y_sorted = grouped_matmul(jax.nn.silu(gate) * up, down, plan.group_sizes, backend=backend)
    return combine(y_sorted, plan, weights)


def expert_counts(expert_ids, valid, num_experts: int):
    """int32[E]: how many valid tokens chose each expert (padding tokens never count)."""
    ids = jnp.where(valid[:, None], expert_ids, num_experts)
    return jnp.bincount(ids.reshape(-1), length=num_experts + 1)[:num_experts].astype(jnp.int32)


class SparseMoeBlock(nnx.Module):
    """Router (`gate`), routed experts, and Qwen2-MoE's shared expert scaled by `sigmoid(shared_expert_gate(x))`."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs, moe_backend: str = "auto"):
        hidden = config.hidden_size
        self.gate = Dense(hidden, config.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = ExpertWeights(config.num_experts, hidden, config.moe_intermediate_size, dtype=dtype, rngs=rngs)
        shared = config.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(hidden, shared, dtype=dtype, rngs=rngs) if shared else None
        self.shared_expert_gate = Dense(hidden, 1, bias=False, dtype=dtype, rngs=rngs) if shared else None
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.moe_backend = moe_backend
        self.expert_mesh = None  # the device mesh the experts are split over (static, set by the model)

    def fuse_projections(self) -> None:
        self.experts.fuse_projections()
        if self.shared_expert is not None:
            self.shared_expert.fuse_projections()

    def __call__(self, x, valid):
        """-> `(out[T, hidden], aux)`."""
        # The router in the model dtype, softmax and top-k in float32, as transformers does.
        weights, ids = select_experts(self.gate(x), self.top_k, renormalize=self.renormalize)
        if self.expert_mesh is None:
            out = routed_experts(self.experts, x, weights.astype(x.dtype), ids, valid, backend=self.moe_backend)
        else:
            out = expert_parallel_experts(self.experts, x, weights.astype(x.dtype), ids, valid,
                                          backend=self.moe_backend, mesh=self.expert_mesh)
        if self.shared_expert is not None:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        num_experts = self.gate.kernel.shape[-1]
        aux = {"expert_counts": expert_counts(ids, valid, num_experts),
               "expert_ids": jnp.where(valid[:, None], ids, -1)}
        return out, aux


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with the sparse MoE block as its feed-forward."""

    def make_mlp(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
        return SparseMoeBlock(config, dtype=dtype, rngs=rngs)

    def feed_forward(self, x, inputs: StepInputs):
        # Rows past the step's last token are padding (the runner pads T to a bucket).
        valid = jnp.arange(x.shape[0], dtype=jnp.int32) < inputs.meta.cu_q_lens[inputs.meta.num_seqs[0]]
        return self.mlp(x, valid)


QWEN_MOE_MAP = WeightNameMap(
    prefixes=DEFAULT_DECODER_MAP.prefixes,
    stacked=DEFAULT_DECODER_MAP.stacked,
    renames=DEFAULT_DECODER_MAP.renames,
    ignored=DEFAULT_DECODER_MAP.ignored,
    tied_embedding_names=DEFAULT_DECODER_MAP.tied_embedding_names,
    # `model.layers.3.mlp.experts.5.up_proj.weight` -> row (3, 5) of `layers.mlp.experts.up_proj.kernel`.
    experts=(ExpertRule("mlp.experts.{expert}.", "mlp.experts."),),
)


class Qwen2MoeForCausalLM(DecoderModel):
    """Also registered for Qwen3MoeForCausalLM: the config switches biases, q/k norm and the shared expert.

    `moe_backend` is `--moe-backend` (`kernels.moe.resolve_backend`); the runner passes it to classes
    that set `takes_moe_backend`."""

    layer_class = Qwen2MoeDecoderLayer
    weight_name_map = QWEN_MOE_MAP
    takes_moe_backend = True

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 moe_backend: str = "auto", expert_mesh=None):
        if not config.num_experts:
            raise ConfigError(f"{config.architecture}: config.json has no num_experts")
        if not all(config.sparse_layers):
            # The layers are stacked (one scan over identical params), so every layer must be a MoE layer.
            dense = [i for i, sparse in enumerate(config.sparse_layers) if not sparse]
            raise ConfigError(f"{config.architecture}: dense MLP layers {dense} (mlp_only_layers / "
                              f"decoder_sparse_step={config.decoder_sparse_step}) between MoE layers are not "
                              "supported yet; every layer must be a MoE layer")
        super().__init__(config, dtype=dtype, rngs=rngs)
        # A static attribute of the (stacked) layers: part of the graph the runner's step is traced from.
        self.layers.mlp.moe_backend = moe_backend
        self.layers.mlp.expert_mesh = expert_mesh  # `expert_parallel_experts` when the experts are split
