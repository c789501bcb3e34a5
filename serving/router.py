"""Which data-parallel replica (serving/replicas.py) runs each request: `--load-balance-method` and prefix
affinity.

Methods (SGLang's names): `round_robin` (the default, as SGLang's) takes the replicas in turn;
`shortest_queue` takes the replica with the fewest requests in flight (routed here and not finished yet:
running or waiting there), the lowest rank on a tie.

Prefix affinity, on top of either: the router remembers, per replica, the page-aligned prefixes of the
prompts it sent there (chained hashes of each full page of tokens, at most as many as the replica's
KV cache has pages, least recently routed forgotten first). When another replica already holds a longer
prefix of a new prompt than the method's choice, by at least `AFFINITY_TOKENS` tokens more for each
request it has in flight beyond the choice's (and at least `AFFINITY_TOKENS` in any case), that replica
takes the request: its radix cache most likely still holds those pages, so the prefill is shorter there.
The record is an estimate (a replica's own cache may have evicted the pages meanwhile; a flush forgets
everything), so a miss only costs the prefill the method's choice would have run anyway.

All samples of one prompt (`n` > 1) go to one replica, where its prefill-only warm-up copy put the shared
prefix; different prompts of one batch are routed one by one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.request import Request
    from serving.scheduler_inbox import SchedulerInbox

from serving.server_args_checks import LOAD_BALANCE_METHOD_CHOICES as LOAD_BALANCE_METHODS

AFFINITY_TOKENS = 64


class Router:
    """Thread-safe: the HTTP event loop and the Python API's threads route at once."""

    def __init__(self, method: str, page_size: int, pages_per_replica: Sequence[int]) -> None:
        if method not in LOAD_BALANCE_METHODS:
            raise ValueError(f"load balance method must be one of {', '.join(LOAD_BALANCE_METHODS)}, got {method!r}")
        self.method = method
        self.page_size = page_size
        self.in_flight = [0] * len(pages_per_replica)
        self.routed = [0] * len(pages_per_replica)  # requests sent to each replica since start
        self._capacity = list(pages_per_replica)
        self._prefixes: list[OrderedDict[int, None]] = [OrderedDict() for _ in pages_per_replica]
        self._next = 0
        self._lock = threading.Lock()

    def choose(self, input_ids: Sequence[int]) -> int:
        """The rank that runs a prompt; records its prefix there. Call `started` per request sent."""
        keys = self._page_keys(input_ids)
        with self._lock:
            rank = self._by_method()
            cached = [self._matched_pages(prefixes, keys) * self.page_size for prefixes in self._prefixes]
            best = max(range(len(cached)), key=lambda r: (cached[r], -self.in_flight[r]))
            extra_load = max(self.in_flight[best] - self.in_flight[rank], 0)
            if cached[best] - cached[rank] >= AFFINITY_TOKENS * (1 + extra_load):
                rank = best
            self._remember(rank, keys)
            return rank

    def started(self, rank: int) -> None:
        with self._lock:
            self.in_flight[rank] += 1
            self.routed[rank] += 1

    def finished(self, rank: int) -> None:
        with self._lock:
            self.in_flight[rank] -= 1

    def forget_prefixes(self) -> None:
        """After a flush of the replicas' prefix caches: nothing routed so far is cached anywhere."""
        with self._lock:
            for prefixes in self._prefixes:
                prefixes.clear()

    def _by_method(self) -> int:
        if self.method == "shortest_queue":
            return min(range(len(self.in_flight)), key=lambda r: (self.in_flight[r], r))
        rank = self._next
        self._next = (rank + 1) % len(self.in_flight)
        return rank

    def _page_keys(self, input_ids: Sequence[int]) -> list[int]:
        """One key per full page of the prompt, each naming the whole prefix up to that page's end."""
        keys, key = [], 0
        for start in range(0, len(input_ids) - self.page_size + 1, self.page_size):
            key = hash((key, tuple(input_ids[start:start + self.page_size])))
            keys.append(key)
        return keys

    @staticmethod
    def _matched_pages(prefixes: OrderedDict[int, None], keys: list[int]) -> int:
        matched = 0
        for key in keys:
            if key not in prefixes:
                break
            matched += 1
        return matched

    def _remember(self, rank: int, keys: list[int]) -> None:
        prefixes = self._prefixes[rank]
        for key in keys:
            prefixes[key] = None
            prefixes.move_to_end(key)
        while len(prefixes) > self._capacity[rank]:
            prefixes.popitem(last=False)


class Dispatch:
    """One call's requests on their replicas: `submit` routes (all samples of a prompt to the same replica),
    `finished` ends one request's share of its replica's load, `abort` the ones left unfinished."""

    def __init__(self, router: Router, schedulers: Sequence[SchedulerInbox]) -> None:
        self.router = router
        self.schedulers = schedulers
        self._prompt_rank: dict[tuple[int, ...], int] = {}
        self._rank_of: dict[str, int] = {}  # rid -> its replica, until finished

    def submit(self, request: Request, rank: int | None = None) -> None:
        """Send `request` to replica `rank` (a request's `data_parallel_rank`), or the router's choice."""
        prompt = tuple(request.input_ids)
        rank = self._prompt_rank.get(prompt) if rank is None else rank
        if rank is None:
            rank = self._prompt_rank[prompt] = self.router.choose(request.input_ids)
        self.router.started(rank)
        self._rank_of[request.rid] = rank
        self.schedulers[rank].submit(request)

    def finished(self, rid: str) -> None:
        rank = self._rank_of.pop(rid, None)
        if rank is not None:
            self.router.finished(rank)

    def abort(self, rids: set[str], cause: str) -> None:
        """Abort these unfinished requests by their exact ids, each on its replica."""
        for rid in rids:
            rank = self._rank_of.get(rid)
            if rank is not None:
                self.schedulers[rank].abort(rid, exact=True, cause=cause)
                self.finished(rid)
