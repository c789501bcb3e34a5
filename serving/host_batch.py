"""What the scheduler hands the runner for one step, built from the requests it scheduled."""

from __future__ import annotations

import numpy as np

from serving.grammar import token_bitmask
from serving.penalties import build_penalties
from serving.request import Request
from serving.runner import HostBatch, next_pow2
from serving.sampler import MAX_BANNED_IDS

_SAMPLER_DTYPES = {"temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "min_p": np.float32,
                   "seeds": np.uint32, "steps": np.int32}


def build_host_batch(batch: list[tuple[Request, int]]) -> HostBatch:
    """One step's host arrays (unpadded; the runner pads them to a bucket) from the scheduled
    `(request, number of new tokens)` pairs: tokens and positions, page tables, sampler rows, banned ids,
    and the penalty and grammar inputs when a request needs them."""
    ids, positions, kv_lens, q_lens, pages = [], [], [], [], []
    rows = [r.sampler_row() for r, _ in batch]
    bans = [r.banned_ids() for r, _ in batch]
    # As wide as the longest list (every stop id stays banned until min_new_tokens is reached),
    # rounded up to a power of two so only a few shapes ever compile beyond the precompiled one.
    longest = max((len(b) for b in bans), default=0)
    banned = np.full((len(batch), max(MAX_BANNED_IDS, next_pow2(longest))), -1, np.int32)
    for i, (r, n) in enumerate(batch):
        ids.extend(r.tokens(r.num_computed, r.num_computed + n))
        positions.extend(range(r.num_computed, r.num_computed + n))
        kv_lens.append(r.num_computed + n)
        q_lens.append(n)
        pages.append(r.pages)
        banned[i, : len(bans[i])] = bans[i]
    arrays = {key: np.asarray([row[key] for row in rows], dtype) for key, dtype in _SAMPLER_DTYPES.items()}
    arrays["banned_ids"] = banned
    return HostBatch(np.asarray(ids, np.int32), np.asarray(positions, np.int32),
                     np.asarray(kv_lens, np.int32), pages, np.asarray(q_lens, np.int32), arrays,
                     penalties=build_penalties([r for r, _ in batch]),
                     token_bitmask=token_bitmask([r.step_grammar(n) for r, n in batch]))
