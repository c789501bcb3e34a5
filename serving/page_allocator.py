"""Host-side free list of KV cache page ids.

The device KV cache is an array of ``num_pages`` fixed-size pages; this module only decides which page
ids are free. It knows nothing about tokens, requests or the prefix tree (see ``prefix_cache.py`` for
the object the scheduler talks to).

Invariants:
  * every page id in ``0 .. num_pages - 1`` is either free (in the free list, bitmap bit set) or
    allocated (bitmap bit clear), never both;
  * the free list holds each free page exactly once, so ``num_free == len(free list)``;
  * ``alloc`` is all-or-nothing and ``free`` validates every id before changing any state, so a
    failed call leaves the allocator exactly as it was.

Every call costs O(pages involved); nothing scans the whole pool.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["DoubleFreeError", "PageAllocator"]


class DoubleFreeError(AssertionError):
    """A page id was freed while already free (or twice in one call): a page-ownership bug."""


class PageAllocator:
    """Free list of page ids ``0 .. num_pages - 1`` with an O(1) is-free bitmap.

    Pages are handed out from the top of a stack, so freshly freed pages are reused first and a new
    allocator hands out ``0, 1, 2, ...`` in order.
    """

    __slots__ = ("_free_stack", "_is_free", "_num_total")

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError(f"num_pages must be >= 0, got {num_pages}")
        self._num_total = int(num_pages)
        # Reversed so that pop() from the end yields the lowest ids first.
        self._free_stack: list[int] = list(range(num_pages - 1, -1, -1))
        # bytearray: scalar indexing is several times faster than a numpy bool array.
        self._is_free = bytearray(b"\x01") * num_pages

    @property
    def num_free(self) -> int:
        """Number of free pages (O(1))."""
        return len(self._free_stack)

    @property
    def num_total(self) -> int:
        """Size of the pool (constant)."""
        return self._num_total

    def is_free(self, page: int) -> bool:
        """Whether ``page`` is currently free (O(1))."""
        return bool(self._is_free[page])

    def alloc(self, n: int) -> list[int] | None:
        """Take ``n`` free pages; ``None`` (and no change) if fewer than ``n`` are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n == 0:
            return []
        stack = self._free_stack
        if n > len(stack):
            return None
        pages = stack[-n:]
        del stack[-n:]
        pages.reverse()
        is_free = self._is_free
        for page in pages:
            is_free[page] = 0
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return ``pages`` to the pool.

        Raises ``DoubleFreeError`` if any page is already free or appears twice, and ``ValueError`` for
        an id outside the pool; in both cases nothing is freed.
        """
        page_list = [int(page) for page in pages]
        is_free = self._is_free
        num_total = self._num_total
        for index, page in enumerate(page_list):
            if not 0 <= page < num_total:
                self._undo_marks(page_list, index)
                raise ValueError(f"page id {page} is outside the pool 0..{num_total - 1}")
            if is_free[page]:
                self._undo_marks(page_list, index)
                raise DoubleFreeError(f"page {page} freed while already free")
            is_free[page] = 1
        self._free_stack.extend(page_list)

    def _undo_marks(self, pages: list[int], count: int) -> None:
        """Clear the free bits set by the first ``count`` ids of a failed ``free`` call."""
        for page in pages[:count]:
            self._is_free[page] = 0
