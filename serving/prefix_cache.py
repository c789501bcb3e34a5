"""The scheduler's one view of KV cache pages: allocator + radix prefix index + per-request ownership.

Every page id ``0 .. num_pages - 1`` is in exactly one of three states:
  * free      -- in the ``PageAllocator``;
  * evictable -- held by the radix tree in a node with ``lock_ref == 0`` (cached KV nobody uses now;
                 reclaimed by ``allocate`` in LRU order when the free list runs short);
  * locked    -- held by the tree in a node with ``lock_ref > 0`` (a live request's cached prefix), or
                 held privately by a live request (returned by ``allocate``, not yet ``release``d).
Invariant: ``num_free + num_evictable + num_locked == num_total``; ``check_invariant`` re-derives every
state from scratch and also proves no page is in two states at once.

Request lifecycle, as the scheduler drives it:
  1. ``handle = acquire_prefix(prompt)``: reuse (and lock) the longest cached page-aligned prefix;
     the request's page table starts with ``handle.pages`` and prefill starts at ``handle.num_tokens``.
  2. ``allocate(n)`` as often as needed for the rest of the prompt and for decode growth; each result
     is appended to the request's page table. ``None`` means "not now" and changes nothing.
  3. ``release(handle, token_ids, page_table, cache=...)`` exactly once when the request finishes, is
     aborted or retracted; afterwards the request holds nothing.

All calls cost O(pages and tokens involved) plus O(log) heap work per evicted node; only
``check_invariant`` and ``flush`` walk the whole pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.page_allocator import PageAllocator
from serving.radix_cache import RadixCache, RadixNode, TokenIds, as_token_array

__all__ = ["PrefixCache", "PrefixHandle"]


@dataclass(eq=False)
class PrefixHandle:
    """A request's claim on a cached prefix, from ``PrefixCache.acquire_prefix``.

    ``pages`` hold the KV of the first ``num_tokens`` prompt tokens (``num_tokens ==
    len(pages) * page_size``); they stay locked until the handle is passed to ``release``. Treat all
    fields as read-only.
    """

    pages: list[int]
    num_tokens: int
    node: RadixNode | None = field(repr=False)
    prefix_tokens: np.ndarray = field(repr=False)
    released: bool = False


class PrefixCache:
    """Paged KV cache bookkeeping with radix prefix reuse (see the module docstring for the states).

    Not thread-safe: only the scheduler thread calls it.
    """

    def __init__(self, num_pages: int, page_size: int, enable_radix: bool = True) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self.enable_radix = bool(enable_radix)
        self._allocator = PageAllocator(num_pages)
        self._tree = RadixCache(page_size)
        # Pages handed out by allocate() and not yet released: one byte per page, O(1) checks.
        self._is_private = bytearray(num_pages)
        self._num_private = 0

    # ----------------------------------------------------------------------------------- counters

    @property
    def num_total(self) -> int:
        """Size of the page pool."""
        return self._allocator.num_total

    @property
    def num_free(self) -> int:
        """Pages in the allocator's free list."""
        return self._allocator.num_free

    @property
    def num_evictable(self) -> int:
        """Cached pages no live request uses (reclaimable by ``allocate``)."""
        return self._tree.evictable_pages

    @property
    def num_locked(self) -> int:
        """Pages a live request depends on: locked tree prefixes plus private pages."""
        return self._tree.locked_pages + self._num_private

    @property
    def available_pages(self) -> int:
        """Pages ``allocate`` could hand out right now (free + evictable)."""
        return self._allocator.num_free + self._tree.evictable_pages

    # ----------------------------------------------------------------------------------- requests

    def acquire_prefix(self, token_ids: TokenIds) -> PrefixHandle:
        """Lock and return the longest cached page-aligned prefix of a prompt.

        Never covers the whole prompt: at most ``len(token_ids) - 1`` tokens (rounded down to a page)
        are matched, so at least the last prompt token is recomputed and yields logits. Locking can
        turn evictable pages into locked ones, so check ``available_pages`` after acquiring. With
        ``enable_radix=False`` the prefix is always empty.
        """
        tokens = as_token_array(token_ids)
        if not self.enable_radix or len(tokens) <= self.page_size:
            return PrefixHandle([], 0, None, tokens[:0].copy())
        pages, node = self._tree.match_prefix(tokens[: len(tokens) - 1])
        if not pages:
            # Nothing to lock; holding no node also keeps the handle valid across flush().
            return PrefixHandle([], 0, None, tokens[:0].copy())
        self._tree.lock(node)
        num_tokens = len(pages) * self.page_size
        return PrefixHandle(pages, num_tokens, node, tokens[:num_tokens].copy())

    def peek_prefix_len(self, token_ids: TokenIds) -> int:
        """Tokens ``acquire_prefix(token_ids)`` would reuse now; locks nothing, splits nothing, and does
        not count as a use for LRU (for ranking the waiting queue by cache hit)."""
        tokens = as_token_array(token_ids)
        if not self.enable_radix or len(tokens) <= self.page_size:
            return 0
        return self._tree.match_length(tokens[: len(tokens) - 1])

    def allocate(self, n_pages: int) -> list[int] | None:
        """Hand out ``n_pages`` private (locked) pages, evicting LRU cached pages if the free list is short.

        Returns ``None`` with no side effect at all (nothing evicted) if even eviction cannot supply
        ``n_pages``.
        """
        if n_pages < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n_pages})")
        shortfall = n_pages - self._allocator.num_free
        if shortfall > 0:
            if shortfall > self._tree.evictable_pages:
                return None
            # Every unlocked node's subtree is unlocked, so all evictable pages are reachable by
            # repeated leaf eviction and this returns exactly `shortfall` pages.
            self._allocator.free(self._tree.evict(shortfall))
        pages = self._allocator.alloc(n_pages)
        if pages is None:
            raise AssertionError("eviction freed fewer pages than evictable_pages promised")
        is_private = self._is_private
        for page in pages:
            is_private[page] = 1
        self._num_private += len(pages)
        return pages

    def release(
        self,
        handle: PrefixHandle,
        token_ids: TokenIds,
        pages: Sequence[int] | np.ndarray,
        cache: bool = True,
    ) -> None:
        """A request is done with its KV (finished, aborted or retracted); afterwards it holds nothing.

        ``pages`` is the request's whole page table in order: ``handle.pages`` followed by every page
        ``allocate`` gave it. ``token_ids`` are the tokens whose KV is written in those pages (a prefix
        of the request's tokens; ``len(token_ids) <= len(pages) * page_size``).

        With ``cache`` and the radix index on, the full pages' tokens are inserted into the tree (which
        takes the pages it lacked; private pages duplicating what it already had are freed), the
        partial last page and any unused pages are freed, and the handle's lock is dropped. Otherwise
        the private pages are freed and the lock dropped. Validates everything before changing state.
        """
        page_size = self.page_size
        tokens = as_token_array(token_ids)
        page_list = [int(page) for page in pages]
        prefix_len = len(handle.pages)
        if handle.released:
            raise ValueError("this prefix handle was already released")
        if page_list[:prefix_len] != handle.pages:
            raise ValueError("pages must start with the handle's prefix pages, in order")
        if len(tokens) > len(page_list) * page_size:
            raise ValueError(
                f"{len(tokens)} tokens cannot be written in {len(page_list)} pages of {page_size}"
            )
        private = page_list[prefix_len:]
        if len(set(private)) != len(private):
            raise ValueError("a page appears twice in the page table")
        for page in private:
            if not 0 <= page < self.num_total or not self._is_private[page]:
                raise ValueError(f"page {page} is not held privately by a request (double release?)")
        num_full = len(tokens) // page_size
        insert_into_tree = cache and self.enable_radix and num_full > 0
        if insert_into_tree:
            compared = min(len(tokens), handle.num_tokens)
            if not np.array_equal(tokens[:compared], handle.prefix_tokens[:compared]):
                raise ValueError("token_ids do not start with the tokens of the handle's cached prefix")

        handle.released = True
        to_free: list[int] = []
        if insert_into_tree:
            duplicates = self._tree.insert(tokens[: num_full * page_size], page_list[:num_full])
            # The tree now owns private pages at positions < num_full except the duplicates, which
            # can only be private pages (prefix pages equal the tree's own at the same position).
            for page in duplicates:
                if not self._is_private[page]:
                    raise AssertionError(f"tree reported non-private page {page} as a duplicate")
            to_free.extend(duplicates)
            to_free.extend(page_list[max(num_full, prefix_len) :])
        else:
            to_free.extend(private)
        is_private = self._is_private
        for page in private:
            is_private[page] = 0
        self._num_private -= len(private)
        self._allocator.free(to_free)
        if handle.node is not None:
            self._tree.unlock(handle.node)

    def flush(self) -> bool:
        """Drop the whole prefix cache; refused (``False``) while any request holds a page."""
        if self.num_locked > 0:
            return False
        self._allocator.free(self._tree.reset())
        return True

    # ----------------------------------------------------------------------------------- checks

    def check_invariant(self) -> None:
        """Recount every page's state from scratch (O(pool): tests and idle only).

        Raises ``AssertionError`` with a description if a page is in two states or none, or if a
        counter disagrees with the recount.
        """
        num_total = self.num_total
        evictable, tree_locked = self._tree.check_invariant()
        owner = ["" for _ in range(num_total)]

        def claim(page: int, state: str) -> None:
            if not 0 <= page < num_total:
                raise AssertionError(f"{state} page {page} is outside the pool 0..{num_total - 1}")
            if owner[page]:
                raise AssertionError(f"page {page} is both {owner[page]} and {state}")
            owner[page] = state

        num_free = 0
        for page in range(num_total):
            if self._allocator.is_free(page):
                claim(page, "free")
                num_free += 1
            if self._is_private[page]:
                claim(page, "private to a request")
        for page in evictable:
            claim(page, "evictable in the tree")
        for page in tree_locked:
            claim(page, "locked in the tree")
        unowned = [page for page in range(num_total) if not owner[page]]
        if unowned:
            raise AssertionError(f"pages in no state (leaked): {unowned[:20]}")
        num_private = sum(self._is_private)
        if num_free != self.num_free or num_private != self._num_private:
            raise AssertionError(
                f"counters (free {self.num_free}, private {self._num_private}) != recount "
                f"(free {num_free}, private {num_private})"
            )
        if self.num_free + self.num_evictable + self.num_locked != num_total:
            raise AssertionError(
                f"free {self.num_free} + evictable {self.num_evictable} + locked {self.num_locked} "
                f"!= total {num_total}"
            )
