"""Block sizes per chip for the attention kernels, and the block schedule that follows from them.

The tables are starting points chosen from the chips' memory sizes and from the published tuning of
JAX's ragged paged attention, not yet measured on every chip: `benchmarks/gpu_check.py` (GPU) is where
a change to them should be justified. Keys are what `jax.devices()[0]` reports.

The schedule (`query_block_schedule`, `token_write_slots`) turns the ragged metadata into flat lists
that both kernels read: which sequence and which block of its new tokens each work item covers, and
which page slot each new token is written to. Both only read `cu_q_lens[0 ..= num_seqs]`, so whatever
the caller puts in the padding entries is ignored.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TpuBlocks:
    q_tokens: int  # new tokens of one sequence per work item (rows of the query block)
    kv_tokens: int  # KV positions per fetched block (rounded to whole pages)
    vmem_limit_bytes: int


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    q_rows: int  # query rows (tokens x padded query heads of one KV head) per program
    kv_tokens: int  # KV positions per inner-loop block (a power of two, whole pages)
    num_warps: int
    num_stages: int


# (decode, prefill) per TPU generation. Decode blocks have few query rows and long KV blocks (the work
# is reading the cache); prefill blocks have more query rows so the MXU sees real matrices.
_TPU_TABLE: dict[str, tuple[TpuBlocks, TpuBlocks]] = {
    "v4": (TpuBlocks(8, 256, 32 << 20), TpuBlocks(64, 256, 32 << 20)),
    "v5e": (TpuBlocks(8, 512, 64 << 20), TpuBlocks(64, 512, 64 << 20)),
    "v5p": (TpuBlocks(8, 512, 64 << 20), TpuBlocks(128, 512, 64 << 20)),
    "v6e": (TpuBlocks(8, 1024, 96 << 20), TpuBlocks(128, 512, 96 << 20)),
    "v7": (TpuBlocks(8, 1024, 48 << 20), TpuBlocks(128, 512, 48 << 20)),
}
_TPU_DEFAULT = "v5e"

# (decode, prefill) per CUDA compute capability. Decode splits the KV range of a sequence over several
# programs (see `gpu_kv_splits`) so that a small batch still fills the SMs.
_GPU_TABLE: dict[str, tuple[GpuBlocks, GpuBlocks]] = {
    "8.0": (GpuBlocks(16, 64, 4, 3), GpuBlocks(64, 64, 4, 2)),
    "8.6": (GpuBlocks(16, 64, 4, 2), GpuBlocks(64, 32, 4, 2)),
    "8.9": (GpuBlocks(16, 64, 4, 2), GpuBlocks(64, 32, 4, 2)),
    "9.0": (GpuBlocks(16, 128, 4, 3), GpuBlocks(64, 64, 4, 3)),
    "10.0": (GpuBlocks(16, 128, 4, 3), GpuBlocks(64, 64, 4, 3)),
}
_GPU_DEFAULT = "9.0"
_GPU_DEFAULT_SMS = 132


def tpu_generation(device_kind: str | None = None) -> str:
    """'TPU v5 lite' -> 'v5e', 'TPU v6 lite' -> 'v6e', 'TPU7x' -> 'v7'; unknown kinds get the default."""
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    kind = device_kind.lower().replace(" ", "")
    if "v4" in kind:
        return "v4"
    if "v5lite" in kind or "v5e" in kind:
        return "v5e"
    if "v5" in kind:
        return "v5p"
    if "v6" in kind:
        return "v6e"
    if "7" in kind:
        return "v7"
    return _TPU_DEFAULT


def gpu_capability(device=None) -> str:
    device = device or jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    return str(cc) if cc else _GPU_DEFAULT


def gpu_sm_count(device=None) -> int:
    device = device or jax.devices()[0]
    return int(getattr(device, "core_count", 0) or _GPU_DEFAULT_SMS)


def is_decode_batch(num_tokens: int, max_seqs: int) -> bool:
    """Static guess at the batch kind: a bucket with no more tokens than sequences is decode-shaped."""
    return num_tokens <= max_seqs


def tpu_attention_blocks(
    *, num_tokens: int, max_seqs: int, page_size: int, pages_per_seq: int, num_kv_heads: int,
    head_dim: int, dtype, generation: str | None = None,
) -> tuple[int, int, int]:
    """(query tokens per work item, pages per KV block, VMEM limit) for the TPU kernel."""
    decode, prefill = _TPU_TABLE.get(generation or tpu_generation(), _TPU_TABLE[_TPU_DEFAULT])
    blocks = decode if is_decode_batch(num_tokens, max_seqs) else prefill
    q_tokens = max(1, min(blocks.q_tokens, num_tokens))
    kv_pages = max(1, min(pages_per_seq, blocks.kv_tokens // page_size))
    # The double-buffered KV block must leave room for the query/output blocks and the softmax state.
    itemsize = jnp.dtype(dtype).itemsize
    while kv_pages > 1 and 2 * kv_pages * page_size * 2 * num_kv_heads * head_dim * itemsize > (
        blocks.vmem_limit_bytes // 4
    ):
        kv_pages //= 2
    return q_tokens, kv_pages, blocks.vmem_limit_bytes


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def gpu_attention_blocks(
    *, num_tokens: int, max_seqs: int, page_size: int, group_padded: int, head_dim: int,
    capability: str | None = None, num_sms: int | None = None, num_kv_heads: int = 1,
) -> tuple[int, int, int, int, int]:
    """(query tokens per program, pages per KV block, KV splits, num_warps, num_stages) for the GPU kernel.

    Every block dimension is a power of two (a Triton requirement) and the query block has at least 16
    rows (the smallest tensor-core matmul); `group_padded` is the query heads per KV head rounded up to a
    power of two.
    """
    decode, prefill = _GPU_TABLE.get(capability or gpu_capability(), _GPU_TABLE[_GPU_DEFAULT])
    is_decode = is_decode_batch(num_tokens, max_seqs)
    blocks = decode if is_decode else prefill
    q_tokens = max(1, blocks.q_rows // group_padded)
    # A 64-wide head halves the registers a KV row takes, so the block can hold twice the positions.
    kv_tokens = max(blocks.kv_tokens * (2 if head_dim <= 64 else 1), page_size)
    kv_pages = max(1, kv_tokens // page_size)
    splits = 1
    if is_decode:
        # Enough programs to cover every SM about twice, at most 16 partial results per query row.
        programs = max_seqs * num_kv_heads
        splits = max(1, min(16, _pow2_floor(2 * (num_sms or gpu_sm_count()) // max(programs, 1))))
    return q_tokens, kv_pages, splits, blocks.num_warps, blocks.num_stages


def max_work_items(num_tokens: int, max_seqs: int, q_tokens: int) -> int:
    """A static bound on the work items: each sequence adds at most one partial query block."""
    return max(1, min(num_tokens, max_seqs + -(-num_tokens // q_tokens)))


def active_cu_q_lens(cu_q_lens, num_seqs):
    """`cu_q_lens` with the entries past `num_seqs` replaced by `cu_q_lens[num_seqs]` (monotone)."""
    idx = jnp.arange(cu_q_lens.shape[0], dtype=jnp.int32)
    return jnp.where(idx <= num_seqs[0], cu_q_lens, cu_q_lens[num_seqs[0]])


def query_block_schedule(cu_q_lens, num_seqs, *, q_tokens: int, num_items: int):
    """Split every live sequence's new tokens into blocks of `q_tokens`; one work item per block.

    Returns `(item_seq, item_block, num_live_items)`: int32[num_items], int32[num_items], int32[1].
    Items are in (sequence, block) order, so their first rows ascend. Items past `num_live_items`
    repeat the last live item's sequence and block (kernels skip them).
    """
    cu = active_cu_q_lens(cu_q_lens, num_seqs)
    q_lens = cu[1:] - cu[:-1]
    blocks = (q_lens + q_tokens - 1) // q_tokens
    ends = jnp.cumsum(blocks).astype(jnp.int32)
    total = ends[-1]
    w = jnp.arange(num_items, dtype=jnp.int32)
    w_live = jnp.minimum(w, jnp.maximum(total - 1, 0))
    seq = jnp.searchsorted(ends, w_live, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, q_lens.shape[0] - 1)
    block = w_live - (ends[seq] - blocks[seq])
    return seq, block.astype(jnp.int32), total.reshape(1).astype(jnp.int32)


def token_write_slots(kv_lens, page_indices, cu_q_lens, num_seqs, *, num_tokens: int, page_size: int):
    """For each new token: the page and slot it is written to, and the number of real tokens.

    Returns `(page, slot, num_valid)`: int32[T], int32[T], int32[1]. Padding tokens (at or past
    `cu_q_lens[num_seqs]`) get page 0 and slot 0 and must not be written.
    """
    cu = active_cu_q_lens(cu_q_lens, num_seqs)
    num_valid = cu[-1]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    valid = t < num_valid
    q_len = cu[seq + 1] - cu[seq]
    pos = jnp.where(valid, kv_lens[seq] - q_len + (t - cu[seq]), 0)
    page = jnp.where(valid, page_indices[seq, pos // page_size], 0)
    slot = jnp.where(valid, pos % page_size, 0)
    return page.astype(jnp.int32), slot.astype(jnp.int32), num_valid.reshape(1).astype(jnp.int32)
