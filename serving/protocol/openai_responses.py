"""OpenAI response objects and stream chunks (contract 7.2 / 7.3), built from `/generate` items.

Everything here reads the `/generate` wire objects (`text`, `output_ids`, `meta_info`, contract 3.4 /
3.6) that `GenerateFormatter.item` produces, never the engine's internals, so whatever `/generate`
reports (finish reasons, cached tokens, logprobs) the OpenAI routes report the same way. Stream chunks
carry deltas: each choice remembers how much text and how many logprob entries it has sent.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.protocol.openai_requests import OpenAIGenerate

Kind = Literal["completion", "chat"]


def finish_fields(meta: dict[str, Any]) -> tuple[str | None, int | str | None]:
    """(`finish_reason`, `matched_stop`): the /generate finish object's type, and what a stop matched."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    return reason["type"], reason.get("matched")


def usage(items: list[dict[str, Any]], n: int, cache_report: bool) -> dict[str, Any]:
    """SGLang's UsageProcessor: a prompt counts once for its n samples; completions add up;
    `prompt_tokens_details` only with --enable-cache-report and some tokens actually cached."""
    prompt_tokens = sum(item["meta_info"]["prompt_tokens"] for item in items[::n])
    completion_tokens = sum(item["meta_info"]["completion_tokens"] for item in items)
    cached = sum(item["meta_info"].get("cached_tokens", 0) for item in items) if cache_report else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached} if cached > 0 else None, "reasoning_tokens": 0}


def completion_logprobs(entries: list, tops: list | None) -> dict[str, Any]:
    """The legacy completions `logprobs` object from `[logprob, id, text]` entries (and per-position top
    lists, None where nothing was computed); SGLang reports no text offsets (-1 each)."""
    top_logprobs = [None if top is None else {t[2]: t[0] for t in top} for top in (tops or [])]
    return {"text_offset": [-1] * len(entries), "token_logprobs": [e[0] for e in entries],
            "tokens": [e[2] for e in entries], "top_logprobs": top_logprobs}


def _token_entry(logprob: float | None, text: str | None) -> dict[str, Any]:
    text = text or ""
    return {"token": text, "bytes": list(text.encode("utf-8")), "logprob": logprob}


def chat_logprobs(entries: list, tops: list | None) -> dict[str, Any]:
    """The chat `logprobs` object: one content entry per output token with its top alternatives."""
    tops = tops or [None] * len(entries)
    content = []
    for (logprob, _, text), top in zip(entries, tops, strict=False):
        alternatives = [_token_entry(t[0], t[2]) for t in (top or [])]
        content.append({**_token_entry(logprob, text), "top_logprobs": alternatives})
    return {"content": content}


@dataclass
class _Choice:
    """What one choice of a stream has sent so far."""

    text: int = 0
    logprobs: int = 0
    role_sent: bool = False


@dataclass
class OpenAIFormatter:
    """Formats one OpenAI call's /generate items: the whole response, or its stream chunks."""

    kind: Kind
    request: OpenAIGenerate
    weight_version: str
    cache_report: bool
    echo_texts: list[str] = field(default_factory=list)  # completions with echo: each prompt's text
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    _choices: dict[int, _Choice] = field(default_factory=dict)

    @property
    def object_name(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    def _logprobs(self, item: dict[str, Any], start: int, with_input: bool) -> dict[str, Any] | None:
        if self.request.top_logprobs is None:
            return None
        meta = item["meta_info"]
        entries = list(meta.get("output_token_logprobs") or [])[start:]
        tops = list(meta.get("output_top_logprobs") or [])[start:] if self.request.top_logprobs else None
        if self.kind == "chat":
            return chat_logprobs(entries, tops)
        if with_input:  # echo: the prompt's own logprobs first (the first one is null)
            entries = list(meta.get("input_token_logprobs") or []) + entries
            if tops is not None:
                tops = list(meta.get("input_top_logprobs") or []) + tops
        return completion_logprobs(entries, tops)

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.request.n] if self.request.echo else ""

    def _choice(self, index: int, item: dict[str, Any], text: str, logprobs: dict | None) -> dict[str, Any]:
        reason, matched = finish_fields(item["meta_info"])
        if self.kind == "completion":
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
                    "matched_stop": matched}
        message = {"role": "assistant", "content": text, "reasoning_content": None, "tool_calls": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                "matched_stop": matched}

    def response(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The non-streamed body from every item's final /generate object, in index order."""
        if items:
            self.id = items[0]["meta_info"]["id"]
        choices = [self._choice(i, item, self._echo(i) + item["text"], self._logprobs(item, 0, self.request.echo))
                   for i, item in enumerate(items)]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.request.model,
                "choices": choices, "usage": usage(items, self.request.n, self.cache_report),
                "metadata": {"weight_version": self.weight_version}}

    # -- streaming -------------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict[str, Any]], usage_value: dict | None = None) -> dict[str, Any]:
        name = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {"id": self.id, "object": name, "created": self.created, "model": self.request.model,
                "choices": choices, "usage": usage_value}

    def chunks(self, index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks one snapshot of choice `index` produces (none when it adds nothing)."""
        if not self._choices:  # SGLang names a stream after its first item's request id
            self.id = item["meta_info"]["id"]
        state = self._choices.setdefault(index, _Choice())
        first = not state.role_sent
        state.role_sent = True
        text = item["text"]
        delta, state.text = text[state.text:], len(text)
        logprobs = self._logprobs(item, state.logprobs, first and self.request.echo)
        state.logprobs = len(item["meta_info"].get("output_token_logprobs") or [])
        reason, matched = finish_fields(item["meta_info"])
        chunk_usage = None
        if self.request.continuous_usage:
            chunk_usage = usage([item], 1, self.cache_report)
        out = []
        if self.kind == "completion":
            if first:
                delta = self._echo(index) + delta
            if delta or reason is not None or logprobs and logprobs["tokens"]:
                out.append(self._chunk([{"index": index, "text": delta, "logprobs": logprobs,
                                         "finish_reason": reason, "matched_stop": matched}], chunk_usage))
            return out
        if first:  # the role first, with empty content (contract 7.3)
            out.append(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None, "matched_stop": None}], chunk_usage))
        if delta or logprobs and logprobs["content"]:
            out.append(self._chunk([{"index": index, "delta": {"content": delta}, "logprobs": logprobs,
                                     "finish_reason": None, "matched_stop": None}], chunk_usage))
        if reason is not None:
            out.append(self._chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason,
                                     "matched_stop": matched}], chunk_usage))
        return out

    def usage_chunk(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """`stream_options.include_usage`: the last chunk, no choices, the whole call's usage."""
        return self._chunk([], usage(items, self.request.n, self.cache_report))
