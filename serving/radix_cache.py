"""Radix tree over token ids mapping page-aligned token prefixes to KV cache page ids.

SGLang-style prefix reuse on a paged cache: a request whose prompt starts with tokens whose KV is
already in the cache reuses those pages instead of recomputing them. Only whole pages are ever stored.

Tree invariants (``check_invariant`` verifies all of them):
  * every non-root node holds ``len(node.pages) >= 1`` pages and a key of exactly
    ``len(node.pages) * page_size`` token ids; page ``i`` of a node holds the KV of key tokens
    ``[i * page_size, (i + 1) * page_size)``;
  * a node's children are keyed by the bytes of their first page of tokens, so siblings differ in
    their first page and nodes split only on page boundaries;
  * each page id appears in at most one node;
  * ``node.lock_ref`` counts the ``lock`` calls on ``node`` or a descendant not yet undone, so a
    parent's count is at least the sum of its children's and a locked node's ancestors are locked;
  * ``evictable_pages`` / ``locked_pages`` are the page totals of nodes with ``lock_ref == 0`` /
    ``> 0``, kept incrementally.

Cost: ``match_prefix`` and ``insert`` are O(tokens involved), ``lock``/``unlock`` O(depth), ``evict``
O(log heap) per evicted node. LRU order uses a lazily invalidated heap of candidate leaves (stale
entries are skipped when popped and purged when the heap outgrows the tree), so nothing walks the
whole tree per call except ``reset`` and ``check_invariant``.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

__all__ = ["RadixCache", "RadixNode", "TokenIds", "as_token_array"]

TokenIds = Sequence[int] | np.ndarray
"""Token ids as a Python sequence or a 1-D integer array."""

_HeapEntry = tuple[int, int, "RadixNode"]


def as_token_array(token_ids: TokenIds) -> np.ndarray:
    """Token ids as a contiguous 1-D int64 array (no copy if already one)."""
    tokens = np.ascontiguousarray(token_ids, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError(f"token ids must be 1-D, got shape {tokens.shape}")
    return tokens


class RadixNode:
    """One tree edge: a run of whole pages of tokens and the page ids holding their KV.

    ``key`` and ``pages`` belong to the tree; callers must not modify them. A node object keeps its
    identity when the tree splits it (the split creates a new *parent*), so a node returned by
    ``match_prefix`` and locked stays valid until it is unlocked.
    """

    __slots__ = ("children", "evicted", "key", "last_access", "lock_ref", "pages", "parent")

    def __init__(self, key: np.ndarray, pages: list[int], parent: RadixNode | None, last_access: int) -> None:
        self.key = key
        self.pages = pages
        self.parent = parent
        self.children: dict[bytes, RadixNode] = {}
        self.lock_ref = 0
        self.last_access = last_access
        self.evicted = False

    def __repr__(self) -> str:
        return (
            f"RadixNode(pages={self.pages}, tokens={len(self.key)}, lock_ref={self.lock_ref}, "
            f"children={len(self.children)})"
        )


class RadixCache:
    """Prefix index: page-aligned token prefixes -> page ids, with lock counts and LRU eviction.

    The tree owns the page ids it holds until ``evict`` or ``reset`` hands them back; it never talks to
    the allocator itself. Not thread-safe: the scheduler thread is the only caller.
    """

    def __init__(self, page_size: int) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = int(page_size)
        self._clock = 0
        self._heap_seq = 0
        self._init_tree()

    def _init_tree(self) -> None:
        self.root = RadixNode(np.zeros(0, dtype=np.int64), [], None, 0)
        self._num_nodes = 0
        self._evictable_pages = 0
        self._locked_pages = 0
        self._heap: list[_HeapEntry] = []

    # ----------------------------------------------------------------------------------- counters

    @property
    def evictable_pages(self) -> int:
        """Pages in nodes with ``lock_ref == 0`` (all of them can be evicted)."""
        return self._evictable_pages

    @property
    def locked_pages(self) -> int:
        """Pages in nodes with ``lock_ref > 0``."""
        return self._locked_pages

    @property
    def total_pages(self) -> int:
        """All pages the tree holds."""
        return self._evictable_pages + self._locked_pages

    @property
    def num_nodes(self) -> int:
        """Non-root nodes in the tree."""
        return self._num_nodes

    # ----------------------------------------------------------------------------------- lookup

    def match_prefix(self, token_ids: TokenIds) -> tuple[list[int], RadixNode]:
        """Longest cached page-aligned prefix of ``token_ids``.

        Returns its page ids (one per ``page_size`` tokens, in order) and the deepest matched node
        (the root if nothing matched). If the match ends inside a node, that node is split on the page
        boundary so the returned node covers exactly the match. Marks the matched path as used now.
        The caller must ``lock`` the node before anything can evict (``evict``) its pages.
        """
        tokens = as_token_array(token_ids)
        page_size = self.page_size
        limit = len(tokens) - len(tokens) % page_size
        self._clock += 1
        now = self._clock
        node = self.root
        pages: list[int] = []
        pos = 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + page_size].tobytes())
            if child is None:
                break
            matched = self._matched_pages(child.key, tokens, pos, limit)
            if matched < len(child.pages):
                # matched >= 1: the child was found by its first page. Only the matched head counts
                # as used; the tail keeps its access time (and so its valid heap entry).
                node = self._split(child, matched)
                node.last_access = now
                pages.extend(node.pages)
                break
            child.last_access = now
            node = child
            pages.extend(child.pages)
            pos += len(child.key)
        if node is not self.root and not node.children and node.lock_ref == 0:
            self._push(node)
        return pages, node

    def match_length(self, token_ids: TokenIds) -> int:
        """Token count of the longest cached page-aligned prefix, with no side effect at all.

        Unlike ``match_prefix`` it neither splits nodes nor counts as a use for LRU, so it is safe for
        ranking or admission heuristics that only peek.
        """
        tokens = as_token_array(token_ids)
        page_size = self.page_size
        limit = len(tokens) - len(tokens) % page_size
        node = self.root
        pos = 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + page_size].tobytes())
            if child is None:
                break
            matched = self._matched_pages(child.key, tokens, pos, limit)
            pos += matched * page_size
            if matched < len(child.pages):
                break
            node = child
        return pos

    def insert(self, token_ids: TokenIds, pages: Sequence[int] | np.ndarray) -> list[int]:
        """Insert whole pages: ``token_ids[i*page_size:(i+1)*page_size]`` is held by ``pages[i]``.

        Requires ``len(token_ids) == len(pages) * page_size``. Where the tree already holds a prefix
        it keeps its own pages; the returned list holds the caller's pages that it therefore did not
        take (the caller must free them). A caller page identical to the tree's page at the same
        position is not returned. Pages the tree takes are unlocked (evictable) immediately.
        """
        tokens = as_token_array(token_ids)
        page_size = self.page_size
        if len(tokens) != len(pages) * page_size:
            raise ValueError(
                f"insert needs len(token_ids) == len(pages) * page_size, got {len(tokens)} tokens for "
                f"{len(pages)} pages of {page_size}"
            )
        limit = len(tokens)
        self._clock += 1
        now = self._clock
        duplicates: list[int] = []
        node = self.root
        pos = 0
        while pos < limit:
            child = node.children.get(tokens[pos : pos + page_size].tobytes())
            if child is None:
                break
            matched = self._matched_pages(child.key, tokens, pos, limit)
            first_page = pos // page_size
            for offset, tree_page in enumerate(child.pages[:matched]):
                caller_page = int(pages[first_page + offset])
                if caller_page != tree_page:
                    duplicates.append(caller_page)
            if matched < len(child.pages):
                node = self._split(child, matched)
                node.last_access = now
                pos += matched * page_size
                break
            child.last_access = now
            node = child
            pos += len(child.key)
        if pos < limit:
            leaf = RadixNode(
                tokens[pos:].copy(), [int(page) for page in pages[pos // page_size :]], node, now
            )
            node.children[leaf.key[:page_size].tobytes()] = leaf
            self._num_nodes += 1
            self._evictable_pages += len(leaf.pages)
            self._push(leaf)
        elif node is not self.root and not node.children and node.lock_ref == 0:
            self._push(node)
        return duplicates

    def _matched_pages(self, key: np.ndarray, tokens: np.ndarray, pos: int, limit: int) -> int:
        """Number of whole pages at the start of ``key`` equal to ``tokens[pos:limit]``."""
        length = min(len(key), limit - pos)
        mismatch = key[:length] != tokens[pos : pos + length]
        if not mismatch.any():
            return length // self.page_size
        return int(mismatch.argmax()) // self.page_size

    def _split(self, child: RadixNode, num_pages: int) -> RadixNode:
        """Split ``child`` after its first ``num_pages`` pages; returns the new parent (the head).

        ``child`` keeps its identity (and any locks held through it) as the tail. The head inherits
        ``child``'s lock count and access time, so lock counts and page counters stay consistent and
        the tail's heap entry stays valid.
        """
        parent = child.parent
        assert parent is not None
        split_tokens = num_pages * self.page_size
        head = RadixNode(child.key[:split_tokens], child.pages[:num_pages], parent, child.last_access)
        head.lock_ref = child.lock_ref
        child.key = child.key[split_tokens:]
        child.pages = child.pages[num_pages:]
        child.parent = head
        head.children[child.key[: self.page_size].tobytes()] = child
        parent.children[head.key[: self.page_size].tobytes()] = head
        self._num_nodes += 1
        return head

    # ----------------------------------------------------------------------------------- locks

    def lock(self, node: RadixNode) -> None:
        """Protect ``node`` and its ancestors from eviction (counted; undo with ``unlock``)."""
        if node.evicted:
            raise ValueError("cannot lock an evicted node")
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.pages)
                self._locked_pages += len(node.pages)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one ``lock(node)``; nodes whose count reaches zero become evictable again."""
        if node.evicted:
            raise ValueError("cannot unlock a node that is no longer in the tree (was the tree reset?)")
        while node is not self.root:
            if node.lock_ref <= 0:
                raise AssertionError(f"unlock of a node that is not locked: {node!r}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._locked_pages -= len(node.pages)
                self._evictable_pages += len(node.pages)
                if not node.children:
                    self._push(node)
            assert node.parent is not None
            node = node.parent

    # ----------------------------------------------------------------------------------- eviction

    def evict(self, num_pages: int) -> list[int]:
        """Free up to ``num_pages`` pages from least-recently-used unlocked leaves.

        Removes whole leaves in LRU order (a parent becomes a candidate once its last child goes); when
        a leaf holds more pages than still needed, only its trailing pages are dropped, so exactly
        ``min(num_pages, evictable_pages)`` pages are returned. The caller returns them to the
        allocator. Locked nodes and their ancestors are never touched.
        """
        freed: list[int] = []
        # Always go through self._heap: _push may rebuild (replace) it mid-loop.
        while len(freed) < num_pages and self._heap:
            entry = heapq.heappop(self._heap)
            last_access, _, node = entry
            if node.evicted or node.children or node.lock_ref > 0 or node.last_access != last_access:
                continue  # stale entry: the node changed since it was pushed
            needed = num_pages - len(freed)
            if len(node.pages) > needed:
                keep = len(node.pages) - needed
                freed.extend(node.pages[keep:])
                node.pages = node.pages[:keep]
                node.key = node.key[: keep * self.page_size]
                self._evictable_pages -= needed
                heapq.heappush(self._heap, entry)
                break
            freed.extend(node.pages)
            self._evictable_pages -= len(node.pages)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[: self.page_size].tobytes()]
            node.evicted = True
            node.parent = None
            self._num_nodes -= 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        return freed

    def _push(self, node: RadixNode) -> None:
        """Record ``node`` as an eviction candidate at its current access time."""
        self._heap_seq += 1
        heapq.heappush(self._heap, (node.last_access, self._heap_seq, node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        """Drop stale heap entries: O(nodes), run only after O(nodes) pushes, so amortized O(1)."""
        heap: list[_HeapEntry] = []
        for node in self._iter_nodes():
            if not node.children and node.lock_ref == 0:
                self._heap_seq += 1
                heap.append((node.last_access, self._heap_seq, node))
        heapq.heapify(heap)
        self._heap = heap

    def _iter_nodes(self) -> list[RadixNode]:
        """All non-root nodes, parents before children (O(nodes))."""
        nodes: list[RadixNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    # ----------------------------------------------------------------------------------- whole tree

    def reset(self) -> list[int]:
        """Drop every node (locked or not) and return all page ids the tree held."""
        pages: list[int] = []
        for node in self._iter_nodes():
            pages.extend(node.pages)
            node.evicted = True
            node.parent = None
        self._init_tree()
        return pages

    def check_invariant(self) -> tuple[list[int], list[int]]:
        """Verify the tree invariants by recounting from scratch (slow: tests and idle only).

        Returns ``(evictable page ids, locked page ids)``. Raises ``AssertionError`` naming the first
        violation found.
        """
        page_size = self.page_size
        evictable: list[int] = []
        locked: list[int] = []
        seen: set[int] = set()
        nodes = self._iter_nodes()
        for node in nodes:
            where = f"node {node!r}"
            if node.evicted:
                raise AssertionError(f"{where} is reachable but marked evicted")
            if not node.pages:
                raise AssertionError(f"{where} holds no pages")
            if len(node.key) != len(node.pages) * page_size:
                raise AssertionError(f"{where} has {len(node.key)} tokens for {len(node.pages)} pages")
            for child_key, child in node.children.items():
                if child.parent is not node:
                    raise AssertionError(f"{where}: child {child!r} has a different parent")
                if child_key != child.key[:page_size].tobytes():
                    raise AssertionError(f"{where}: child {child!r} is filed under the wrong first page")
            children_locks = sum(child.lock_ref for child in node.children.values())
            if node.lock_ref < children_locks:
                raise AssertionError(f"{where}: lock_ref below its children's total {children_locks}")
            for page in node.pages:
                if page in seen:
                    raise AssertionError(f"page {page} appears twice in the tree")
                seen.add(page)
            (locked if node.lock_ref > 0 else evictable).extend(node.pages)
        for child_key, child in self.root.children.items():
            if child.parent is not self.root or child_key != child.key[:page_size].tobytes():
                raise AssertionError(f"root child {child!r} is misfiled")
        if len(nodes) != self._num_nodes:
            raise AssertionError(f"node counter {self._num_nodes} != {len(nodes)} nodes in the tree")
        if len(evictable) != self._evictable_pages or len(locked) != self._locked_pages:
            raise AssertionError(
                f"page counters (evictable {self._evictable_pages}, locked {self._locked_pages}) != "
                f"recount (evictable {len(evictable)}, locked {len(locked)})"
            )
        return evictable, locked
