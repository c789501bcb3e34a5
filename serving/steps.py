"""The model step's pieces that `jax.jit` traces, and the batch types around them: what one scheduler
iteration hands the runner (`HostBatch`, unpadded, numpy) and what the step takes (`StepBatch`, padded to a
bucket). Pure functions of their arguments; the runner (serving/runner.py) binds the static ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np

from kernels.attention import AttentionBackend
from model.decoder import BoundParams
from model.interface import StepInputs
from serving.logprobs import LogprobBatch, step_logprobs
from serving.sampler import SamplingBatch, sample


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class StepBatch(NamedTuple):
    inputs: StepInputs
    logits_indices: jax.Array  # int32[S]: the last new token of each sequence
    sampling: SamplingBatch


@dataclass
class HostBatch:
    """What the scheduler fills for one step (unpadded); the runner pads it to a bucket."""

    input_ids: np.ndarray  # int32[num_tokens]
    positions: np.ndarray  # int32[num_tokens]
    kv_lens: np.ndarray  # int32[num_seqs]
    page_indices: list[list[int]]  # per sequence
    q_lens: np.ndarray  # int32[num_seqs]
    sampling: dict[str, np.ndarray]  # SamplingBatch fields, [num_seqs]
    penalties: dict[str, np.ndarray] | None = None  # PenaltyBatch fields (serving.penalties)
    logprobs: dict[str, np.ndarray] | None = None  # LogprobBatch fields (serving.logprobs)
    num_top: int = 0  # top logprobs per position (a static width of the logprob step)
    token_bitmask: np.ndarray | None = None  # int32[num_seqs, words] when a sequence is constrained


def _forward(bound: BoundParams, treedef, backend: AttentionBackend, param_leaves, kv_pages, inputs: StepInputs):
    model, layers = bound.bind(jax.tree.unflatten(treedef, param_leaves))
    return model, model.forward(inputs, kv_pages, backend, layers)


def _sample_step(bound, treedef, backend, param_leaves, kv_pages, batch: StepBatch):
    """The sampled tokens, plus the raw logits of the sampled rows and the final hidden states: both are
    computed anyway, and returning them (they stay on device) lets `run` penalise, resample and take
    logprobs in small jits, without a second compiled variant of the whole model per shape."""
    model, out = _forward(bound, treedef, backend, param_leaves, kv_pages, batch.inputs)
    raw_logits = model.logits(out.hidden[batch.logits_indices])
    return (sample(raw_logits, batch.sampling), raw_logits, out.hidden), out.kv, out.aux


def _logprob_step(bound, treedef, param_leaves, raw_logits, hidden, tokens, logprobs: LogprobBatch, num_top: int):
    """The logprob numbers of a step where some request asked (serving.logprobs); small (no layers)."""
    model, _ = bound.bind(jax.tree.unflatten(treedef, param_leaves))
    return step_logprobs(model, hidden, raw_logits, tokens, logprobs, num_top)


def _keep_aux(step, names, *args):
    """`step` returning only the aux outputs in `names`: XLA drops the rest, so they cost nothing."""
    result, kv, aux = step(*args)
    return result, kv, {name: aux[name] for name in names if name in aux}


def _pool_step(bound, treedef, backend, method, normalize, param_leaves, kv_pages, batch: StepBatch):
    model, out = _forward(bound, treedef, backend, param_leaves, kv_pages, batch.inputs)
    return model.pool(out.hidden, batch.inputs, method=method, normalize=normalize), out.kv, out.aux


def _encode_step(bound, treedef, backend, method, normalize, param_leaves, batch: StepBatch, segment_ids):
    """An encoder's step: whole sequences, bidirectional within each, no cache read or written."""
    model, layers = bound.bind(jax.tree.unflatten(treedef, param_leaves))
    inputs = batch.inputs
    hidden = model.encode(inputs.input_ids, inputs.positions, segment_ids, backend, layers)
    return model.pool(hidden, inputs, method=method, normalize=normalize)
