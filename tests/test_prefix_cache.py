"""Tests for serving.page_allocator and serving.prefix_cache (the scheduler's view of KV pages).

The randomized simulation draws a fresh seed each run (printed; replay with PREFIX_TEST_SEED=<seed>).
It models the device KV cache as one "hash of the whole prefix" per token slot, so a reused page
holding the wrong KV, a page written while shared, or a page owned twice is caught, not just a
miscounted counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from serving.page_allocator import DoubleFreeError, PageAllocator
from serving.prefix_cache import PrefixCache, PrefixHandle
from tests.conftest import replayable_seed

PAGE = 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(replayable_seed("PREFIX_TEST_SEED"))


def counters(cache: PrefixCache) -> tuple[int, int, int, int]:
    return cache.num_free, cache.num_evictable, cache.num_locked, cache.available_pages


# ------------------------------------------------------------------------------------ allocator


def test_allocator_alloc_and_free() -> None:
    allocator = PageAllocator(5)
    assert (allocator.num_free, allocator.num_total) == (5, 5)
    assert allocator.alloc(0) == []
    first = allocator.alloc(2)
    assert first == [0, 1]
    assert allocator.alloc(4) is None  # never partial
    assert allocator.num_free == 3
    rest = allocator.alloc(3)
    assert rest is not None and sorted(first + rest) == [0, 1, 2, 3, 4]
    assert allocator.alloc(1) is None
    allocator.free(first)
    assert allocator.num_free == 2 and allocator.is_free(0) and not allocator.is_free(2)
    with pytest.raises(ValueError):
        allocator.alloc(-1)


def test_allocator_rejects_double_free_without_side_effects() -> None:
    allocator = PageAllocator(4)
    pages = allocator.alloc(3)
    assert pages == [0, 1, 2]
    allocator.free([1])
    with pytest.raises(DoubleFreeError):
        allocator.free([0, 1])  # 1 is already free; 0 must stay allocated
    assert isinstance(DoubleFreeError(), AssertionError)
    assert allocator.num_free == 2 and not allocator.is_free(0)
    with pytest.raises(DoubleFreeError):
        allocator.free([2, 2])
    assert allocator.num_free == 2 and not allocator.is_free(2)
    with pytest.raises(ValueError):
        allocator.free([0, 9])
    assert not allocator.is_free(0)
    allocator.free(np.array([0, 2]))
    assert sorted(allocator.alloc(4) or []) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------ prefix cache


def finish(cache: PrefixCache, tokens: list[int], cache_it: bool = True) -> PrefixHandle:
    """Run one request to completion: acquire, allocate the rest, release with all tokens written."""
    handle = cache.acquire_prefix(tokens)
    needed = -(-len(tokens) // PAGE) - len(handle.pages)
    private = cache.allocate(needed)
    assert private is not None
    cache.release(handle, tokens, handle.pages + private, cache=cache_it)
    cache.check_invariant()
    return handle


def test_fresh_cache_state() -> None:
    cache = PrefixCache(10, PAGE)
    assert counters(cache) == (10, 0, 0, 10) and cache.num_total == 10
    handle = cache.acquire_prefix(range(20))
    assert handle.pages == [] and handle.num_tokens == 0
    cache.check_invariant()
    with pytest.raises(ValueError):
        PrefixCache(10, 0)


def test_last_prompt_token_is_always_recomputed() -> None:
    cache = PrefixCache(16, PAGE)
    tokens = list(range(8))  # exactly two pages
    finish(cache, tokens)
    assert cache.num_evictable == 2
    handle = cache.acquire_prefix(tokens)  # same prompt: only 7 tokens may match -> one page
    assert handle.num_tokens == 4 and len(handle.pages) == 1
    cache.release(handle, [], handle.pages)
    handle = cache.acquire_prefix(tokens + [99])  # one more token: both pages reusable
    assert handle.num_tokens == 8 and len(handle.pages) == 2
    cache.release(handle, [], handle.pages)
    for short in (tokens[:1], tokens[:4], tokens[:5]):
        handle = cache.acquire_prefix(short)
        assert handle.num_tokens == (4 if len(short) == 5 else 0)
        cache.release(handle, [], handle.pages)
    cache.check_invariant()


def test_peek_prefix_len_has_no_side_effects() -> None:
    cache = PrefixCache(8, PAGE)
    old, new = list(range(12)), [9] * 8
    finish(cache, old)
    finish(cache, new)
    nodes = cache._tree.num_nodes
    assert cache.peek_prefix_len(old[:9]) == 8  # would split the node if it were a real match
    assert cache.peek_prefix_len(old) == 8  # the last token is always recomputed
    assert cache.peek_prefix_len(old + [0]) == 12
    assert cache.peek_prefix_len(old[:4]) == 0 and cache.peek_prefix_len([]) == 0
    assert cache._tree.num_nodes == nodes and cache.num_locked == 0
    pages = cache.allocate(cache.num_free + 1)  # peeking did not make `old` recently used...
    assert pages is not None
    assert cache.peek_prefix_len(old + [0]) == 8  # ...so its tail page was the one evicted
    assert cache.peek_prefix_len(new + [0]) == 8
    assert PrefixCache(8, PAGE, enable_radix=False).peek_prefix_len(old) == 0


def test_acquire_locks_prefix_and_release_unlocks() -> None:
    cache = PrefixCache(16, PAGE)
    tokens = list(range(13))
    finish(cache, tokens)  # 3 full pages cached, partial 4th page freed
    assert counters(cache) == (13, 3, 0, 16)
    handle = cache.acquire_prefix(tokens)
    assert handle.num_tokens == 12
    assert counters(cache) == (13, 0, 3, 13)
    cache.release(handle, tokens[:12], handle.pages, cache=False)
    assert counters(cache) == (13, 3, 0, 16)
    cache.check_invariant()


def test_release_with_cache_keeps_full_pages_and_frees_the_rest() -> None:
    cache = PrefixCache(16, PAGE)
    handle = cache.acquire_prefix(range(10))
    pages = cache.allocate(5)  # more pages than the KV written needs
    assert pages is not None and cache.num_locked == 5
    written = list(range(10))  # 2 full pages + 2 tokens in a partial page
    cache.release(handle, written, pages)
    assert counters(cache) == (14, 2, 0, 16)
    assert handle.released
    again = cache.acquire_prefix(list(range(10)) + [7])
    assert again.pages == pages[:2]
    cache.release(again, [], again.pages)
    cache.check_invariant()


def test_release_without_cache_frees_private_pages() -> None:
    cache = PrefixCache(16, PAGE)
    finish(cache, list(range(8)))
    handle = cache.acquire_prefix(list(range(12)))
    assert handle.num_tokens == 8
    private = cache.allocate(2)
    assert private is not None
    cache.release(handle, list(range(12)), handle.pages + private, cache=False)
    assert counters(cache) == (14, 2, 0, 16)
    assert cache.acquire_prefix(list(range(13))).num_tokens == 8  # nothing new was cached
    cache.check_invariant()


def test_concurrent_identical_prompts_free_duplicates() -> None:
    cache = PrefixCache(16, PAGE)
    tokens = list(range(9))
    first = cache.acquire_prefix(tokens)
    second = cache.acquire_prefix(tokens)
    pages_first = cache.allocate(3)
    pages_second = cache.allocate(3)
    assert pages_first is not None and pages_second is not None
    cache.release(first, tokens, pages_first)
    cache.release(second, tokens, pages_second)  # its 2 full pages duplicate the first's
    assert counters(cache) == (14, 2, 0, 16)
    handle = cache.acquire_prefix(tokens)
    assert handle.pages == pages_first[:2]
    cache.check_invariant()


def test_allocate_evicts_least_recently_used() -> None:
    cache = PrefixCache(6, PAGE)
    old, new = [1] * 8, [2] * 8
    finish(cache, old)
    finish(cache, new)
    assert counters(cache) == (2, 4, 0, 6)
    handle = cache.acquire_prefix(new + [0])
    new_pages = handle.pages
    cache.release(handle, [], handle.pages)
    handle = cache.acquire_prefix(old + [0])  # `old` is now the most recently used
    old_pages = handle.pages
    cache.release(handle, [], handle.pages)
    pages = cache.allocate(3)  # 2 free + 1 evicted: the last page of `new`
    assert pages is not None and new_pages[1] in pages
    assert counters(cache) == (0, 3, 3, 3)
    assert cache.acquire_prefix(old + [0]).pages == old_pages
    assert cache.acquire_prefix(new + [0]).pages == new_pages[:1]
    cache.check_invariant()


def test_allocate_never_evicts_acquired_prefix() -> None:
    cache = PrefixCache(6, PAGE)
    finish(cache, [1] * 8)
    finish(cache, [2] * 8)
    handle = cache.acquire_prefix([1] * 9)
    assert cache.available_pages == 4
    pages = cache.allocate(4)
    assert pages is not None and not set(pages) & set(handle.pages)
    assert cache.allocate(1) is None
    cache.check_invariant()


def test_allocate_none_has_no_side_effects() -> None:
    cache = PrefixCache(8, PAGE)
    finish(cache, [3] * 12)
    held = cache.allocate(3)
    assert held is not None
    before = counters(cache)
    nodes = cache._tree.num_nodes
    assert cache.allocate(cache.available_pages + 1) is None
    assert counters(cache) == before and cache._tree.num_nodes == nodes
    assert cache.acquire_prefix([3] * 13).num_tokens == 12  # nothing was evicted
    assert cache.allocate(0) == []
    with pytest.raises(ValueError):
        cache.allocate(-1)
    cache.check_invariant()


def test_flush_refused_while_anything_is_held() -> None:
    cache = PrefixCache(8, PAGE)
    tokens = [4] * 12
    finish(cache, tokens)
    handle = cache.acquire_prefix(tokens + [1])
    assert not cache.flush()
    cache.release(handle, [], handle.pages)
    private = cache.allocate(1)
    assert private is not None and not cache.flush()
    empty = cache.acquire_prefix([7] * 5)  # holds no pages: does not block a flush
    cache.release(cache.acquire_prefix([]), [], private)  # a handle with no prefix
    assert cache.flush()
    assert counters(cache) == (8, 0, 0, 8)
    assert cache.acquire_prefix(tokens + [1]).num_tokens == 0
    pages = cache.allocate(2)
    assert pages is not None
    cache.release(empty, [7] * 5, pages)  # a handle from before the flush stays usable
    assert cache.num_evictable == 1
    cache.check_invariant()


def test_radix_disabled_never_caches() -> None:
    cache = PrefixCache(8, PAGE, enable_radix=False)
    tokens = list(range(10))
    finish(cache, tokens)
    finish(cache, tokens)
    handle = cache.acquire_prefix(tokens + [1, 2, 3])
    assert handle.pages == [] and handle.num_tokens == 0
    assert counters(cache) == (8, 0, 0, 8)
    assert cache.flush()
    cache.check_invariant()


def test_release_validates_before_changing_state() -> None:
    cache = PrefixCache(16, PAGE)
    tokens = list(range(12))
    finish(cache, tokens)
    handle = cache.acquire_prefix(tokens + [5])
    private = cache.allocate(2)
    assert private is not None and handle.num_tokens == 12
    before = counters(cache)
    bad_calls = [
        (tokens + [5], private),  # prefix pages missing
        (tokens + [5], handle.pages[::-1] + private),  # prefix pages out of order
        ([9] + tokens[1:] + [5], handle.pages + private),  # tokens differ from the cached prefix
        (list(range(21)), handle.pages + private),  # more tokens than the pages hold
        (tokens + [5], handle.pages + private + [15]),  # page 15 is free, not the request's
        (tokens + [5], handle.pages + [private[0], private[0]]),  # a page twice
    ]
    for bad_tokens, bad_pages in bad_calls:
        with pytest.raises(ValueError):
            cache.release(handle, bad_tokens, bad_pages)
        assert counters(cache) == before and not handle.released
        cache.check_invariant()
    cache.release(handle, tokens + [5], handle.pages + private)
    with pytest.raises(ValueError):
        cache.release(handle, tokens + [5], handle.pages + private)  # double release
    assert counters(cache) == (13, 3, 0, 16)
    cache.check_invariant()


def test_release_with_fewer_tokens_than_the_prefix() -> None:
    # E.g. a request aborted before its KV was written: only part of the cached prefix is named.
    cache = PrefixCache(16, PAGE)
    tokens = list(range(12))
    finish(cache, tokens)
    handle = cache.acquire_prefix(tokens + [1])
    private = cache.allocate(1)
    assert private is not None
    cache.release(handle, tokens[:6], handle.pages + private)
    assert counters(cache) == (13, 3, 0, 16)
    cache.check_invariant()


def test_invariant_check_detects_corruption() -> None:
    cache = PrefixCache(8, PAGE)
    finish(cache, [1] * 8)
    pages = cache.allocate(1)
    assert pages is not None
    cache._allocator._is_free[pages[0]] = 1  # a page both free and private
    with pytest.raises(AssertionError, match="both"):
        cache.check_invariant()
    cache._allocator._is_free[pages[0]] = 0
    cache._is_private[pages[0]] = 0  # a leaked page
    with pytest.raises(AssertionError, match="leaked"):
        cache.check_invariant()


# ------------------------------------------------------------------------------------ simulation

_MOD = (1 << 61) - 1


def prefix_hashes(tokens: list[int], start_hash: int = 0) -> list[int]:
    """Hash of every prefix: what a token's KV depends on in a causal model."""
    hashes: list[int] = []
    value = start_hash
    for token in tokens:
        value = (value * 1_000_003 + token + 1) % _MOD
        hashes.append(value)
    return hashes


@dataclass
class SimRequest:
    prompt: list[int]
    target_len: int
    handle: PrefixHandle
    pages: list[int]
    written: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)


class Simulation:
    def __init__(self, rng: np.random.Generator, num_pages: int, enable_radix: bool) -> None:
        self.rng = rng
        self.cache = PrefixCache(num_pages, PAGE, enable_radix=enable_radix)
        self.kv = np.full((num_pages, PAGE), -1, dtype=np.int64)  # the "device" KV cache
        self.live: list[SimRequest] = []
        self.history: list[list[int]] = []
        self.admitted = 0
        self.rejected = 0
        self.retracted = 0
        self.evictions = 0
        self.prefix_hits = 0

    def new_prompt(self) -> list[int]:
        rng = self.rng
        if self.history and rng.random() < 0.85:
            base = self.history[rng.integers(len(self.history))]
            shared = base[: rng.integers(len(base) + 1)]
        else:
            shared = []
        tail: list[int] = rng.integers(0, 4, size=rng.integers(1, 3 * PAGE)).tolist()
        return shared[: 6 * PAGE] + tail

    def admit(self) -> None:
        prompt = self.new_prompt()
        self.history.append(prompt)
        peeked = self.cache.peek_prefix_len(prompt)
        handle = self.cache.acquire_prefix(prompt)
        assert handle.num_tokens == peeked
        assert handle.num_tokens % PAGE == 0 and handle.num_tokens <= len(prompt) - 1
        assert len(handle.pages) * PAGE == handle.num_tokens
        # The reused pages must hold exactly this prompt's KV.
        expected = prefix_hashes(prompt[: handle.num_tokens])
        for i, page in enumerate(handle.pages):
            assert self.kv[page].tolist() == expected[i * PAGE : (i + 1) * PAGE], "stale KV reused"
        self.prefix_hits += handle.num_tokens > 0
        target = len(prompt) + int(self.rng.integers(0, 2 * PAGE))
        # Admission control, as a scheduler would: room for the rest of the request plus headroom.
        needed = -(-target // PAGE) - len(handle.pages)
        if self.cache.available_pages < needed + len(self.live) // 4 and self.live:
            self.cache.release(handle, [], handle.pages)  # not admitted: give the prefix back
            self.rejected += 1
            return
        request = SimRequest(prompt, target, handle, list(handle.pages))
        request.written = prompt[: handle.num_tokens]
        request.hashes = expected
        self.live.append(request)
        self.admitted += 1

    def write(self, request: SimRequest, tokens: list[int]) -> bool:
        """Write KV for `tokens` after what is written, allocating pages; False if out of pages."""
        new_len = len(request.written) + len(tokens)
        missing = -(-new_len // PAGE) - len(request.pages)
        if missing > 0:
            self.evictions += missing > self.cache.num_free and missing <= self.cache.available_pages
            pages = self.cache.allocate(missing)
            if pages is None:
                return False
            others = {p for other in self.live if other is not request for p in other.pages}
            assert not set(pages) & others, "allocate handed out a page another request holds"
            request.pages.extend(pages)
        start_hash = request.hashes[-1] if request.hashes else 0
        for pos, value in enumerate(prefix_hashes(tokens, start_hash), start=len(request.written)):
            page = request.pages[pos // PAGE]
            assert pos >= request.handle.num_tokens and self.cache._is_private[page], (
                "writing KV into a page the request does not own privately"
            )
            self.kv[page, pos % PAGE] = value
            request.hashes.append(value)
        request.written = request.written + tokens
        return True

    def release(self, request: SimRequest, cache_it: bool) -> None:
        self.live.remove(request)
        self.cache.release(request.handle, request.written, request.pages, cache=cache_it)
        self.history.append(request.written)

    def step(self) -> None:
        rng = self.rng
        if not self.live or rng.random() < 0.25:
            self.admit()
            return
        request = self.live[rng.integers(len(self.live))]
        roll = rng.random()
        if roll < 0.05:  # abort mid-way: keep what was computed or not, at random
            self.release(request, cache_it=bool(rng.random() < 0.5))
        elif len(request.written) < len(request.prompt):  # (chunked) prefill
            chunk_end = len(request.written) + int(rng.integers(1, 2 * PAGE + 1))
            chunk = request.prompt[len(request.written) : chunk_end]
            if not self.write(request, chunk):
                self.release(request, cache_it=True)  # retract under memory pressure
                self.retracted += 1
        elif len(request.written) < request.target_len:  # decode one token
            if not self.write(request, [int(rng.integers(0, 4))]):
                self.release(request, cache_it=True)
                self.retracted += 1
        else:
            self.release(request, cache_it=True)

    def check(self) -> None:
        cache = self.cache
        cache.check_invariant()
        assert cache.num_free + cache.num_evictable + cache.num_locked == cache.num_total
        # Cached prefix pages may be shared by several requests; private pages belong to exactly one.
        private_list = [page for request in self.live for page in request.pages[len(request.handle.pages) :]]
        private = set(private_list)
        assert len(private_list) == len(private), "a private page is in two live requests' page tables"
        assert private == {page for page in range(cache.num_total) if cache._is_private[page]}
        shared = {page for request in self.live for page in request.handle.pages}
        assert not shared & private, "a page is both a cached prefix page and private to a request"
        _, tree_locked = cache._tree.check_invariant()
        assert shared <= set(tree_locked), "a live request's prefix page is not locked in the tree"
        assert cache.num_locked >= len(private) + len(shared)

    def drain(self) -> None:
        for request in list(self.live):
            self.release(request, cache_it=True)
            self.check()
        assert self.cache.num_locked == 0
        assert self.cache.flush()
        self.check()
        assert self.cache.num_free == self.cache.num_total


@pytest.mark.parametrize("enable_radix", [True, False])
def test_random_request_simulation(rng: np.random.Generator, enable_radix: bool) -> None:
    simulation = Simulation(rng, num_pages=40, enable_radix=enable_radix)
    while simulation.admitted < 400:
        simulation.step()
        simulation.check()
        if not simulation.live and rng.random() < 0.3:
            assert simulation.cache.flush()
            simulation.check()
        elif simulation.cache.num_locked and rng.random() < 0.02:
            assert not simulation.cache.flush()
    simulation.drain()
    assert simulation.retracted > 0 and simulation.rejected > 0  # memory pressure was exercised
    if enable_radix:
        assert simulation.prefix_hits > 0 and simulation.evictions > 0
    else:
        assert simulation.prefix_hits == 0 and simulation.evictions == 0
