"""One generation request as the scheduler sees it: tokens, pages, progress, stop conditions, output."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serving.tokenizer import IncrementalDetokenizer


@dataclass
class Output:
    """A snapshot handed to the engine: cumulative text and ids, plus the counters of meta_info."""

    rid: str
    text: str
    output_ids: list[int]
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    retractions: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    rid: str
    input_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int
    stop_ids: frozenset[int]  # EOS and stop_token_ids; empty with ignore_eos
    stop_strings: tuple[str, ...]
    no_stop_trim: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int
    stream: bool
    stream_interval: int
    emit: Callable[[Output], None]
    detokenizer: IncrementalDetokenizer | None  # None with --skip-tokenizer-init
    created: float = field(default_factory=time.monotonic)

    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache (the cached prefix included)
    pages: list[int] = field(default_factory=list)
    prefix_handle: Any = None
    cached_tokens: int | None = None  # set at first admission
    retractions: int = 0
    finish_reason: dict[str, Any] | None = None
    _emitted_tokens: int = 0
    _text: str = ""

    # -- tokens ---------------------------------------------------------------------------------
    @property
    def total_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens `[start, end)` of prompt + output, without building the whole list."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    def banned_ids(self) -> list[int]:
        """Ids masked while `min_new_tokens` is not reached (EOS and stop ids)."""
        return sorted(self.stop_ids) if len(self.output_ids) < self.min_new_tokens else []

    # -- progress -------------------------------------------------------------------------------
    def append_token(self, token: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        self.output_ids.append(token)
        if token in self.stop_ids:  # masked on device until min_new_tokens is reached
            self.finish_reason = {"type": "stop", "matched": token}
        elif self.detokenizer is not None:
            before = len(self.detokenizer.text)
            self.detokenizer.add(token)
            self._check_stop_strings(before)
        if self.finish_reason is None and len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = {"type": "length", "length": self.max_new_tokens}

    def _check_stop_strings(self, before: int) -> None:
        if not self.stop_strings:
            return
        text = self.detokenizer.text
        longest = max(len(s) for s in self.stop_strings)
        window_start = max(0, before - longest + 1)
        hits = [(text.find(s, window_start), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            index, stop = min(hits)
            self.finish_reason = {"type": "stop", "matched": stop}
            self._text = text if self.no_stop_trim else text[:index]

    def finish(self, reason: dict[str, Any]) -> None:
        self.finish_reason = reason

    # -- output ---------------------------------------------------------------------------------
    def current_text(self) -> str:
        if self.detokenizer is None:
            return ""
        if self.finish_reason is not None:
            if self.finish_reason.get("type") == "stop" and isinstance(self.finish_reason.get("matched"), str):
                return self._text
            return self.detokenizer.finish()
        text = self.detokenizer.text
        # Hold back the longest tail that may still grow into a stop string.
        hold = max(
            (k for stop in self.stop_strings for k in range(1, min(len(stop) - 1, len(text)) + 1)
             if text.endswith(stop[:k])),
            default=0,
        )
        return text[: len(text) - hold]

    def snapshot(self) -> Output:
        return Output(
            rid=self.rid, text=self.current_text(), output_ids=list(self.output_ids),
            finish_reason=self.finish_reason, prompt_tokens=len(self.input_ids),
            completion_tokens=len(self.output_ids), cached_tokens=self.cached_tokens or 0,
            retractions=self.retractions,
        )

    def maybe_emit(self) -> None:
        """Emit on finish, and while streaming every `stream_interval` new tokens."""
        if self.finish_reason is not None:
            self.emit(self.snapshot())
        elif self.stream and len(self.output_ids) - self._emitted_tokens >= self.stream_interval:
            self._emitted_tokens = len(self.output_ids)
            self.emit(self.snapshot())
