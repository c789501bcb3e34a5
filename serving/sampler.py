"""Token sampling on device: greedy, temperature, top-k, top-p and min-p, seeded per request.

Runs inside the jitted step, so only the chosen token ids leave the device. The full-vocabulary sort
that top-k / top-p / min-p need is skipped (by `lax.cond`) when no row of the batch asks for them, and
sampling itself is skipped when every row is greedy: the common greedy path is one argmax.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Per-request banned ids (EOS and stop ids while `min_new_tokens` is not reached), padded with -1. The
# width is the batch's: at least this many columns (the precompiled shape), more when a request in the
# step bans more ids (the scheduler rounds the width up to a power of two, so few shapes ever compile).
MAX_BANNED_IDS = 8


class SamplingBatch(NamedTuple):
    temperature: jax.Array  # float32[S]; 0 means greedy
    top_k: jax.Array  # int32[S]; <= 0 means the whole vocabulary
    top_p: jax.Array  # float32[S]
    min_p: jax.Array  # float32[S]
    seeds: jax.Array  # uint32[S]
    steps: jax.Array  # int32[S]: tokens generated so far, folded into the key so each step differs
    banned_ids: jax.Array  # int32[S, W], W >= MAX_BANNED_IDS; -1 pads

    @staticmethod
    def host_arrays(num_seqs: int, banned_width: int = MAX_BANNED_IDS) -> dict[str, np.ndarray]:
        return {
            "temperature": np.zeros(num_seqs, np.float32),
            "top_k": np.zeros(num_seqs, np.int32),
            "top_p": np.ones(num_seqs, np.float32),
            "min_p": np.zeros(num_seqs, np.float32),
            "seeds": np.zeros(num_seqs, np.uint32),
            "steps": np.zeros(num_seqs, np.int32),
            "banned_ids": np.full((num_seqs, banned_width), -1, np.int32),
        }

    @staticmethod
    def pad(host: dict[str, np.ndarray], num_seqs: int) -> dict[str, np.ndarray]:
        """`num_seqs` rows (a bucket) whose first rows are `host`'s (a HostBatch's `sampling`); the
        rest are neutral padding. `banned_ids` keeps the host's width."""
        banned = host.get("banned_ids")
        width = MAX_BANNED_IDS if banned is None else max(MAX_BANNED_IDS, banned.shape[1])
        arrays = SamplingBatch.host_arrays(num_seqs, width)
        for name, values in host.items():
            if name == "banned_ids":
                arrays[name][: len(values), : values.shape[1]] = values
            else:
                arrays[name][: len(values)] = values
        return arrays


def _filter(logits, batch: SamplingBatch):
    """Mask (to -inf) what top-k, top-p and min-p exclude; `logits` are already temperature-scaled."""
    vocab = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    top_k = jnp.where(batch.top_k <= 0, vocab, jnp.minimum(batch.top_k, vocab))
    # top-k first, then top-p and min-p on the renormalized survivors (SGLang's order).
    in_top_k = jnp.arange(vocab)[None, :] < top_k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token is dropped when the mass before it
    # already does. top_p = 1 keeps everything: in float32 the running sum reaches 1 before the tail does.
    keep_sorted = ((cumulative - probs) < batch.top_p[:, None]) | (batch.top_p[:, None] >= 1.0)
    keep_sorted &= (probs >= batch.min_p[:, None] * probs[:, :1]) & in_top_k
    count = jnp.maximum(keep_sorted.sum(axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (count - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def argmax_rows(x, lanes: int = 4096):
    """`jnp.argmax(x, axis=-1)` (first index of each row's maximum) for finite or -inf rows, as reductions
    XLA:CPU vectorizes: the vocabulary is folded into `[blocks, lanes]` and reduced across blocks first.
    Its fused (value, index) reduce of `jnp.argmax` ran scalar: 6-8 ms for 64 x 49,152 logits, 3.5 here.
    A row holding NaN gives its last index (jnp.argmax: the first NaN); sampled logits never hold NaN."""
    rows, vocab = x.shape
    pad = -vocab % lanes
    blocks = x if not pad else jnp.pad(x, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    blocks = blocks.reshape(rows, -1, lanes)
    best = blocks.max(axis=1).max(axis=-1)
    index = jnp.arange(blocks.shape[1] * lanes, dtype=jnp.int32).reshape(1, -1, lanes)
    first = jnp.where(blocks == best[:, None, None], index, vocab).min(axis=1).min(axis=-1)
    return jnp.minimum(first, vocab - 1)


def apply_token_bitmask(logits, token_bitmask):
    """Logits of the tokens a grammar forbids set to -inf. `token_bitmask` is `int32[S, W]`, W * 32 >=
    vocab: bit `t % 32` of word `t // 32` set means token `t` is allowed (llguidance's layout; an
    unconstrained row is all ones). Bits past the logits' width are ignored."""
    shifts = jnp.arange(32, dtype=jnp.int32)
    allowed = (token_bitmask[:, :, None] >> shifts) & 1  # arithmetic shift: the sign bit is word bit 31
    allowed = allowed.reshape(token_bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return jnp.where(allowed.astype(bool), logits, -jnp.inf)


def sample(logits, batch: SamplingBatch, token_bitmask=None):
    """Choose one token per row of `logits[S, vocab]` (float32). `token_bitmask` (constrained decoding,
    see `apply_token_bitmask`) is None when no row is constrained: that step compiles without it."""
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = batch.banned_ids
    logits = logits.at[rows, jnp.where(banned >= 0, banned, logits.shape[-1])].set(-jnp.inf, mode="drop")
    # The grammar's mask is the last transform before temperature and the top-k / top-p / min-p filters,
    # as in SGLang, so those renormalize over the tokens the grammar allows.
    if token_bitmask is not None:
        logits = apply_token_bitmask(logits, token_bitmask)
    greedy_tokens = argmax_rows(logits)
    is_greedy = batch.temperature <= 0.0

    def stochastic(_):
        scaled = logits / jnp.where(is_greedy, 1.0, batch.temperature)[:, None]
        needs_filter = jnp.any((batch.top_k > 0) | (batch.top_p < 1.0) | (batch.min_p > 0.0))
        scaled = jax.lax.cond(needs_filter, lambda x: _filter(x, batch), lambda x: x, scaled)
        keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(batch.seeds, batch.steps)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(keys)
        drawn = argmax_rows(scaled + gumbel)
        return jnp.where(is_greedy, greedy_tokens, drawn)

    return jax.lax.cond(jnp.all(is_greedy), lambda _: greedy_tokens, stochastic, None)
