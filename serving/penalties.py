"""Per-request logit penalties on device: frequency, presence, repetition and logit_bias.

The device state is rebuilt each step from host-side token ids, not kept in a persistent buffer: each
penalised row sends its output ids (and, with a repetition penalty, its prompt ids) padded with -1 to a
power-of-two width, and the step scatters them into per-row counts over the vocabulary. A padded-width
list costs one small host->device copy per step and needs no slot bookkeeping across retractions; the
power-of-two widths keep the number of compiled shapes logarithmic in the sequence length.

A step whose batch asks for none of this gets `penalties=None` (`build_penalties`), a different pytree,
so it runs the very same compiled step as before penalties existed: plain batches pay nothing.

Order (SGLang's penalizers, then its logit bias): repetition (divide positive logits, multiply negative
ones, for every id in prompt or output), then frequency and presence (over output ids only), then the
additive logit_bias.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from serving.request import Request


# Id lists are padded to at least this many columns: short generations share one compiled shape.
MIN_IDS_WIDTH = 32


def _width(n: int) -> int:
    """Power-of-two padded width, at least MIN_IDS_WIDTH (one shape per doubling of the longest list)."""
    return max(MIN_IDS_WIDTH, 1 << max(n - 1, 0).bit_length())


class PenaltyBatch(NamedTuple):
    frequency: jax.Array  # float32[S]
    presence: jax.Array  # float32[S]
    repetition: jax.Array  # float32[S]; 1 = none
    output_ids: jax.Array  # int32[S, Wo]: ids generated so far, -1 pads
    prompt_ids: jax.Array  # int32[S, Wp]: prompt ids of rows with a repetition penalty, -1 pads
    bias_ids: jax.Array  # int32[S, Wb]: logit_bias keys, -1 pads
    bias_values: jax.Array  # float32[S, Wb]

    @staticmethod
    def pad(host: dict[str, np.ndarray], num_seqs: int) -> dict[str, np.ndarray]:
        """`num_seqs` rows whose first rows are `host`'s; padding rows are neutral (no ids, factor 1)."""
        out = {}
        for name, values in host.items():
            fill = 1.0 if name == "repetition" else (-1 if values.dtype == np.int32 else 0.0)
            padded = np.full((num_seqs, *values.shape[1:]), fill, values.dtype)
            padded[: len(values)] = values
            out[name] = padded
        return out


def wants_penalties(request: Request) -> bool:
    sp = request.sampling
    return bool(sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0 or sp.logit_bias)


def build_penalties(requests: Sequence[Request]) -> dict[str, np.ndarray] | None:
    """The step's `PenaltyBatch` host arrays (one row per request, in batch order), or None when no
    request asks for a penalty or a bias."""
    if not any(wants_penalties(r) for r in requests):
        return None
    rows = len(requests)
    sps = [r.sampling for r in requests]
    outputs = [r.output_ids if wants_penalties(r) else [] for r in requests]
    prompts = [r.input_ids if r.sampling.repetition_penalty != 1.0 else [] for r in requests]
    biases = [list((sp.logit_bias or {}).items()) for sp in sps]

    def ids_matrix(lists: list[list[int]]) -> np.ndarray:
        matrix = np.full((rows, _width(max(map(len, lists)))), -1, np.int32)
        for i, ids in enumerate(lists):
            matrix[i, : len(ids)] = ids
        return matrix

    bias_values = np.zeros((rows, _width(max(map(len, biases)))), np.float32)
    for i, pairs in enumerate(biases):
        bias_values[i, : len(pairs)] = [value for _, value in pairs]
    return {
        "frequency": np.asarray([sp.frequency_penalty for sp in sps], np.float32),
        "presence": np.asarray([sp.presence_penalty for sp in sps], np.float32),
        "repetition": np.asarray([sp.repetition_penalty for sp in sps], np.float32),
        "output_ids": ids_matrix(outputs),
        "prompt_ids": ids_matrix(prompts),
        "bias_ids": ids_matrix([[int(k) for k, _ in pairs] for pairs in biases]),
        "bias_values": bias_values,
    }


def apply_penalties(logits: jax.Array, batch: PenaltyBatch) -> jax.Array:
    """`logits[S, vocab]` (float32) with each row's penalties and bias applied."""
    rows, vocab = logits.shape
    row_index = jnp.arange(rows)[:, None]

    def counts(ids):
        # -1 pads scatter out of range and are dropped.
        return jnp.zeros((rows, vocab), jnp.float32).at[row_index, jnp.where(ids >= 0, ids, vocab)].add(
            1.0, mode="drop")

    output_counts = counts(batch.output_ids)
    seen = (output_counts > 0) | (counts(batch.prompt_ids) > 0)
    factor = batch.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / factor, logits * factor), logits)
    logits = logits - batch.frequency[:, None] * output_counts - batch.presence[:, None] * (output_counts > 0)
    bias_ids = jnp.where(batch.bias_ids >= 0, batch.bias_ids, vocab)
    return logits.at[row_index, bias_ids].add(batch.bias_values, mode="drop")
