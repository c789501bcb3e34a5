"""Params on the CPU in one contiguous host allocation backed by transparent huge pages.

A single decode stream reads every weight once per step, product after product. Measured on the
default model's decode chain (`python benchmarks/read_bandwidth.py`, 2-core Xeon, same run): the same
bytes read from one buffer on huge pages stream at 26-28 GB/s, from separately allocated buffers on
4 KB pages at 19-22 GB/s; the dense kernel's chain (`python benchmarks/dense_rows.py --chain`) takes
24-25 ms in float32 from such an arena against 30-32 ms from XLA's own per-array buffers. So on the CPU
the arranged params are copied into one anonymous mapping, 2 MB-aligned and advised `MADV_HUGEPAGE`
(Linux's transparent huge pages in their default `madvise` mode), and each param becomes an XLA array
over its slice: XLA:CPU takes aligned host memory as the array's buffer without a copy. The mapping
lives as long as any of those arrays (each holds its slice), so deleting the params frees it.

Where the kernel offers no huge pages (THP `never`, or not Linux) the params stay where XLA put them.
The copy (two threads) costs 0.1-0.2 s for the default model in float32 where free huge pages are at
hand, and up to ~0.8 s where the kernel first compacts memory to make them.
"""

from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

HUGE_PAGE = 2 << 20
_ALIGN = 4096  # each param starts on its own page
_COPY_THREADS = 2


def gather(params: Any, device: Any) -> Any:
    """`params` (a pytree of arrays on the CPU `device`) copied into one huge-page host arena; the same
    pytree of arrays over it. A leaf that appears twice (a tied weight) is copied once."""
    leaves, treedef = jax.tree.flatten(params)
    unique = {id(leaf): leaf for leaf in leaves}
    slots = [-(-leaf.nbytes // _ALIGN) * _ALIGN for leaf in unique.values()]
    if sum(slots) == 0:
        return params
    arena = mmap.mmap(-1, sum(slots) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    offsets = np.cumsum([-np.frombuffer(arena, np.uint8).ctypes.data % HUGE_PAGE, *slots[:-1]])
    views = {key: np.frombuffer(arena, np.dtype(leaf.dtype), count=leaf.size, offset=int(offset)).reshape(leaf.shape)
             for (key, leaf), offset in zip(unique.items(), offsets, strict=True)}

    def copy(key):
        views[key][...] = np.asarray(unique[key])  # numpy copies without the GIL: page faults and copies overlap

    with ThreadPoolExecutor(_COPY_THREADS) as pool:
        list(pool.map(copy, views))
    placed = {key: jax.device_put(view, device) for key, view in views.items()}
    return jax.tree.unflatten(treedef, [placed[id(leaf)] for leaf in leaves])


THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_offered() -> bool:
    """Whether the kernel gives transparent huge pages to a mapping that asks (`always` or `madvise`
    selected; a kernel without the setting, or another OS, counts as no)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def applies(devices: list, mesh: Any) -> bool:
    """Whether params placed on `devices` (one CPU device, no mesh) are gathered into an arena: only where
    huge pages are offered (the same arena on 4 KB pages measured no faster, so the copy would buy nothing)."""
    return mesh is None and len(devices) == 1 and devices[0].platform == "cpu" and huge_pages_offered()
