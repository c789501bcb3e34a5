"""The runner's compiled step on the CPU path (the native kernel or the jnp reference): the cache is only
read inside the step and written in place by the separate write jit (a copy of the cache made every step
grow with the pool)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from kernels.attention.cache_layout import cache_values
from serving.config import resolve_runtime_config
from serving.runner import HostBatch, ModelRunner
from serving.server_args import ServerArgs


def _cache_shaped_results(hlo: str, shape: tuple[int, ...]) -> list[str]:
    """Instructions (other than parameters) that produce an array of the cache's shape."""
    pattern = re.compile(r"= (?:f32|bf16|u16)\[" + ",".join(map(str, shape)) + r"\]\S* (\S+)\(")
    return [line.strip() for line in hlo.splitlines()
            if (m := pattern.search(line)) and m.group(1) != "parameter"]


def _runner(model_dir, backend, kv_cache_dtype="auto"):
    args = ServerArgs(model_path=str(model_dir), dtype="float32", page_size=4, attention_backend=backend,
                      max_running_requests=4, chunked_prefill_size=16, context_length=64, max_total_tokens=256,
                      kv_cache_dtype=kv_cache_dtype)
    runtime = resolve_runtime_config(args)
    assert runtime.max_step_tokens == 16
    return ModelRunner(model_dir, runtime)


@pytest.mark.parametrize("backend,kv_cache_dtype", [("reference", "auto"), ("cpu", "auto"), ("cpu", "bf16")])
def test_step_reads_the_cache_and_the_write_is_in_place(tiny_llama_dir, backend, kv_cache_dtype):
    runner = _runner(tiny_llama_dir, backend, kv_cache_dtype)
    assert not runner.attention.writes_in_step and runner.kv_spec.head_major
    # A bfloat16 cache is kept as its bit patterns (uint16): XLA:CPU widens bfloat16 scatters to float32.
    assert runner.kv_pages.dtype == ("uint16" if kv_cache_dtype == "bf16" else "float32")
    shape = runner.kv_spec.shape
    assert runner.kv_pages.shape == shape
    host = HostBatch(np.arange(1, 8, dtype=np.int32), np.array([0, 1, 2, 3, 4, 0, 1], np.int32),
                     np.array([5, 2], np.int32), [[0, 1], [2]], np.array([5, 2], np.int32), {})
    empty = HostBatch(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), [],
                      np.zeros(0, np.int32), {})
    for tokens, seqs in runner.buckets():
        batch = jax.device_put(runner._pad(host if tokens >= len(host.input_ids) else empty, tokens, seqs))
        step = runner._step.lower(runner._param_leaves, runner.kv_pages, batch).compile()
        assert _cache_shaped_results(step.as_text(), shape) == [], f"bucket {tokens}: the step writes the cache"
        _, kv_write, _ = runner._step(runner._param_leaves, runner.kv_pages, batch)
        write = runner._write_kv.lower(runner.kv_pages, kv_write).compile().as_text()
        assert "input_output_alias" in write
        # No copy of the cache, nor a round trip through another dtype (XLA:CPU widens bfloat16 scatters).
        assert not [line for line in _cache_shaped_results(write, shape) if " copy(" in line or "convert(" in line]
    # And the write lands where the attention reads it: two steps of one sequence.
    runner.reset_kv_cache()
    first = runner.run(HostBatch(np.array([3, 4, 5], np.int32), np.array([0, 1, 2], np.int32),
                                 np.array([3], np.int32), [[1]], np.array([3], np.int32), {}))
    cache = np.array(cache_values(runner.kv_pages))
    if backend == "cpu":  # the native kernel's layout stores K blocks transposed: undo that to look
        layers, pages, heads, page_size, head_dim = cache.shape
        cache[:, :, 0::2] = cache[:, :, 0::2].reshape(layers, pages, heads // 2, head_dim, page_size).swapaxes(-1, -2)
    assert np.abs(cache[:, 1, :, :3]).sum(axis=(0, 1, 3)).all()  # page 1, slots 0-2 written in every layer
    assert not cache[:, 1, :, 3].any() and not cache[:, 0].any()
    assert first.shape == (1,)


def test_the_serving_cache_only_receives_finite_values():
    """`attend(cache_is_finite=True)` skips masking stale slots, so a request whose activations overflow
    must not leave NaN / inf in pages that another request gets next."""
    import jax.numpy as jnp

    from kernels.attention.cache_layout import write_kv_layers

    cache = jnp.zeros((2, 3, 4, 2, 8))  # [layers, pages, 2 * kv_heads, page_size, head_dim]
    new = jnp.full((2, 2, 4, 8), jnp.nan).at[:, 1].set(jnp.inf)  # [layers, tokens, 2 * kv_heads, head_dim]
    out = write_kv_layers(cache, new, jnp.array([[1, 2]]), jnp.array([0, 0]), jnp.array([0, 1]),
                          jnp.array([True, True]))
    assert bool(jnp.isfinite(out).all())
    assert float(out[:, 1, :, 1].min()) > 1e30 and not out[:, 1, :, 0].any()  # inf clipped, NaN -> 0
    assert not out[:, 0].any() and not out[:, 2].any()


def test_bfloat16_kv_cache_native_kernel_matches_the_reference(tiny_llama_dir):
    """`--kv-cache-dtype bf16`: the native kernel and the jnp reference, both over a bfloat16 cache, pick
    the same greedy tokens over a prefill and several decode steps (two sequences, one mid-page)."""
    outputs = {}
    for backend in ("cpu", "reference"):
        runner = _runner(tiny_llama_dir, backend, "bf16")
        prompts, pages = [[5, 9, 2, 7, 1, 3], [4, 8]], [[0, 1, 2], [3, 4]]
        lens = [len(p) for p in prompts]
        ids = np.array(prompts[0] + prompts[1], np.int32)
        positions = np.array(list(range(lens[0])) + list(range(lens[1])), np.int32)
        tokens = runner.run(HostBatch(ids, positions, np.array(lens, np.int32), pages, np.array(lens, np.int32), {}))
        out = [tokens.tolist()]
        for _ in range(5):
            positions = np.array(lens, np.int32)
            lens = [n + 1 for n in lens]
            tokens = runner.run(HostBatch(tokens.astype(np.int32), positions, np.array(lens, np.int32), pages,
                                          np.ones(2, np.int32), {}))
            out.append(tokens.tolist())
        outputs[backend] = out
    assert outputs["cpu"] == outputs["reference"]
