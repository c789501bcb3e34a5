"""serving/host_arena.py: the CPU params copied into one huge-page host allocation, as XLA arrays over it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from serving import host_arena
from serving.config import resolve_runtime_config
from serving.runner import ModelRunner
from serving.server_args import ServerArgs


def _spans(leaves) -> list[tuple[int, int]]:
    return sorted((leaf.unsafe_buffer_pointer(), leaf.unsafe_buffer_pointer() + leaf.nbytes) for leaf in leaves)


def test_gather_copies_every_leaf_once_into_one_allocation():
    rng = np.random.default_rng(0)
    tied = jnp.asarray(rng.standard_normal((33, 7)), jnp.bfloat16)
    params = {"a": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "embed": tied, "head": tied,
              "b": jnp.asarray(rng.integers(0, 9, 11), jnp.int32), "scalar": jnp.float32(2.5)}
    placed = host_arena.gather(params, jax.devices("cpu")[0])
    assert jax.tree.structure(placed) == jax.tree.structure(params)
    for key, value in params.items():
        assert placed[key].dtype == value.dtype and placed[key].shape == value.shape
        np.testing.assert_array_equal(np.asarray(placed[key]), np.asarray(value))
    assert placed["embed"] is placed["head"]  # a tied weight: one copy
    spans = _spans([placed[k] for k in ("a", "embed", "b", "scalar")])
    # One page-aligned slot per distinct leaf, back to back in one allocation, from a 2 MB boundary.
    assert spans[0][0] % host_arena.HUGE_PAGE == 0
    assert all(start % 4096 == 0 for start, _ in spans)
    assert spans[-1][0] - spans[0][0] == 4096 * (len(spans) - 1)


def test_runner_params_on_the_cpu_live_in_one_arena(tiny_llama_dir):
    args = ServerArgs(model_path=str(tiny_llama_dir), page_size=4, max_running_requests=4, chunked_prefill_size=32,
                      context_length=64, max_total_tokens=256)
    runner = ModelRunner(tiny_llama_dir, resolve_runtime_config(args))
    leaves = jax.tree.leaves(runner.params)
    spans = _spans({id(leaf): leaf for leaf in leaves}.values())
    assert spans[0][0] % host_arena.HUGE_PAGE == 0
    padded = sum(-(-(end - start) // 4096) * 4096 for start, end in spans)
    assert spans[-1][1] - spans[0][0] <= padded  # contiguous: no other allocation in between
    # A weight swap's params are placed the same way (and the served ones are untouched).
    swapped = jax.tree.leaves(runner.read_weights(tiny_llama_dir))
    new_spans = _spans({id(leaf): leaf for leaf in swapped}.values())
    assert new_spans[0][0] % host_arena.HUGE_PAGE == 0 and new_spans[0][0] != spans[0][0]
    for old, new in zip(leaves, swapped, strict=True):
        np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


def test_the_arena_needs_huge_pages_offered(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(host_arena, "THP_SETTING", setting)
    cpu = jax.devices("cpu")
    for text, offered in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                          ("always madvise [never]\n", False)):
        setting.write_text(text)
        assert host_arena.huge_pages_offered() is offered and host_arena.applies(cpu, None) is offered
    setting.unlink()  # no such setting (another kernel or OS)
    assert not host_arena.huge_pages_offered() and not host_arena.applies(cpu, None)
    setting.write_text("always [madvise] never\n")
    assert not host_arena.applies(cpu, mesh=object())
