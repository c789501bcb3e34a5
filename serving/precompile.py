"""Preparing a runner's step buckets at start-up (`ModelRunner.precompile`, `--disable-precompile` skips it).

For a causal LM every bucket gets the sampling step, its KV write (CPU path) and the resampler a
penalised or constrained step runs after it (with `token_bitmask_width`, a grammar backend is on, also
its masked variant). Executables a previous start saved are loaded (serving/executable_cache.py), on up
to 4 threads since XLA deserializes without the GIL (a warm restart's largest part); a bucket that had
to be compiled is then run once, on an all-padding batch that writes nothing. Without the executable
cache, or for a pooled model (its pooling step with its own method), each bucket's jits are run once
instead, which compiles them.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from serving.steps import HostBatch, StepBatch

if TYPE_CHECKING:
    from serving.runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_LOADING_THREADS = 4


def precompile_buckets(runner: ModelRunner, *, progress: bool = True, token_bitmask_width: int | None = None) -> float:
    """Prepare every bucket of `runner`'s step; the seconds it took."""
    start = time.perf_counter()
    empty = HostBatch(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), [],
                      np.zeros(0, np.int32), {})
    batches = [runner._pad(empty, tokens, seqs) for tokens, seqs in runner.buckets()]
    bar = tqdm(total=len(batches), desc="Compiling step buckets", disable=not progress)
    if runner.pooling is not None or runner._executables.directory is None:
        for batch in batches:
            if runner.pooling is not None:
                jax.block_until_ready(runner._run_pooled(batch, 0, empty.q_lens, *runner.pooling))
            else:
                _warm_jits(runner, batch, token_bitmask_width)
            bar.update()
        bar.close()
        return time.perf_counter() - start

    def prepare(batch: StepBatch) -> bool:
        compiled = _prepare_bucket(runner, batch, token_bitmask_width)
        bar.update()
        return compiled

    workers = min(MAX_LOADING_THREADS, os.cpu_count() or 1, len(batches))
    with ThreadPoolExecutor(workers, thread_name_prefix="precompile") as pool:
        compiled = list(pool.map(prepare, batches))
    bar.close()
    for batch, was_compiled in zip(batches, compiled, strict=True):
        if was_compiled:  # a fresh compile runs once on an all-padding batch that writes nothing
            _, raw_logits, _ = jax.block_until_ready(runner._run(runner._step, batch, 0))
            jax.block_until_ready(runner._resample(raw_logits, batch.sampling, None))
    logger.info("Step executables: %d loaded from the cache, %d compiled", runner._executables.hits,
                runner._executables.misses)
    return time.perf_counter() - start


def _prepare_bucket(runner: ModelRunner, batch: StepBatch, token_bitmask_width: int | None) -> bool:
    """Load (or compile) one bucket's executables; whether any had to be compiled."""
    misses = runner._executables.misses_here()
    # The cache by its shape: its zeros may still be being written (`ModelRunner.__init__`).
    cache = jax.ShapeDtypeStruct(runner.kv_spec.shape, runner.kv_spec.dtype, sharding=runner._kv_sharding)
    (_, raw_logits, _), kv, _ = runner._step.prepare(runner._param_leaves, cache, batch).out_info
    if runner.attention.head_major:
        runner._write_kv.prepare(cache, kv)
    variants = [None] if token_bitmask_width is None else [None, jax.ShapeDtypeStruct(
        (raw_logits.shape[0], token_bitmask_width), jnp.int32)]
    for bitmask in variants:
        runner._resample.prepare(raw_logits, batch.sampling, bitmask)
    return runner._executables.misses_here() > misses


def _warm_jits(runner: ModelRunner, batch: StepBatch, token_bitmask_width: int | None) -> None:
    """Without the executable cache: run the step's jits once on `batch` (all padding) to compile them."""
    _, raw_logits, _ = jax.block_until_ready(runner._run(runner._step, batch, 0))
    for bitmask in (None,) if token_bitmask_width is None else (None, token_bitmask_width):
        allow_all = None if bitmask is None else np.full((len(raw_logits), bitmask), -1, np.int32)
        jax.block_until_ready(runner._resample(raw_logits, batch.sampling, allow_all))
