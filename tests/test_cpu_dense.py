"""The native CPU dense kernel (kernels/dense) against its jnp reference, its dispatch, and bfloat16 end to
end: the runner's step keeps bfloat16 weights as they are (no weight-sized convert), its logits stay within
bfloat16's error of transformers', and the server answers /generate with `--dtype bfloat16`."""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from kernels.dense import (
    DenseBackendError,
    cpu,
    dense,
    in_dense_scope,
    reference,
    resolve_dense_backend,
    tuning,
)
from model.layers import Dense, FusedDense
from serving.config import resolve_runtime_config
from serving.runner import HostBatch, ModelRunner
from serving.server_args import ServerArgs
from tests.conftest import ServerProcess, replayable_seed
from tests.hf_reference import assert_greedy

KERNEL_CALL = 'custom_call_target="pallas_serve_dense_cpu"'
# Relative error of one bfloat16 rounding is 2^-9; a two-layer model's logits differ between two bfloat16
# implementations (transformers' own bf16 against its float32) by up to ~10% of their largest magnitude.
BF16_GREEDY_TOLERANCE = 0.1


@pytest.fixture(scope="module", autouse=True)
def kernel_builds():
    assert cpu.unavailable_reason() is None, cpu.unavailable_reason()


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("DENSE_SEED"))


def _close(got, want, dtype):
    """bfloat16 results are the float32 product rounded once: within 2^-8 of each value, plus the float32
    accumulation order (tiny next to it)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.abs(want).max()) or 1.0
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-8
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("rows", [1, 3, 17, 70])
@pytest.mark.parametrize("k,n", [(37, 131), (67, 515), (259, 517)])
def test_kernel_matches_the_reference(rng, dtype, transposed, rows, k, n):
    """Odd K / N: every tile width, the single-vector and scalar column tails, multi-row tiles with a rest,
    and enough work to split over the threads (67 x 515 from 70 rows; 259 x 517 from one row, whose
    blocks of weight rows end off a multiple of four and whose columns end off a whole group)."""
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)) / np.sqrt(k), dtype)
    bias = jnp.asarray(rng.standard_normal(n), dtype)
    got = jax.jit(partial(cpu.dense, transposed=transposed))(x, w, bias)
    assert got.dtype == dtype and got.shape == (rows, n)
    f32 = jnp.float32
    _close(got, reference.dense(x.astype(f32), w.astype(f32), bias.astype(f32), transposed=transposed), dtype)
    no_bias = jax.jit(partial(cpu.dense, transposed=transposed))(x, w)
    _close(no_bias, reference.dense(x.astype(f32), w.astype(f32), transposed=transposed), dtype)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_one_row_product_is_the_same_every_run(rng, dtype):
    """A single decode stream's product (one row, W [K, N]) is split over both threads in blocks of weight
    rows whose partial sums are added in a fixed order, so the same input gives the same bits every run,
    whichever thread ran which block (a partial per thread gave 40-294 distinct results in 300 runs)."""
    k, n = 1001, 1536
    x = jnp.asarray(rng.standard_normal((1, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
    product = jax.jit(cpu.dense)
    results = {np.asarray(product(x, w)).tobytes() for _ in range(60)}
    assert len(results) == 1
    f32 = jnp.float32
    _close(product(x, w), reference.dense(x.astype(f32), w.astype(f32)), dtype)

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_fused_dense_parts_on_the_kernel(rng, dtype):
    """A FusedDense (q/k/v with biases) in the runner's scope equals its parts on the reference."""
    from flax import nnx

    parts = [Dense(48, out, bias=True, dtype=dtype, rngs=nnx.Rngs(int(rng.integers(1 << 30)))) for out in (32, 16, 16)]
    for part in parts:
        part.bias[...] = jnp.asarray(rng.standard_normal(part.bias.shape), dtype)
    fused = FusedDense(parts)
    x = jnp.asarray(rng.standard_normal((min(5, tuning.max_rows(dtype)), 48)), dtype)  # rows the kernel takes
    got = jax.jit(partial(in_dense_scope, "cpu", lambda x: fused(x)))(x)
    hlo = jax.jit(partial(in_dense_scope, "cpu", lambda x: fused(x))).lower(x).compile().as_text()
    assert hlo.count(KERNEL_CALL) == 1
    for part, out in zip(parts, got, strict=True):
        f32 = jnp.float32
        _close(out, reference.dense(x.astype(f32), part.kernel[...].astype(f32), part.bias[...].astype(f32)), dtype)


def _weight_converts(hlo: str, shapes) -> list[str]:
    """Converts to an array of one of the weights' shapes that XLA materialises: in a fusion only its root
    is (a convert feeding a fused gather, say, is evaluated per gathered element), elsewhere every one."""
    dims = "|".join(",".join(map(str, s)) for s in shapes)
    pattern = re.compile(r"= (?:f32|bf16)\[(?:" + dims + r")\]\S* convert\(")
    found = []
    for computation in hlo.split("\n\n"):
        fused = re.match(r"\s*%(fused|wrapped)", computation) is not None
        found += [line.strip() for line in computation.splitlines()
                  if pattern.search(line) and (not fused or line.lstrip().startswith("ROOT"))]
    return found


def test_dispatch_by_scope_dtype_and_rows(rng):
    w = jnp.asarray(rng.standard_normal((48, 96)), jnp.bfloat16)

    def hlo(rows, scope="cpu", weight=w):
        x = jnp.ones((rows, 48), weight.dtype)
        return jax.jit(partial(in_dense_scope, scope, dense)).lower(x, weight).compile().as_text()

    limit = tuning.max_rows(jnp.bfloat16)
    small = hlo(limit)
    assert small.count(KERNEL_CALL) == 1 and not _weight_converts(small, [w.shape])  # bf16 read as stored
    assert KERNEL_CALL not in hlo(limit + 1)  # many rows: XLA's blocked matmul
    assert KERNEL_CALL not in hlo(1, scope="reference")
    assert KERNEL_CALL not in jax.jit(dense).lower(jnp.ones((1, 48), jnp.bfloat16), w).compile().as_text()
    assert KERNEL_CALL not in hlo(1, weight=w.astype(jnp.float16))  # a dtype the kernel does not take


def test_resolve_dense_backend():
    assert resolve_dense_backend("auto", platform="cpu", num_devices=1) == "cpu"
    assert resolve_dense_backend("reference", platform="cpu", num_devices=1) == "reference"
    assert resolve_dense_backend("auto", platform="tpu", num_devices=1) == "reference"
    assert resolve_dense_backend("auto", platform="cpu", num_devices=4) == "reference"  # a mesh: XLA's dot
    with pytest.raises(DenseBackendError, match="4 devices"):
        resolve_dense_backend("cpu", platform="cpu", num_devices=4)
    with pytest.raises(DenseBackendError, match="not gpu|CPU, not gpu"):
        resolve_dense_backend("cpu", platform="gpu", num_devices=1)
    with pytest.raises(DenseBackendError, match="must be one of"):
        resolve_dense_backend("fast", platform="cpu", num_devices=1)


# -- bfloat16 end to end, on a tiny checkpoint -----------------------------------------------------------

def _runner(model_dir, dtype: str, dense_backend: str = "auto") -> ModelRunner:
    args = ServerArgs(model_path=str(model_dir), dtype=dtype, page_size=4, max_running_requests=4,
                      chunked_prefill_size=32, context_length=64, max_total_tokens=256, dense_backend=dense_backend)
    return ModelRunner(model_dir, resolve_runtime_config(args))


def _last_logits(runner: ModelRunner, prompt: list[int], lens: list[int]):
    """The step's logits at the last token of each prefix `prompt[:n]` (one sequence per prefix), and the
    compiled step's HLO."""
    pages, first = [], 0
    for n in lens:
        pages.append(list(range(first, first + -(-n // 4))))
        first += len(pages[-1])
    host = HostBatch(np.concatenate([prompt[:n] for n in lens]).astype(np.int32),
                     np.concatenate([np.arange(n) for n in lens]).astype(np.int32),
                     np.array(lens, np.int32), pages, np.array(lens, np.int32), {})
    batch = runner._padded(host)
    (_, logits, _), _, _ = runner._step(runner._param_leaves, runner.kv_pages, batch)
    hlo = runner._step.lower(runner._param_leaves, runner.kv_pages, batch).compile().as_text()
    return np.asarray(logits[: len(lens)], np.float64), hlo


def test_bfloat16_step_against_transformers(tiny_llama_dir, one_torch_thread, rng):
    prompt = rng.integers(3, 384, size=12).tolist()
    lens = [3, 7, 10, 12]
    ours = _runner(tiny_llama_dir, "bfloat16")
    assert ours.dense_backend == "cpu"
    assert {str(leaf.dtype) for leaf in ours._param_leaves} == {"bfloat16"}  # no float32 copy of the weights
    logits, hlo = _last_logits(ours, prompt, lens)
    if tuning.max_rows(jnp.bfloat16) >= sum(lens):  # the step's 32 tokens
        assert hlo.count(KERNEL_CALL) == 2 * 4 + 1  # q/k/v, o, gate/up, down per layer, and the tied head
    else:  # AMX: XLA's bf16 GEMM takes the layers' products, the kernel the tied head (kernels/dense/tuning.py)
        assert hlo.count(KERNEL_CALL) == 1
    shapes = {tuple(leaf.shape) for leaf in ours._param_leaves if leaf.ndim == 2}
    assert not _weight_converts(hlo, shapes)
    # What the kernel replaces where the CPU has no bf16 matrix unit: XLA's dot widens every weight, every step.
    _, xla_hlo = _last_logits(_runner(tiny_llama_dir, "bfloat16", "reference"), prompt, lens)
    if not tuning.has_bf16_matrix_unit():
        assert len(_weight_converts(xla_hlo, shapes)) >= 2 * 4
    ours_f32, _ = _last_logits(_runner(tiny_llama_dir, "float32"), prompt, lens)

    def hf_logits(dtype):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).eval()
        with torch.no_grad():
            return hf(torch.tensor([prompt])).logits[0].double().numpy()[[n - 1 for n in lens]]

    hf_bf16, hf_f32 = hf_logits(torch.bfloat16), hf_logits(torch.float32)
    scale = np.abs(hf_f32).max()
    np.testing.assert_allclose(ours_f32, hf_f32, atol=1e-4 * scale)
    # bfloat16 against float32: no further off than twice transformers' own bfloat16, and bf16-sized.
    own_error = np.abs(hf_bf16 - hf_f32).max()
    assert np.abs(logits - hf_f32).max() <= 2 * own_error + 0.02 * scale
    assert np.abs(logits - hf_bf16).max() <= 0.2 * scale
    assert np.abs(logits - ours_f32).max() <= 0.2 * scale


@pytest.fixture(scope="module")
def bf16_server(tiny_llama_dir):
    server = ServerProcess(tiny_llama_dir, "--dtype", "bfloat16", "--page-size", "4", "--max-total-tokens", "256",
                           "--max-running-requests", "4", "--chunked-prefill-size", "16")
    yield server
    assert server.stop() == 0


def test_bfloat16_server_generates_greedy_tokens(bf16_server, tiny_llama_dir, one_torch_thread, rng):
    info = bf16_server.get("/get_server_info").json()
    assert info["dense_backend"] == "cpu" and info["dtype"] == "bfloat16"
    prompts = [rng.integers(3, 384, size=n).tolist() for n in (5, 21)]  # 21 > chunk: chunked prefill
    out = bf16_server.post("/generate", json={"input_ids": prompts, "sampling_params": {
        "temperature": 0, "max_new_tokens": 6, "ignore_eos": True}})
    assert out.status_code == 200, out.text
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).eval()
    for ids, result in zip(prompts, out.json(), strict=True):
        assert_greedy(hf, ids, result["output_ids"], 6, tolerance=BF16_GREEDY_TOLERANCE)


def test_bf16_threshold_follows_the_cpu(monkeypatch):
    """With AMX, XLA's bf16 GEMM takes untransposed bf16 products above 4 rows; the tied head and float32
    stay on the kernel to 64 rows (kernels/dense/tuning.py)."""
    monkeypatch.setattr(tuning, "has_bf16_matrix_unit", lambda: True)
    assert tuning.max_rows(jnp.bfloat16) == 4 and tuning.max_rows(jnp.bfloat16, transposed=True) == 64
    assert tuning.max_rows(jnp.float32) == 64
    monkeypatch.setattr(tuning, "has_bf16_matrix_unit", lambda: False)
    assert tuning.max_rows(jnp.bfloat16) == 64
