"""Loads the model and runs one jitted step per scheduler iteration.

`(params, kv_pages, batch) -> (result, kv_pages)` with `kv_pages` donated, so the cache is a value updated
in place. One step per task kind: `sample` (causal LMs: one token per sequence) and `pool` (one vector per
sequence). Token counts and sequence counts are padded to power-of-two buckets, all compiled at start-up
for the model's task (with a progress bar, and persisted in JAX's compilation cache so a second start is
fast). The attention backend is resolved once, here; it decides the cache layout and whether a second jit
writes the step's K/V after it (the CPU path).
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints.load import load_checkpoint
from checkpoints.name_maps import weight_name_map_for
from kernels.attention import resolve_attention_backend
from kernels.dense import in_dense_scope, resolve_dense_backend
from model.config import ModelConfig
from model.decoder import arrange_params
from model.decoder_pooling import pooling_for
from model.interface import PER_TOKEN_AUX, AttentionMetadata, StepInputs
from model.layers import rope_inverse_frequencies, rope_tables
from model.registry import model_class_for
from serving import host_arena
from serving.config import RuntimeConfig
from serving.executable_cache import ExecutableCache, PreparedFunction
from serving.expert_stats import aux_outputs_for
from serving.kv_cache import KVCacheSpec, allocate_kv_pages, kv_pages_future, params_bytes, plan_kv_cache
from serving.logprobs import LogprobBatch
from serving.mesh import device_memory, plan_placement
from serving.params_cache import ParamsCache
from serving.penalties import PenaltyBatch, apply_penalties
from serving.precompile import precompile_buckets
from serving.sampler import SamplingBatch, sample
from serving.steps import (
    HostBatch,
    StepBatch,
    _encode_step,
    _keep_aux,
    _logprob_step,
    _pool_step,
    _sample_step,
    next_pow2,
)

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model_dir: Path, config: RuntimeConfig, executable_cache_dir: Path | None = None,
                 devices: list | None = None, params_cache_dir: Path | None = None):
        """`devices`: the device group this runner's params and cache go on (a data-parallel replica's,
        serving/replicas.py); default all of `jax.devices()`, the first `tp x ep` of them used.
        `params_cache_dir`: where arranged params are kept for the next start (serving/params_cache.py)."""
        self.model_dir = Path(model_dir)
        self.runtime = config
        self.config = ModelConfig.from_dir(self.model_dir)
        self.dtype = config.model_dtype(self.config.torch_dtype)
        self.kv_dtype = config.cache_dtype(self.dtype)
        self.model_class = model_class_for(self.config, config.is_embedding)
        # An encoder's position table bounds its length (XLM-R numbers tokens from pad_token_id + 1).
        max_context = getattr(self.model_class, "context_length", lambda c: c.max_position_embeddings)
        self.context_length = config.context_length or max_context(self.config)
        inv_freq, attention_factor = rope_inverse_frequencies(self.config.head_dim, self.config.rope_theta,
                                                              self.config.rope_scaling)
        self._rope_frequencies = (np.asarray(inv_freq), attention_factor)
        self.task = self.model_class.task
        self.is_encoder = hasattr(self.model_class, "encode")  # no paged cache: `_encode_step`
        # (method, normalize) of a pooled model, from its checkpoint (model.decoder_pooling.pooling_for).
        self.pooling = None if self.task == "generate" else pooling_for(self.model_class, self.model_dir)
        # Where params and cache live: one device, or a mesh for --tp-size / --ep-size (serving.mesh).
        self.placement = plan_placement(self.config, tp_size=config.tp_size, ep_size=config.ep_size,
                                        is_encoder=self.is_encoder, devices=devices)
        self._abstract = self._abstract_model(self.config)
        # What the step runs: the checkpoint's model, or with KV heads replicated (tp above the KV heads).
        served = self.placement.served_config(self.config)
        self._served_abstract = self._abstract if served is self.config else self._abstract_model(served)
        shards = self.placement.kv_head_shards  # each attention call sees its shard's KV heads
        self.attention = resolve_attention_backend(
            config.attention_backend, head_dim=self.config.head_dim, page_size=config.page_size,
            num_kv_heads=served.num_kv_heads // shards, cache_dtype=self.kv_dtype, platform=config.platform)
        if shards > 1:
            self.attention = dataclasses.replace(self.attention, mesh=self.placement.mesh)
        if self.attention.writes_in_step and self.kv_dtype != self.dtype:
            raise ValueError(f"--kv-cache-dtype {config.kv_cache_dtype} with a {jnp.dtype(self.dtype).name} model: "
                             f"the {self.attention.name.upper()} attention kernel takes q, k, v and the cache in "
                             "one dtype; use --dtype bfloat16 or --attention-backend reference")
        # Each param's sharding, fixed for the server's life: a swap or a resume places new params there too.
        self._param_shardings = self.placement.param_shardings(self._served_abstract)
        self._load_shardings = self.placement.load_shardings(self._param_shardings)
        self.params_file: Path | None = None  # the arranged-params file the params were mapped from
        self.params_saving = None  # the thread writing that file for the next start
        self.params, self._bound = self._load_arranged(params_cache_dir if self.placement.mesh is None else None)
        self.weight_bytes = params_bytes(self.params)
        per_device_weights = max(entry["weights_bytes"] for entry in device_memory(self.placement, self.params, None))
        # Linear layers and the LM head: the native CPU kernel or XLA's dot, for every jit below (`_jit`).
        self.dense_backend = resolve_dense_backend(config.dense_backend, platform=config.platform,
                                                   num_devices=len(self.placement.devices))

        self.max_seqs = next_pow2(config.max_running_requests)
        self.max_tokens = next_pow2(max(config.max_step_tokens, self.max_seqs))
        self.kv_spec: KVCacheSpec = plan_kv_cache(
            served, page_size=config.page_size, weight_bytes=per_device_weights, kv_head_shards=shards,
            dtype=self.attention.storage_dtype, max_total_tokens=config.max_total_tokens,
            mem_fraction_static=config.mem_fraction_static, max_running_requests=config.max_running_requests,
            context_length=self.context_length, head_major=self.attention.head_major,
        )
        self.page_size = config.page_size
        self.pages_per_seq = -(-self.context_length // config.page_size)
        self._kv_sharding = self.placement.kv_cache_sharding(self.kv_spec.head_major)
        self._kv_pending: Future | None = kv_pages_future(self.kv_spec, self._kv_sharding)
        self.last_aux: dict[str, np.ndarray] = {}  # the last step's auxiliary outputs (model.interface)
        self.last_logprobs: dict | None = None  # the last step's logprob numbers, when it computed any
        # The aux outputs the step returns (the expert recorder's), and who gets them after each `run`.
        self.aux_names = aux_outputs_for(config.expert_recorder_mode)
        self.aux_sink = None  # Callable[[dict[str, np.ndarray], HostBatch], None]
        static = (self._bound, self._param_treedef, self.attention)
        # The CPU path's step only reads the cache (nothing to donate); the Pallas kernels update it in place.
        donate = () if self.attention.head_major else (1,)
        # The bucketed jits `precompile` prepares: executables loaded from `executable_cache_dir` when a
        # previous start with the same code and configuration saved them (serving/executable_cache.py).
        # Only for a model on one device: executables prepared from shapes alone carry no mesh shardings.
        if self.placement.mesh is not None:
            executable_cache_dir = None
        executables = ExecutableCache(executable_cache_dir, f"{self.config!r}\n{config!r}\n"
                                      f"{jnp.dtype(self.dtype).name}\n{self.aux_names}\n{self.dense_backend}",
                                      device=self.placement.devices[0])
        self._executables = executables
        self._step = PreparedFunction("step", self._jit(
            partial(_keep_aux, partial(_sample_step, *static), self.aux_names), donate_argnums=donate),
            executables, skip=1)
        # Only for steps where a request asks for penalties or logprobs, each on the step's device outputs.
        # Separate small jits so a new width of an id list compiles in a fraction of a second: the
        # penalties (per width), the sampler (once per sequence bucket), the logprobs (per width).
        self._penalise = jax.jit(apply_penalties)
        self._resample = PreparedFunction("resample", jax.jit(sample), executables)
        self._logprobs = self._jit(partial(_logprob_step, self._bound, self._param_treedef),
                                   static_argnames=("num_top",))
        self._pool_steps: dict[tuple[str, bool], object] = {}
        self._pool_static = static
        self._write_kv = PreparedFunction("write_kv", jax.jit(self.attention.write_layers, donate_argnums=(0,)),
                                          executables)
        logger.info(
            "Model %s loaded: %s, %.1f MB of weights; KV cache %d pages x %d tokens, %s (%.1f MB); attention: %s; "
            "dense: %s", self.config.architecture, jnp.dtype(self.dtype).name, self.weight_bytes / 1e6,
            self.kv_spec.num_pages, config.page_size, jnp.dtype(self.kv_dtype).name,
            self.kv_spec.total_bytes / 1e6, self.attention.name, self.dense_backend,
        )

    def _jit(self, fn, **options):
        """`jax.jit` of a function that runs the model: its products trace on the resolved dense backend."""
        return jax.jit(partial(in_dense_scope, self.dense_backend, fn), **options)

    @property
    def kv_pages(self) -> jax.Array:
        if self._kv_pending is not None:
            self._kv_pages, self._kv_pending = self._kv_pending.result(), None
        return self._kv_pages

    @kv_pages.setter
    def kv_pages(self, value: jax.Array) -> None:
        self._kv_pending, self._kv_pages = None, value

    def wait_for_kv_cache(self) -> None:
        """Until the cache's zeros are written (an allocation failure raises here)."""
        jax.block_until_ready(self.kv_pages)

    def _abstract_model(self, config: ModelConfig):
        cls = model_class_for(config, self.runtime.is_embedding)
        options = {}
        if getattr(cls, "takes_moe_backend", False):
            options = {"moe_backend": self.runtime.moe_backend, "expert_mesh": self.placement.mesh}
        return nnx.eval_shape(lambda: cls(config, dtype=self.dtype, rngs=nnx.Rngs(0), **options))

    @property
    def abstract_model(self):
        """The model's structure without arrays (param paths and shapes, the unarranged layout)."""
        return self._abstract

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

    def _load(self, model_dir: Path):
        return load_checkpoint(self._abstract, model_dir, self.dtype, sharding_for=self._load_shardings.__getitem__)

    def _load_arranged(self, cache_dir: Path | None):
        """(params, bound): from the arranged-params file of a previous start when there is one, else read
        from the checkpoint, arranged, and written there for the next start (in the background)."""
        cache = ParamsCache(cache_dir, self.model_dir, f"{self.model_class.__name__}\n{self.config!r}\n"
                            f"{self.runtime!r}\n{jnp.dtype(self.dtype).name}")
        if cache.path is not None and cache.path.exists():
            bound = []

            def arrange(state):
                params, static = self._arrange(state)
                bound.append(static)
                return params

            params = cache.load(jax.eval_shape(arrange, nnx.state(self._abstract, nnx.Param)), self.placement.devices[0])
            if params is not None:
                logger.info("Arranged params read from %s", cache.path)
                self.params_file = cache.path
                return params, bound[0]
        params, bound = self._arrange(self._load(self.model_dir))
        params = self._on_host_arena(params)
        self.params_saving = cache.save_in_background(params)
        return params, bound

    def _on_host_arena(self, params):
        """On one CPU device, the params moved into one huge-page host allocation (serving/host_arena.py:
        a single decode stream reads them faster there)."""
        if not host_arena.applies(self.placement.devices, self.placement.mesh):
            return params
        return host_arena.gather(params, self.placement.devices[0])

    def _arrange(self, state):
        """Params arranged for the step (KV heads replicated where the placement says); unfused on a mesh
        (`model.sharding` says why)."""
        state = self.placement.replicate_kv_heads(state, self._param_shardings, self.config.head_dim)
        return arrange_params(self._served_abstract, state, unroll=self.runtime.unroll_layers,
                              fuse=self.placement.mesh is None)

    def device_memory(self) -> list[dict]:
        """Per device of the placement, the bytes of params and KV cache on it (`/get_server_info`)."""
        return device_memory(self.placement, self._param_leaves, self.kv_pages)

    def read_weights(self, model_dir: Path):
        """Load another checkpoint (safetensors or Orbax) of the same architecture and shapes onto the
        served params' shardings, arranged as they are (for a weight swap); the served params are
        untouched. A checkpoint that does not fit names the first Hugging Face tensor that differs."""
        config = ModelConfig.from_dir(model_dir)
        if config.architecture != self.config.architecture:
            raise ValueError(f"architecture differs: serving {self.config.architecture}, new checkpoint "
                             f"{config.architecture}")
        theirs = dict(nnx.to_flat_state(nnx.state(self._abstract_model(config), nnx.Param)))
        name_map = weight_name_map_for(self._abstract)
        for path, mine in nnx.to_flat_state(nnx.state(self._abstract, nnx.Param)):
            other = theirs.get(path)
            if other is None or other.shape != mine.shape:
                path = tuple(str(k) for k in path)
                theirs_shape = None if other is None else name_map.to_hf_shape(path, other.shape)
                raise ValueError(f"tensor {name_map.to_hf_name(path)!r} has shape {theirs_shape} in the new checkpoint, "
                                 f"{name_map.to_hf_shape(path, mine.shape)} in the served model")
        params, _ = self._arrange(self._load(Path(model_dir)))
        return self._on_host_arena(params)

    # -- releasing and restoring device memory (serving/memory.py) ------------------------------
    @property
    def params_released(self) -> bool:
        return any(leaf.is_deleted() for leaf in self._param_leaves)

    def release_params(self) -> None:
        """Delete every param's device buffer (the structure stays, so `params = ...` restores them)."""
        for leaf in self._param_leaves:
            leaf.delete()

    def release_kv_cache(self) -> None:
        """Delete the KV cache's device buffer; `reset_kv_cache` allocates a fresh one."""
        self.kv_pages.delete()

    @property
    def kv_cache_released(self) -> bool:
        return self.kv_pages.is_deleted()

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
        # Rope tables on the host: inside the jit XLA:CPU fused cos / sin into every layer's rotation.
        rope = rope_tables(positions, *self._rope_frequencies, xp=np)
        return StepBatch(StepInputs(input_ids, positions, meta, rope), logits_indices, SamplingBatch(**sampling))

    def _padded(self, host: HostBatch) -> StepBatch:
        return self._pad(host, *self.bucket(len(host.input_ids), len(host.kv_lens)))

    def run(self, host: HostBatch) -> np.ndarray:
        """Run one sampling step; returns the sampled token of each sequence (`int32[num_seqs]`)."""
        # Host arrays go straight into the jit call: an explicit device_put of the batch cost ~0.7 ms.
        batch = self._padded(host)
        tokens, raw_logits, hidden = self._run(self._step, batch, len(host.input_ids))
        self.last_logprobs = None
        seqs = len(batch.logits_indices)
        if host.penalties is not None or host.token_bitmask is not None:
            # Penalties and grammar masks apply to the step's logits in a small jit of their own: the model
            # step never compiles a variant for them (a grammar-masked step doubled the start-up compile).
            logits = raw_logits
            if host.penalties is not None:
                logits = self._penalise(raw_logits, PenaltyBatch(**PenaltyBatch.pad(host.penalties, seqs)))
            tokens = self._resample(logits, batch.sampling, _pad_rows(host.token_bitmask, seqs))
        if host.logprobs is not None:
            logprobs = LogprobBatch(**LogprobBatch.pad(host.logprobs, seqs))
            num_top = min(host.num_top, raw_logits.shape[-1])  # the padded width may pass the vocabulary
            numbers = self._logprobs(self._param_leaves, raw_logits, hidden, tokens, logprobs, num_top=num_top)
            self.last_logprobs = jax.tree.map(np.asarray, numbers)
        if self.aux_sink is not None and self.last_aux:
            self.aux_sink(self.last_aux, host)
        return np.asarray(tokens)[: len(host.kv_lens)]

    def run_pool(self, host: HostBatch, *, method: str | None = None, normalize: bool | None = None) -> np.ndarray:
        """Run one pooling step (every sequence whole in it); returns float32 `[num_seqs, dim]`. The
        method and normalisation default to the served model's (`self.pooling`)."""
        default_method, default_normalize = self.pooling or ("last", False)
        method = default_method if method is None else method
        normalize = default_normalize if normalize is None else normalize
        pooled = self._run_pooled(self._padded(host), len(host.input_ids), host.q_lens, method, normalize)
        return np.asarray(pooled)[: len(host.kv_lens)]

    def _run_pooled(self, batch: StepBatch, num_tokens: int, q_lens: np.ndarray, method: str, normalize: bool):
        key = (method, normalize)
        if key not in self._pool_steps:
            if self.is_encoder:
                step = self._jit(partial(_encode_step, *self._pool_static, method, normalize))
            else:  # the same aux filtering as the sampling step: only what the recorder asks leaves the device
                step = self._jit(partial(_keep_aux, partial(_pool_step, *self._pool_static, method, normalize),
                                         self.aux_names), donate_argnums=() if self.attention.head_major else (1,))
            self._pool_steps[key] = step
        if not self.is_encoder:
            return self._run(self._pool_steps[key], batch, num_tokens)
        segment_ids = np.full(len(batch.inputs.input_ids), -1, np.int32)  # padding rows: -1
        segment_ids[:num_tokens] = np.repeat(np.arange(len(q_lens), dtype=np.int32), q_lens)
        return self._pool_steps[key](self._param_leaves, batch, segment_ids)

    def _run(self, step, batch: StepBatch, num_tokens: int):
        result, kv, aux = step(self._param_leaves, self.kv_pages, batch)
        self.kv_pages = self._write_kv(self.kv_pages, kv) if self.attention.head_major else kv
        # Auxiliary outputs (none for dense models) come back only when a model declares them.
        self.last_aux = {name: np.asarray(value)[:, :num_tokens] if name in PER_TOKEN_AUX else np.asarray(value)
                         for name, value in aux.items()}
        return result

    def precompile(self, progress: bool = True, token_bitmask_width: int | None = None) -> float:
        """Prepare every bucket of the model's step at start-up (serving/precompile.py); the seconds it took."""
        return precompile_buckets(self, progress=progress, token_bitmask_width=token_bitmask_width)

    def reset_kv_cache(self) -> None:
        self.kv_pages = allocate_kv_pages(self.kv_spec, self._kv_sharding)

    def kv_cache_lost(self) -> bool:
        """Whether the cache array was donated to a step that then failed (its buffer is gone)."""
        return self.kv_pages.is_deleted()


def _pad_rows(bitmask: np.ndarray | None, rows: int) -> np.ndarray | None:
    """A grammar bitmask grown to the bucket's rows; padding rows allow everything (-1: every bit set)."""
    if bitmask is None:
        return None
    return np.concatenate([bitmask, np.full((rows - len(bitmask), bitmask.shape[1]), -1, np.int32)])
