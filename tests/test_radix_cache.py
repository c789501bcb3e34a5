"""Tests for serving.radix_cache: page-aligned radix prefix index, locks and LRU eviction.

Randomized tests draw a fresh seed each run (printed, so a failure can be replayed with
RADIX_TEST_SEED=<seed>) and compare the tree against a brute-force model.
"""

from __future__ import annotations

import numpy as np
import pytest

from serving.radix_cache import RadixCache, RadixNode
from tests.conftest import replayable_seed

PAGE = 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(replayable_seed("RADIX_TEST_SEED"))


def test_rejects_bad_page_size_and_misaligned_insert() -> None:
    with pytest.raises(ValueError):
        RadixCache(0)
    cache = RadixCache(PAGE)
    with pytest.raises(ValueError):
        cache.insert(range(7), [0, 1])
    with pytest.raises(ValueError):
        cache.match_prefix(np.zeros((2, 4), dtype=np.int64))


def test_empty_tree_matches_nothing() -> None:
    cache = RadixCache(PAGE)
    pages, node = cache.match_prefix(range(12))
    assert pages == [] and node is cache.root
    assert cache.match_prefix([])[0] == []
    assert cache.evict(0) == [] and cache.evict(5) == []
    assert (cache.total_pages, cache.evictable_pages, cache.locked_pages) == (0, 0, 0)


def test_insert_then_match_whole_pages_only() -> None:
    cache = RadixCache(PAGE)
    assert cache.insert(range(12), [10, 11, 12]) == []
    assert cache.match_prefix(range(12))[0] == [10, 11, 12]
    assert cache.match_prefix(range(15))[0] == [10, 11, 12]  # extra tokens beyond the tree
    assert cache.match_prefix(range(11))[0] == [10, 11]  # a partial page never matches
    assert cache.match_prefix(range(3))[0] == []
    # Mismatch in the middle of page 2 (token 9): only pages 0 and 1 match.
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 6, 7, 8, 99, 10, 11])[0] == [10, 11]
    assert cache.total_pages == 3 and cache.evictable_pages == 3
    cache.check_invariant()


def test_split_on_page_boundary_and_match_after_split() -> None:
    cache = RadixCache(PAGE)
    a = list(range(100, 112))  # 3 pages
    cache.insert(a, [0, 1, 2])
    assert cache.num_nodes == 1
    # Diverges inside page 1 (token index 6): the shared part is page 0 only.
    b = a[:6] + [900, 901] + [902, 903, 904, 905]
    duplicates = cache.insert(b, [7, 8, 9])
    assert duplicates == [7]  # page 0 was already cached as page 0
    assert cache.num_nodes == 3
    head = cache.root.children[np.asarray(a[:PAGE], dtype=np.int64).tobytes()]
    assert head.pages == [0] and len(head.key) == PAGE
    assert sorted(child.pages[0] for child in head.children.values()) == [1, 8]
    assert cache.match_prefix(a)[0] == [0, 1, 2]
    assert cache.match_prefix(b)[0] == [0, 8, 9]
    assert cache.match_prefix(a[:8] + [0, 0, 0, 0])[0] == [0, 1]
    assert cache.total_pages == 5
    cache.check_invariant()


def test_match_ending_inside_node_splits_and_returns_exact_node() -> None:
    cache = RadixCache(PAGE)
    tokens = list(range(16))
    cache.insert(tokens, [5, 6, 7, 8])
    pages, node = cache.match_prefix(tokens[:9])
    assert pages == [5, 6] and node.pages == [5, 6]
    assert cache.num_nodes == 2
    (tail,) = node.children.values()
    assert tail.pages == [7, 8] and tail.parent is node
    # Matching again through the split point still returns the whole run.
    pages, deepest = cache.match_prefix(tokens)
    assert pages == [5, 6, 7, 8] and deepest is tail
    cache.check_invariant()


def test_insert_reports_duplicates_but_not_identical_pages() -> None:
    cache = RadixCache(PAGE)
    tokens = list(range(20))
    cache.insert(tokens[:8], [0, 1])
    # Same first page id (the caller got it from the tree), a different copy of page 1, new pages.
    assert cache.insert(tokens[:16], [0, 41, 42, 43]) == [41]
    assert cache.match_prefix(tokens)[0] == [0, 1, 42, 43]
    # Fully cached: everything the caller computed itself is a duplicate.
    assert cache.insert(tokens[:16], [50, 51, 52, 53]) == [50, 51, 52, 53]
    assert cache.insert(tokens[:16], [0, 1, 42, 43]) == []
    assert cache.insert([], []) == []
    assert cache.total_pages == 4
    cache.check_invariant()


def test_lru_eviction_order() -> None:
    cache = RadixCache(PAGE)
    first, second, third = [[k] * PAGE for k in (1, 2, 3)]
    cache.insert(first, [1])
    cache.insert(second, [2])
    cache.insert(third, [3])
    cache.match_prefix(first)  # first is now the most recently used
    assert cache.evict(1) == [2]
    assert cache.evict(1) == [3]
    assert cache.evict(1) == [1]
    assert cache.evict(1) == []
    assert cache.total_pages == 0 and cache.num_nodes == 0
    cache.check_invariant()


def test_evict_trims_tail_pages_of_a_long_leaf() -> None:
    cache = RadixCache(PAGE)
    tokens = list(range(12))
    cache.insert(tokens, [4, 5, 6])
    assert cache.evict(1) == [6]
    assert cache.match_prefix(tokens)[0] == [4, 5]
    assert cache.evictable_pages == 2
    assert sorted(cache.evict(10)) == [4, 5]
    cache.check_invariant()


def test_locked_nodes_and_ancestors_are_never_evicted() -> None:
    cache = RadixCache(PAGE)
    shared = [7] * PAGE
    cache.insert(shared + [1] * PAGE, [0, 1])
    cache.insert(shared + [2] * PAGE, [0, 2])
    cache.insert([3] * PAGE, [3])
    pages, node = cache.match_prefix(shared + [1] * PAGE)
    assert pages == [0, 1]
    cache.lock(node)
    assert cache.locked_pages == 2 and cache.evictable_pages == 2 and cache.total_pages == 4
    assert sorted(cache.evict(100)) == [2, 3]
    assert cache.match_prefix(shared + [1] * PAGE)[0] == [0, 1]
    assert cache.evict(1) == []
    cache.lock(node)  # locks are counted
    cache.unlock(node)
    assert cache.evict(1) == []
    cache.unlock(node)
    assert cache.locked_pages == 0 and cache.evictable_pages == 2
    with pytest.raises(AssertionError):
        cache.unlock(node)  # more unlocks than locks is a bug
    assert cache.evict(1) == [1]  # the leaf first, then its parent
    assert cache.evict(1) == [0]
    cache.check_invariant()


def test_parent_evicted_only_after_its_children() -> None:
    cache = RadixCache(PAGE)
    prefix = [5] * (2 * PAGE)
    cache.insert(prefix + [1] * PAGE, [10, 11, 12])
    cache.insert(prefix + [2] * PAGE, [10, 11, 13])
    cache.insert([9] * PAGE, [20])  # most recently used: evicted last
    cache.match_prefix([9] * PAGE)
    order = cache.evict(5)
    assert set(order[:2]) == {12, 13}
    assert sorted(order[2:4]) == [10, 11]
    assert order[4] == 20
    cache.check_invariant()


def test_lock_survives_split_of_locked_node() -> None:
    cache = RadixCache(PAGE)
    tokens = list(range(16))
    cache.insert(tokens, [0, 1, 2, 3])
    _, node = cache.match_prefix(tokens)
    cache.lock(node)
    assert cache.locked_pages == 4
    pages, head = cache.match_prefix(tokens[:8])  # splits the locked node
    assert pages == [0, 1] and head.lock_ref == 1 and node.parent is head
    assert cache.locked_pages == 4 and cache.evictable_pages == 0
    cache.check_invariant()
    cache.unlock(node)
    assert cache.locked_pages == 0 and cache.evictable_pages == 4
    assert cache.evict(2) == [2, 3]
    cache.check_invariant()


def test_reset_returns_every_page_and_invalidates_nodes() -> None:
    cache = RadixCache(PAGE)
    cache.insert(range(8), [1, 2])
    cache.insert(list(range(4)) + [9] * 4, [1, 3])
    _, node = cache.match_prefix(range(8))
    cache.lock(node)
    assert sorted(cache.reset()) == [1, 2, 3]
    assert (cache.total_pages, cache.num_nodes) == (0, 0)
    with pytest.raises(ValueError):
        cache.lock(node)
    with pytest.raises(ValueError):
        cache.unlock(node)
    assert cache.match_prefix(range(8))[0] == []
    cache.check_invariant()


def test_heap_stays_bounded_under_repeated_touches() -> None:
    cache = RadixCache(PAGE)
    for k in range(5):
        cache.insert([k] * PAGE, [k])
    for _ in range(10_000):
        cache.match_prefix([3] * PAGE)
    assert len(cache._heap) <= 2 * cache.num_nodes + 65
    assert cache.evict(5)[-1] == 3
    cache.check_invariant()


def test_numpy_and_list_inputs_agree() -> None:
    cache = RadixCache(PAGE)
    cache.insert(np.arange(8, dtype=np.int32), np.array([3, 4]))
    assert cache.match_prefix(list(range(8)))[0] == [3, 4]
    assert all(type(page) is int for page in cache.match_prefix(np.arange(8))[0])


class ReferenceIndex:
    """Brute force model: every inserted page-aligned prefix -> the page the tree keeps for it."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.page_of: dict[tuple[int, ...], int] = {}

    def insert(self, tokens: list[int], pages: list[int]) -> list[int]:
        duplicates = []
        for i, page in enumerate(pages):
            key = tuple(tokens[: (i + 1) * self.page_size])
            if key in self.page_of:
                if self.page_of[key] != page:
                    duplicates.append(page)
            else:
                self.page_of[key] = page
        return duplicates

    def match(self, tokens: list[int]) -> list[int]:
        pages = []
        for i in range(len(tokens) // self.page_size):
            key = tuple(tokens[: (i + 1) * self.page_size])
            if key not in self.page_of:
                break
            pages.append(self.page_of[key])
        return pages


def random_sequences(rng: np.random.Generator, count: int, vocab: int = 5) -> list[list[int]]:
    """Token sequences sharing random prefixes (small vocab so divergences land mid-page too)."""
    sequences: list[list[int]] = []
    for _ in range(count):
        if sequences and rng.random() < 0.8:
            base = sequences[rng.integers(len(sequences))]
            shared = base[: rng.integers(len(base) + 1)]
        else:
            shared = []
        tail = rng.integers(0, vocab, size=rng.integers(0, 4 * PAGE)).tolist()
        sequences.append(shared + tail)
    return sequences


def test_random_insert_and_match_against_reference(rng: np.random.Generator) -> None:
    cache = RadixCache(PAGE)
    reference = ReferenceIndex(PAGE)
    next_page = 0
    for tokens in random_sequences(rng, 300):
        nodes = cache.num_nodes
        assert cache.match_length(tokens) == len(reference.match(tokens)) * PAGE
        assert cache.num_nodes == nodes  # peeking never splits
        assert cache.match_prefix(tokens)[0] == reference.match(tokens)
        num_pages = len(tokens) // PAGE
        aligned = tokens[: num_pages * PAGE]
        # The caller reuses the cached pages it matched and computes the rest itself.
        matched = reference.match(aligned)
        pages = matched + list(range(next_page, next_page + num_pages - len(matched)))
        next_page += num_pages - len(matched)
        if rng.random() < 0.2:  # sometimes the caller recomputed everything
            pages = list(range(next_page, next_page + num_pages))
            next_page += num_pages
        assert cache.insert(aligned, pages) == reference.insert(aligned, pages)
        evictable, locked = cache.check_invariant()
        assert locked == [] and sorted(evictable) == sorted(reference.page_of.values())
    for tokens in random_sequences(rng, 100):
        assert cache.match_prefix(tokens)[0] == reference.match(tokens)


def test_random_locks_and_eviction(rng: np.random.Generator) -> None:
    cache = RadixCache(PAGE)
    owned: set[int] = set()  # pages currently held by the tree
    next_page = 0
    held: list[tuple[RadixNode, list[int], list[int]]] = []  # (node, tokens, pages) locked by "requests"
    sequences = random_sequences(rng, 400, vocab=3)
    for tokens in sequences:
        op = rng.random()
        if op < 0.45:
            aligned = tokens[: len(tokens) // PAGE * PAGE]
            matched, _ = cache.match_prefix(aligned)
            fresh = list(range(next_page, next_page + len(aligned) // PAGE - len(matched)))
            next_page += len(fresh)
            duplicates = cache.insert(aligned, matched + fresh)
            assert duplicates == []
            owned.update(fresh)
        elif op < 0.7:
            pages, node = cache.match_prefix(tokens)
            cache.lock(node)
            held.append((node, tokens, pages))
        elif op < 0.85 and held:
            node, tokens_held, pages_held = held.pop(rng.integers(len(held)))
            cache.unlock(node)
        else:
            want = int(rng.integers(0, 6))
            before = cache.evictable_pages
            leaves = [n for n in cache._iter_nodes() if not n.children and n.lock_ref == 0]
            oldest = min((leaf.last_access for leaf in leaves), default=None)
            lru_pages = {page for leaf in leaves if leaf.last_access == oldest for page in leaf.pages}
            evicted = cache.evict(want)
            assert len(evicted) == min(want, before)
            if evicted:
                assert evicted[0] in lru_pages  # the first victim is a least-recently-used leaf
            assert set(evicted) <= owned
            owned.difference_update(evicted)
        evictable, locked = cache.check_invariant()
        assert set(evictable) | set(locked) == owned
        # Every locked request still sees its whole prefix, with the same pages.
        for _, tokens_held, pages_held in held:
            assert cache.match_prefix(tokens_held)[0][: len(pages_held)] == pages_held
    for node, _, _ in held:
        cache.unlock(node)
    assert cache.locked_pages == 0
    assert sorted(cache.evict(cache.total_pages)) == sorted(owned)
    assert cache.num_nodes == 0 and cache.total_pages == 0
