"""The scheduler alone, driven step by step with a fake runner: no model, no compile.

The fake runner is a tiny deterministic "model": it writes each step's tokens into the pages the
scheduler gave it, reads every sequence's whole context back from those pages, and answers a token that
is a function of that context (honouring banned ids). So a wrong page table, a stale cached prefix or a
retraction that loses tokens changes the output, and a request's output never depends on how it was
scheduled. After each scenario the page invariant holds and no page is locked.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.config import RuntimeConfig
from serving.prefix_cache import PrefixCache
from serving.protocol import FinishReason, SamplingParams
from serving.request import Request, Task
from serving.sampler import MAX_BANNED_IDS
from serving.scheduler import Scheduler
from serving.tokenizer import IncrementalDetokenizer

VOCAB = 1000
PAGE = 4


def context_model(context: list[int]) -> int:
    """The fake model's next token: a hash of the whole context, never one of the ids 0..9."""
    h = 0
    for token in context:
        h = (h * 1_000_003 + token + 1) % 2**61
    return 10 + h % (VOCAB - 10)


class FakeRunner:
    def __init__(self, num_pages: int, model=context_model):
        self.kv = np.full((num_pages, PAGE), -1, np.int64)
        self.model = model
        self.batches = []  # every HostBatch seen
        self.fail_on_call: int | None = None
        self.lose_cache = False  # the failing call also loses the cache, as a donated buffer is lost
        self.lost = False

    def kv_cache_lost(self) -> bool:
        return self.lost

    def reset_kv_cache(self) -> None:
        self.lost = False

    def run(self, host) -> np.ndarray:
        self.batches.append(host)
        if self.fail_on_call == len(self.batches):
            if self.lose_cache:
                self.lost = True
                self.kv[:] = -1  # every value is gone: a page the scheduler still trusts fails a read below
            raise RuntimeError("device fell over")
        out, start = [], 0
        for s, (kv_len, q_len) in enumerate(zip(host.kv_lens.tolist(), host.q_lens.tolist(), strict=True)):
            pages = host.page_indices[s]
            assert len(pages) * PAGE >= kv_len, "the page table does not cover the sequence"
            for i, pos in enumerate(range(kv_len - q_len, kv_len)):
                self.kv[pages[pos // PAGE], pos % PAGE] = host.input_ids[start + i]
                assert host.positions[start + i] == pos
            start += q_len
            context = [int(self.kv[pages[p // PAGE], p % PAGE]) for p in range(kv_len)]
            assert -1 not in context, "a context token was never written"
            banned = {int(b) for b in host.sampling["banned_ids"][s] if b >= 0}
            token = self.model(context)
            while token in banned:
                token = (token + 1) % VOCAB
            out.append(token)
        return np.asarray(out, np.int32)

    def run_pool(self, host) -> np.ndarray:
        """A pooled step: each sequence's vector is (its length, its first token, its last token)."""
        self.run(host)
        ends = np.cumsum(host.q_lens)
        return np.stack([host.q_lens, host.input_ids[ends - host.q_lens], host.input_ids[ends - 1]], 1).astype(
            np.float32)


def reference(prompt: list[int], n: int, model=context_model) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(model(tokens))
    return tokens[len(prompt):]


class LetterTokenizer:
    """Each id decodes to one letter, enough for stop strings."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def make_scheduler(num_pages=64, *, max_running=8, step_tokens=64, chunk=32, policy="fcfs", model=context_model):
    cache = PrefixCache(num_pages, PAGE)
    runner = FakeRunner(num_pages, model)
    config = RuntimeConfig(platform="cpu", dtype="float32", kv_cache_dtype="auto", page_size=PAGE,
                           attention_backend="reference", max_running_requests=max_running,
                           chunked_prefill_size=chunk, max_step_tokens=step_tokens, context_length=None,
                           max_total_tokens=None, mem_fraction_static=0.25, unroll_layers=True, schedule_policy=policy)
    scheduler = Scheduler(runner, cache, config)
    return scheduler, runner, cache


def make_request(rid, prompt, max_new=8, *, outputs=None, stop_ids=(), task=Task.GENERATE, detok=False,
                 **sampling):
    outputs = outputs if outputs is not None else []
    return Request(
        rid=rid, input_ids=list(prompt), sampling=SamplingParams(max_new_tokens=max_new, **sampling),
        max_new_tokens=max_new, seed=0, stop_ids=frozenset(stop_ids), emit=outputs.append, task=task,
        detokenizer=IncrementalDetokenizer(LetterTokenizer()) if detok else None,
    )


def drive(scheduler, max_steps=2000):
    for _ in range(max_steps):
        scheduler.drain_inbox(block=False)
        if not (scheduler.waiting or scheduler.running):
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish its requests")


def check_pages(cache):
    cache.check_invariant()
    assert cache.num_locked == 0
    assert cache.num_free + cache.num_evictable + cache.num_locked == cache.num_total


def assert_still_serves(scheduler, cache, ids, max_new):
    """After a failure, a new request runs to the reference tokens and leaves the pages consistent."""
    after = make_request("after", ids, max_new)
    scheduler.submit(after)
    drive(scheduler)
    assert after.output_ids == reference(ids, max_new)
    check_pages(cache)


def prompt(n, seed):
    return np.random.default_rng(seed).integers(10, VOCAB, size=n).tolist()


def test_admission_respects_max_running_and_everything_finishes():
    scheduler, runner, cache = make_scheduler(max_running=2)
    outputs = []
    requests = [make_request(f"r{i}", prompt(6 + i, i), 5, outputs=outputs) for i in range(5)]
    for r in requests:
        scheduler.submit(r)
    drive(scheduler)
    assert max(len(b.kv_lens) for b in runner.batches) == 2
    assert len(runner.batches[0].kv_lens) == 2  # two admitted at once, the rest waited
    for r in requests:
        assert r.output_ids == reference(r.input_ids, 5)
        assert r.finish_reason == FinishReason.max_length(5)
    assert [o.rid for o in outputs if o.finished] and len(outputs) == 5  # non-streamed: one output each
    check_pages(cache)


def test_chunked_prefill_respects_chunk_size_and_token_budget():
    scheduler, runner, cache = make_scheduler(step_tokens=24, chunk=16)
    long, short = make_request("long", prompt(50, 1), 4), make_request("short", prompt(30, 2), 4)
    scheduler.submit(long)
    scheduler.submit(short)
    drive(scheduler)
    for batch in runner.batches:
        assert batch.q_lens.sum() <= 24 and batch.q_lens.max() <= 16
    assert runner.batches[0].q_lens.tolist() == [16, 8]  # the budget's rest goes to the second prompt
    assert len(runner.batches) > 4  # 80 prompt tokens in steps of at most 24 tokens
    for r in (long, short):
        assert r.output_ids == reference(r.input_ids, 4)
    check_pages(cache)


def test_retraction_reruns_and_gives_the_same_tokens():
    # 16 pages of 4 tokens; four requests of 10 + 14 tokens need 24 pages together.
    scheduler, runner, cache = make_scheduler(num_pages=16, max_running=4)
    requests = [make_request(f"r{i}", prompt(10, 10 + i), 14) for i in range(4)]
    for r in requests:
        scheduler.submit(r)
    drive(scheduler)
    assert sum(r.retractions for r in requests) > 0, "the cache never ran out"
    for r in requests:
        assert r.output_ids == reference(r.input_ids, 14)
        assert r.finish_reason == FinishReason.max_length(14)
    check_pages(cache)


@pytest.mark.parametrize("policy,first", [("lpm", "shares_prefix"), ("fcfs", "fresh")])
def test_lpm_admits_the_longest_cached_prefix_first(policy, first):
    scheduler, runner, cache = make_scheduler(max_running=1, policy=policy)
    base = prompt(20, 3)
    scheduler.submit(make_request("warm", base, 1))
    drive(scheduler)
    order = []
    for rid, ids in (("fresh", prompt(20, 4)), ("shares_prefix", base + [11, 12]), ("other", prompt(9, 5))):
        scheduler.submit(make_request(rid, ids, 2, outputs=[]))
    scheduler.drain_inbox(block=False)
    while scheduler.waiting or scheduler.running:
        scheduler.step()
        order.extend(r.rid for r in scheduler.running if r.rid not in order)
    assert order[0] == first
    check_pages(cache)


def test_a_request_the_cache_can_never_hold_is_a_400_abort():
    scheduler, runner, cache = make_scheduler(num_pages=8)  # 32 tokens
    outputs = []
    too_long = make_request("big", prompt(10, 6), 40, outputs=outputs)
    scheduler.submit(too_long)
    drive(scheduler)
    assert too_long.finish_reason.to_dict() == {
        "type": "abort", "message": "The KV cache cannot hold this request.", "status_code": 400,
        "err_type": "BadRequest"}
    assert outputs[-1].finished and len(too_long.output_ids) == 32 - 10 + 1  # KV for 32 tokens, the 33rd sampled
    check_pages(cache)
    assert_still_serves(scheduler, cache, prompt(5, 7), 3)


def test_a_failing_step_aborts_its_requests_and_the_scheduler_keeps_serving():
    scheduler, runner, cache = make_scheduler()
    runner.fail_on_call = 3
    doomed = [make_request(f"d{i}", prompt(6, 20 + i), 10) for i in range(2)]
    for r in doomed:
        scheduler.submit(r)
    drive(scheduler)
    for r in doomed:
        assert r.finish_reason.to_dict() == {"type": "abort", "message": "Internal error: device fell over",
                                             "status_code": 500, "err_type": "InternalServerError"}
        assert len(r.output_ids) == 2
    check_pages(cache)
    assert_still_serves(scheduler, cache, prompt(6, 22), 4)


def test_a_step_that_loses_the_cache_requeues_the_others_and_forgets_the_prefix_cache():
    scheduler, runner, cache = make_scheduler()
    shared = prompt(12, 30)
    warm = make_request("warm", shared, 3)
    scheduler.submit(warm)
    drive(scheduler)  # its prompt's full pages now sit in the radix cache
    assert cache.num_evictable > 0
    runner.fail_on_call, runner.lose_cache = len(runner.batches) + 3, True
    # One request in the failing step, another that has its prompt cached but is not in that step.
    doomed = make_request("doomed", prompt(6, 31), 10)
    scheduler.submit(doomed)
    for _ in range(2):
        scheduler.drain_inbox(block=False)
        scheduler.step()
    survivor = make_request("survivor", shared + prompt(3, 32), 8)
    scheduler.running.append(survivor)  # as if admitted earlier and now between steps
    survivor.prefix_handle = cache.acquire_prefix(survivor.input_ids)
    survivor.num_computed = survivor.prefix_handle.num_tokens
    survivor.pages = list(survivor.prefix_handle.pages)
    scheduler.max_step_tokens = 1  # the failing step: doomed's decode only, no room for survivor's prefill
    scheduler.step()
    scheduler.max_step_tokens = 64
    assert doomed.finish_reason is not None and survivor.finish_reason is None
    assert survivor in scheduler.waiting and survivor.num_computed == 0
    drive(scheduler)
    assert doomed.finish_reason.is_abort and doomed.finish_reason.status_code == 500
    # Requeued, re-prefilled from nothing (the FakeRunner's cache was wiped) and right.
    assert survivor.output_ids == reference(survivor.input_ids, 8) and survivor.retractions == 1
    check_pages(cache)
    assert_still_serves(scheduler, cache, shared, 4)


def test_finish_by_length_stop_id_and_stop_string():
    scheduler, runner, cache = make_scheduler()
    ids = prompt(7, 30)
    expected = reference(ids, 12)
    stop_id = expected[4]
    by_id = make_request("id", ids, 12, stop_ids=[stop_id])
    text = LetterTokenizer().decode(expected)
    stop = text[6:8]
    by_string = make_request("str", ids, 12, detok=True, stop=[stop])
    kept = make_request("kept", ids, 12, detok=True, stop=[stop], no_stop_trim=True)
    length = make_request("len", ids, 12, detok=True)
    for r in (by_id, by_string, kept, length):
        scheduler.submit(r)
    drive(scheduler)
    first = expected.index(stop_id)
    assert by_id.output_ids == expected[: first + 1]
    assert by_id.finish_reason.to_dict() == {"type": "stop", "matched": stop_id}
    cut_at = text.find(stop)
    assert by_string.finish_reason.to_dict() == {"type": "stop", "matched": stop}
    assert by_string.snapshot().text == text[:cut_at]
    assert by_string.output_ids == expected[: cut_at + len(stop)]
    assert kept.snapshot().text == text[: cut_at + len(stop)]
    assert length.output_ids == expected and length.snapshot().text == text
    assert length.finish_reason.to_dict() == {"type": "length", "length": 12}
    check_pages(cache)


def test_prefill_only_requests_finish_after_their_prompt():
    scheduler, runner, cache = make_scheduler(chunk=8)
    ids = prompt(21, 40)
    warm = make_request("warm", ids, 0)
    scheduler.submit(warm)
    drive(scheduler)
    assert warm.output_ids == [] and warm.finish_reason.to_dict() == {"type": "length", "length": 0}
    assert sum(b.q_lens.sum() for b in runner.batches) == 21  # the prompt once, in chunks, no decode
    assert cache.peek_prefix_len(ids) == 20  # a generate request's prompt is cached
    embed_ids = prompt(21, 41)
    embed = make_request("embed", embed_ids, 0, task=Task.EMBED)
    assert not embed.cache_kv and warm.cache_kv
    scheduler.submit(embed)
    drive(scheduler)
    assert embed.output_ids == [] and embed.finish_reason == FinishReason.max_length(0)
    assert cache.peek_prefix_len(embed_ids) == 0  # other tasks never insert their KV
    # A pooled prompt runs whole in one step (beyond the chunk size of 8) and gets its step's vector.
    assert runner.batches[-1].q_lens.tolist() == [21] and embed.pooled == [21, embed_ids[0], embed_ids[-1]]
    check_pages(cache)


def test_pooled_prompts_wait_for_a_step_that_holds_them_whole():
    scheduler, runner, cache = make_scheduler(step_tokens=24, chunk=8)
    requests = [make_request(f"e{i}", prompt(n, 70 + i), 0, task=Task.EMBED) for i, n in enumerate((10, 20, 4))]
    for r in requests:
        scheduler.submit(r)
    drive(scheduler)
    assert [b.q_lens.tolist() for b in runner.batches] == [[10], [20, 4]]  # 10 + 20 > 24: the second waits
    assert [r.pooled[0] for r in requests] == [10, 20, 4]
    check_pages(cache)


def test_abort_waiting_and_running():
    scheduler, runner, cache = make_scheduler(max_running=1)
    running, waiting = make_request("run-1", prompt(6, 50), 50), make_request("wait-1", prompt(6, 51), 50)
    scheduler.submit(running)
    scheduler.submit(waiting)
    scheduler.drain_inbox(block=False)
    for _ in range(3):
        scheduler.step()
    assert running in scheduler.running and waiting in scheduler.waiting
    scheduler.abort("wait")
    scheduler.abort("run")
    drive(scheduler)
    assert waiting.finish_reason.to_dict() == {"type": "abort", "message": "Abort in waiting queue"}
    assert running.finish_reason.to_dict() == {"type": "abort", "message": "Aborted", "status_code": None,
                                               "err_type": None}
    assert 0 < len(running.output_ids) < 50 and waiting.output_ids == []
    check_pages(cache)


def test_every_stop_id_is_banned_until_min_new_tokens():
    """Ten stop ids (more than the sampler's precompiled eight columns) and a model that always wants
    the last of them: the request must still run min_new_tokens tokens first."""
    stop_ids = list(range(10))
    scheduler, runner, cache = make_scheduler(model=lambda context: 9)
    r = make_request("min", prompt(5, 60), 20, stop_ids=stop_ids, min_new_tokens=3)
    scheduler.submit(r)
    drive(scheduler)
    assert r.output_ids == [10, 10, 10, 9]
    assert r.finish_reason.to_dict() == {"type": "stop", "matched": 9}
    banned = [b.sampling["banned_ids"] for b in runner.batches]
    assert banned[0].shape == (1, 16) and sorted(banned[0][0][banned[0][0] >= 0]) == stop_ids
    assert banned[-1].shape == (1, MAX_BANNED_IDS) and (banned[-1] == -1).all()  # min_new_tokens reached
    check_pages(cache)


def test_stop_strings_wait_for_min_new_tokens():
    """A stop string the model writes before min_new_tokens does not end the request (SGLang checks no
    stop condition before then); one written after it does."""
    scheduler, runner, cache = make_scheduler(model=lambda context: 1)  # always "b"
    early = make_request("early", prompt(5, 70), 12, detok=True, stop=["b"], min_new_tokens=4)
    plain = make_request("plain", prompt(5, 71), 12, detok=True, stop=["b"])
    for r in (early, plain):
        scheduler.submit(r)
    drive(scheduler)
    assert plain.output_ids == [1] and plain.snapshot().text == ""
    # Checked from the min_new_tokens-th token on (SGLang's check_finished), so the fourth stops it.
    assert early.output_ids == [1] * 4
    assert early.finish_reason.to_dict() == {"type": "stop", "matched": "b"}
    assert early.snapshot().text == "bbb"
    check_pages(cache)


def test_the_scheduler_thread_serves_submitted_requests():
    scheduler, runner, cache = make_scheduler()
    done = threading.Event()
    outputs = []

    def emit(out):
        outputs.append(out)
        if out.finished:
            done.set()

    r = make_request("threaded", prompt(9, 70), 6)
    r.emit = emit
    r.stream = True
    scheduler.start()
    try:
        scheduler.submit(r)
        assert done.wait(30)
    finally:
        scheduler.stop()
    assert [len(o.output_ids) for o in outputs] == [1, 2, 3, 4, 5, 6]
    assert outputs[-1].output_ids == reference(r.input_ids, 6)
    check_pages(cache)
