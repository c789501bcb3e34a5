"""One request as the scheduler sees it: its task, tokens, pages, progress, stop conditions, output.

A request carries the client's validated `SamplingParams` as they are plus the few values the engine
resolved for it (seed, effective max_new_tokens, stop ids); the scheduler reads sampler settings from
`sampler_row()`, so no layer copies the sampling fields one by one.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serving.logprobs import LogprobRecord
from serving.protocol import FinishReason, Output, SamplingParams
from serving.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from serving.grammar import GrammarMatcher


class Task(enum.Enum):
    """What a request asks of the model. Only `generate` samples tokens; the others end after their
    prompt's prefill (pooling / scoring heads come with the model kinds that serve them)."""

    GENERATE = "generate"
    EMBED = "embed"
    SCORE = "score"


@dataclass(eq=False, kw_only=True)
class Request:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # resolved by the engine: the client's value, or the room the context leaves
    seed: int  # resolved by the engine: the client's sampling_seed or a fresh one (uint32)
    stop_ids: frozenset[int]  # EOS and stop_token_ids; empty with ignore_eos
    emit: Callable[[Output], None]
    detokenizer: IncrementalDetokenizer | None  # None with --skip-tokenizer-init
    task: Task = Task.GENERATE
    index: int = 0  # position in its /generate response
    stream: bool = False
    stream_interval: int = 1
    # Whether the prompt's computed KV may go into the radix cache when the request releases its pages.
    # True for generate requests (the n > 1 warm-up copy exists to leave its prompt there); other tasks
    # may run with attention whose KV a causal decode must not reuse, so they never insert.
    cache_kv: bool | None = None
    grammar: GrammarMatcher | None = None  # json_schema / regex / ebnf: masks every sampled token
    created: float = field(default_factory=time.monotonic)
    # time.monotonic() at its first admission and at its first output token (None until then): what
    # /metrics' queue-time and time-to-first-token histograms observe when the request finishes.
    admitted_at: float | None = None
    first_token_at: float | None = None
    logprobs: LogprobRecord | None = None  # with return_logprob

    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache (the cached prefix included)
    pages: list[int] = field(default_factory=list)
    prefix_handle: Any = None
    cached_tokens: int | None = None  # set at first admission
    retractions: int = 0
    finish_reason: FinishReason | None = None
    pooled: list[float] | None = None  # a non-generate request's result: its embedding or scores
    _emitted_tokens: int = 0
    _final_emitted: bool = False  # the finished output goes out once, whoever finishes it
    _text: str = ""

    def __post_init__(self) -> None:
        if self.cache_kv is None:
            self.cache_kv = self.task is Task.GENERATE

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def total_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def prefill_only(self) -> bool:
        """Finishes after its prompt's last prefill chunk: no decode, no token appended."""
        return self.task is not Task.GENERATE or self.max_new_tokens == 0

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens `[start, end)` of prompt + output, without building the whole list."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    def prefix_limit(self) -> int:
        """How many leading tokens the radix cache may serve (it matches at most this many minus one):
        the prompt positions whose input logprobs are still to be computed must run."""
        if self.logprobs is None or self.logprobs.next_input >= self.logprobs.input_end:
            return self.total_len
        return min(self.total_len, self.logprobs.next_input + 1)

    def banned_ids(self) -> list[int]:
        """Ids masked while `min_new_tokens` is not reached (EOS and stop ids)."""
        return sorted(self.stop_ids) if len(self.output_ids) < self.sampling.min_new_tokens else []

    def step_grammar(self, num_new: int) -> GrammarMatcher | None:
        """The matcher whose mask a step running `num_new` of its tokens needs: only when that step's token
        is kept (a decode, or the last chunk of a prefill or of a retracted request's re-prefill)."""
        if self.grammar is None or self.prefill_only or self.num_computed + num_new < self.total_len:
            return None
        return self.grammar

    def sampler_row(self) -> dict[str, float | int]:
        """This request's row of the sampler's batch (`SamplingBatch` fields, banned_ids apart)."""
        sp = self.sampling
        return {"temperature": 0.0 if sp.greedy else sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p,
                "min_p": sp.min_p, "seeds": self.seed, "steps": len(self.output_ids)}

    # -- progress -------------------------------------------------------------------------------
    def append_token(self, token: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        if not self.output_ids:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token)
        try:  # a complete grammar ends the request (below), with the token as `matched`, like SGLang
            grammar_done = self.grammar is not None and self.grammar.advance(token)
        except ValueError as exc:
            self.finish_reason = FinishReason.abort(f"Constrained decoding failed: {exc}", 500, "InternalServerError")
            return
        if token in self.stop_ids:  # masked on device until min_new_tokens is reached
            self.finish_reason = FinishReason.stop_token(token)
        elif self.detokenizer is not None:
            before = len(self.detokenizer.text)
            self.detokenizer.add(token)
            self._check_stop_strings(before)
        if self.finish_reason is None and grammar_done:
            self.finish_reason = FinishReason.stop_token(token)
        if self.finish_reason is None and len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = FinishReason.max_length(self.max_new_tokens)

    def _check_stop_strings(self, before: int) -> None:
        stop_strings, stop_regex = self.sampling.stop, self.sampling.stop_regex
        # Like SGLang, nothing stops a request before min_new_tokens (stop ids are banned on device).
        if not (stop_strings or stop_regex) or len(self.output_ids) < self.sampling.min_new_tokens:
            return
        text = self.detokenizer.text
        hits = []
        if stop_strings:
            longest = max(len(s) for s in stop_strings)
            window_start = max(0, before - longest + 1)
            hits = [(i, s) for i, s in ((text.find(s, window_start), s) for s in stop_strings) if i >= 0]
        # A regex may match text of any length, so it is searched over the whole text (re caches the
        # compiled pattern); any earlier match would have stopped the request at an earlier token.
        for pattern in stop_regex:
            match = re.search(pattern, text)
            if match:
                hits.append((match.start(), pattern))
        if hits:
            index, stop = min(hits)
            # finish_reason names the stop string, or the regex pattern (contract 3.5).
            self.finish_reason = FinishReason.stop_string(stop)
            self._text = text if self.sampling.no_stop_trim else text[:index]

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason

    # -- output ---------------------------------------------------------------------------------
    def current_text(self) -> str:
        if self.detokenizer is None:
            return ""
        if self.finish_reason is not None:
            if self.finish_reason.matched_string:
                return self._text
            return self.detokenizer.finish()
        text = self.detokenizer.text
        # Hold back the longest tail that may still grow into a stop string.
        hold = max(
            (k for stop in self.sampling.stop for k in range(1, min(len(stop) - 1, len(text)) + 1)
             if text.endswith(stop[:k])),
            default=0,
        )
        return text[: len(text) - hold]

    def snapshot(self) -> Output:
        return Output(
            rid=self.rid, index=self.index, text=self.current_text(), output_ids=list(self.output_ids),
            finish_reason=self.finish_reason, prompt_tokens=len(self.input_ids),
            completion_tokens=len(self.output_ids), cached_tokens=self.cached_tokens or 0,
            retractions=self.retractions, embedding=self.pooled,
            logprobs=None if self.logprobs is None else self.logprobs.meta(),
        )

    def maybe_emit(self) -> None:
        """Emit on finish, and while streaming every `stream_interval` new tokens."""
        if self.finish_reason is not None:
            if not self._final_emitted:
                self._final_emitted = True
                self.emit(self.snapshot())
        elif self.stream and len(self.output_ids) - self._emitted_tokens >= self.stream_interval:
            self._emitted_tokens = len(self.output_ids)
            self.emit(self.snapshot())
