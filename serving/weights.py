"""Weights while serving: `/update_weights_from_disk`, `/get_weights_by_name`, `/update_weight_version`.

A swap reads the new checkpoint (safetensors or Orbax, `checkpoints.load`) on a worker thread and places
it onto the served params' shardings while the old params keep serving; nothing served is touched until
the new params are complete and checked (same architecture, every tensor's shape), so a failure of any
kind leaves the old weights serving. The swap itself runs on the scheduler thread between two steps,
once the requests admitted before it have finished (or at once while generation is paused): each
request runs on one set of weights from its first token to its last, and requests arriving meanwhile
wait and run on the new ones. With `is_async` the swap does not wait: requests in flight continue on
the new weights from the next step, and the cache flush waits for them to finish. The old params' device memory goes back when the swap drops them.
With data-parallel replicas (serving/replicas.py) the checkpoint is read once and copied onto every
replica's devices, and each replica swaps on its own scheduler thread; the answer is SGLang's for dp > 1 (`num_paused_requests` a list
per rank, the ranks' messages joined with " | ").
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

from checkpoints.name_maps import weight_name_map_for
from checkpoints.resolve import LOAD_FORMATS, resolve_model_dir
from serving.multihost import refuse
from serving.protocol import RequestError, UpdateWeightsRequest
from serving.protocol.weights import WeightsByNameRequest

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.replicas import Replica
    from serving.runner import ModelRunner

logger = logging.getLogger(__name__)

# The CPU path serves some projections fused into one param (`model.layers.FusedDense`, the MoE layer's
# gate_up): the fused param's name -> its members, in the order they are concatenated along the last axis.
FUSED_PARAMS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
GET_WEIGHTS_FAILED = "Get parameter by name failed"


def _update_result(success: bool, message: str, dp_size: int = 1) -> dict[str, Any]:
    if dp_size == 1:
        return {"success": success, "message": message, "num_paused_requests": 0}
    return {"success": success, "message": " | ".join([message] * dp_size), "num_paused_requests": [0] * dp_size}


class WeightControl:
    """The engine's weight routes; `load_format` is the one the served weights were read with (the
    default of the next update)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.load_format = engine.server_args.load_format
        self._abstract_paths: dict[tuple[str, ...], Any] | None = None

    async def update_from_disk(self, request: UpdateWeightsRequest) -> dict[str, Any]:
        """Contract 5.5: `{"success", "message", "num_paused_requests"}` with SGLang's messages."""
        engine = self.engine
        replicas, dp_size = engine.replicas, len(engine.replicas)
        refusal = refuse(engine.server_args, "update_weights_from_disk")
        if refusal is not None:
            return _update_result(False, refusal, dp_size)
        load_format = request.load_format or self.load_format
        if load_format not in LOAD_FORMATS:
            return _update_result(False, f"Failed to get model loader: {load_format}.", dp_size)
        try:
            model_dir = await asyncio.to_thread(resolve_model_dir, request.model_path, load_format=load_format)
        except Exception as exc:
            return _update_result(False, f"Failed to get weights iterator: {exc}.", dp_size)
        try:  # every replica's copy, on its own devices, before any replica swaps
            params = await asyncio.to_thread(replicas.read_weights, model_dir)
        except Exception as exc:
            logger.warning("update_weights_from_disk %s failed, the served weights stay: %s", request.model_path, exc)
            return _update_result(False, f"Failed to update weights: {exc}.\nRolling back to original weights.",
                                  dp_size)
        if request.abort_all_requests:
            replicas.abort("", abort_all=True, cause="update_weights_from_disk abort_all_requests")
        await asyncio.gather(*(self._swap(replica, params[replica.rank], model_dir, request) for replica in replicas))
        engine.router.forget_prefixes()  # the flush (or, without one, the new weights) made them stale
        self.load_format = load_format
        message = "Succeeded to update model weights."
        if request.weight_version is not None:
            message += f" Weight version updated to {request.weight_version}."
        logger.info("Weights updated from %s (%s)", request.model_path, load_format)
        return _update_result(True, message, dp_size)

    async def _swap(self, replica: Replica, params: Any, model_dir: Path, request: UpdateWeightsRequest) -> None:
        """One replica's swap, on its scheduler thread (the engine's path and version change with the first
        replica's: a request on another replica formatted before its swap may name the new ones)."""
        engine, scheduler = self.engine, replica.scheduler

        def swap() -> bool:
            """Runs on the scheduler thread; False when a requested flush could not happen yet."""
            replica.runner.params = params
            # With the params, so a request formatted after the swap never reports the old path or version.
            engine.model_dir = model_dir
            engine.model_path = engine.served_model_name = request.model_path
            if request.weight_version is not None:
                engine.weight_version = request.weight_version
            scheduler.released.discard("weights")  # new weights are on the device even if released before
            if request.keep_pause and scheduler.pause_mode is None:
                scheduler.pause_mode = "in_place"
            return not request.flush_cache or scheduler.flush()

        # is_async (SGLang: no writer lock): between the next two steps, requests in flight go on with the
        # new weights (their KV so far is the old weights'); else once the requests admitted have finished.
        flushed = await asyncio.wrap_future(scheduler.call(swap) if request.is_async
                                            else scheduler.call_when_idle(swap))
        if not flushed and request.is_async:
            # Pages of the old weights' KV are held by the requests in flight: flush once they finish;
            # requests arriving until then wait for it, so none reuses KV computed with the old weights.
            scheduler.call_when_idle(scheduler.flush)

    def update_version(self, new_version: str, abort_all_requests: bool) -> dict[str, Any]:
        """Contract 5.8. Requests in flight are aborted first unless `abort_all_requests` is false (they
        then report the version they started with)."""
        if abort_all_requests:
            self.engine.replicas.abort("", abort_all=True, cause="update_weight_version abort_all_requests")
        self.engine.weight_version = new_version
        return {"success": True, "message": f"Weight version updated to {new_version}", "new_version": new_version}

    async def get_by_name(self, request: WeightsByNameRequest) -> list:
        """Contract 5.9: the served value of the Hugging Face tensor `request.name` as nested float lists,
        its first `truncate_size` rows; read on the scheduler thread between two steps. RequestError with
        SGLang's message for a name the model does not have (or while the weights are released). With
        data-parallel replicas, as SGLang: a list with each replica's value, in rank order."""
        refusal = refuse(self.engine.server_args, "get_weights_by_name")  # a param's shards are on every host
        if refusal is not None:
            raise RequestError(refusal)
        paths = self._paths()
        values = await self.engine.replicas.each(
            lambda replica: served_tensor(replica.runner, request.name, paths, request.truncate_size))
        if any(value is None for value in values):
            raise RequestError(GET_WEIGHTS_FAILED)
        values = [value.astype(np.float32).tolist() for value in values]
        return values[0] if len(values) == 1 else values

    def _paths(self) -> dict[tuple[str, ...], Any]:
        if self._abstract_paths is None:
            state = nnx.state(self.engine.runner.abstract_model, nnx.Param)
            self._abstract_paths = {tuple(str(k) for k in p): leaf for p, leaf in nnx.to_flat_state(state)}
        return self._abstract_paths


def served_tensor(runner: ModelRunner, hf_name: str, abstract: dict[tuple[str, ...], Any],
                  truncate: int) -> np.ndarray | None:
    """The served value of Hugging Face tensor `hf_name` (first `truncate` rows) as a host array, read
    back from the arranged params (stacked or per layer, fused projections split again); None when the
    model has no such tensor or its weights are released."""
    model = runner.abstract_model
    name_map = weight_name_map_for(model)
    if name_map.skips(hf_name, tie_word_embeddings=model.config.tie_word_embeddings):
        if hf_name not in name_map.tied_embedding_names:
            return None
        hf_name = name_map.to_hf_name(("embed_tokens",))  # tied: the LM head is the embedding table
    target = name_map.to_param(hf_name, abstract)
    if target is None or runner.params_released:
        return None
    path, index, transpose = target
    stacked = path[0] in name_map.stacked
    if stacked and index[0] >= model.config.num_layers:
        return None
    rest, layers = runner.params
    if not stacked:
        value = _flat(rest)[path]
    elif isinstance(layers, list):  # per-layer states (the unrolled CPU loop), projections fused
        value = _layer_value(_flat(layers[index[0]]), path, abstract)
        index = index[1:]
    else:
        value = _flat(layers)[path]
    value = runner.placement.checkpoint_value(path, value, model.config.head_dim)  # KV heads replicated on a mesh
    if index and index[-1] >= value.shape[len(index) - 1]:
        return None
    value = value[index] if index else value
    value = value.T if transpose else value
    return np.asarray(value[:truncate])


def _flat(state) -> dict[tuple[str, ...], Any]:
    return {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(state)}


def _layer_value(layer: dict[tuple[str, ...], Any], path: tuple[str, ...], abstract: dict) -> Any:
    """Param `path` (`("layers", ...)`) of one per-layer state, sliced out of its fused param if fused."""
    sub = path[1:]
    if sub in layer:
        return layer[sub]
    parent, member, leaf = sub[:-2], sub[-2], sub[-1]
    for fused, members in FUSED_PARAMS.items():
        if member in members and (*parent, fused, leaf) in layer:
            widths = [abstract[("layers", *parent, m, leaf)].shape[-1] for m in members]
            start = sum(widths[: members.index(member)])
            return layer[(*parent, fused, leaf)][..., start: start + widths[members.index(member)]]
    raise KeyError(path)
