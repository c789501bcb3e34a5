"""What a finished or streaming request looks like on the wire (contract 3.4, 3.5, 3.7).

`FinishReason` and `Output` are the typed records the scheduler produces and the engine's streaming
iterator yields; `GenerateFormatter` turns them into SGLang's `/generate` objects (`text`,
`output_ids`, `meta_info`). Both the HTTP routes and the engine's Python API format through here, so
they return the same dicts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

FinishKind = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class FinishReason:
    """Why a request ended. Build one with the constructors below; `to_dict()` gives the wire shape.

    `queued` marks an abort of a request still in the waiting queue, which SGLang reports with two
    keys only. An abort with a `status_code` turns a non-streamed response into that HTTP error; one
    without (a user abort) is delivered as HTTP 200 with the partial output.
    """

    kind: FinishKind
    matched: int | str | None = None  # stop: the token id or the stop string
    length: int | None = None  # length: the effective max_new_tokens (0 for prefill-only)
    message: str | None = None  # abort
    status_code: int | None = None  # abort
    err_type: str | None = None  # abort
    queued: bool = False  # abort

    @classmethod
    def stop_token(cls, token_id: int) -> FinishReason:
        """EOS, a stop_token_ids hit, or a model's extra stop id."""
        return cls("stop", matched=int(token_id))

    @classmethod
    def stop_string(cls, stop: str) -> FinishReason:
        return cls("stop", matched=stop)

    @classmethod
    def max_length(cls, length: int) -> FinishReason:
        return cls("length", length=int(length))

    @classmethod
    def abort(cls, message: str, status_code: int | None = None, err_type: str | None = None) -> FinishReason:
        """A running request aborted (a user abort: message "Aborted", status and err_type null)."""
        return cls("abort", message=message, status_code=status_code, err_type=err_type)

    @classmethod
    def abort_waiting(cls) -> FinishReason:
        return cls("abort", message="Abort in waiting queue", queued=True)

    @property
    def is_abort(self) -> bool:
        return self.kind == "abort"

    @property
    def matched_string(self) -> bool:
        """A stop string matched: the text is cut there (unless no_stop_trim)."""
        return self.kind == "stop" and isinstance(self.matched, str)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.kind == "length":
            return {"type": "length", "length": self.length}
        if self.queued:
            return {"type": "abort", "message": self.message}
        return {"type": "abort", "message": self.message, "status_code": self.status_code,
                "err_type": self.err_type}


@dataclass(frozen=True)
class Output:
    """A snapshot of one request: cumulative text and ids, plus the counters of meta_info.

    `index` is the request's position in its /generate response (prompt-major with n > 1)."""

    rid: str
    index: int
    text: str
    output_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    retractions: int
    embedding: list[float] | None = None  # a pooled request's vector (embedding or scores)
    # With return_logprob: the meta_info logprob keys (contract 3.6), cumulative.
    logprobs: dict[str, list] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class GenerateFormatter:
    """Formats the outputs of one /generate call, in the order they arrive.

    Stateful per call: `response_sent_to_client_ts` goes on each item's first chunk only, and with
    `stream_output` (the server's --stream-output) a stream chunk's `output_ids` holds only the ids
    new since that item's previous chunk; `text` stays cumulative either way (contract 3.7).
    """

    weight_version: str
    with_text: bool  # False with --skip-tokenizer-init: no `text` key at all
    stream: bool = False
    is_batch: bool = False
    stream_output: bool = False
    start: float = field(default_factory=time.perf_counter)
    _first_sent: set[int] = field(default_factory=set)
    _ids_sent: dict[int, int] = field(default_factory=dict)
    _finished: dict[int, tuple[FinishReason, dict[str, Any]]] = field(default_factory=dict)

    def item(self, out: Output) -> dict[str, Any]:
        """The generation object of one output (a stream event without its batch `index`)."""
        meta: dict[str, Any] = {
            "id": out.rid,
            "finish_reason": out.finish_reason.to_dict() if out.finish_reason is not None else None,
            "prompt_tokens": out.prompt_tokens, "weight_version": self.weight_version,
            "total_retractions": out.retractions, **(out.logprobs or {}),
            "completion_tokens": out.completion_tokens, "cached_tokens": out.cached_tokens,
        }
        if out.finished or not self.stream:
            meta["e2e_latency"] = time.perf_counter() - self.start
        if out.index not in self._first_sent:
            self._first_sent.add(out.index)
            meta["response_sent_to_client_ts"] = time.time()
        output_ids = out.output_ids
        if self.stream and self.stream_output:
            output_ids = output_ids[self._ids_sent.get(out.index, 0):]
            self._ids_sent[out.index] = len(out.output_ids)
        result: dict[str, Any] = {"output_ids": list(output_ids), "meta_info": meta}
        return {"text": out.text, **result} if self.with_text else result

    def chunk(self, out: Output) -> dict[str, Any]:
        """One stream event: the item, with a top-level `index` in a batch stream."""
        item = self.item(out)
        return {"index": out.index, **item} if self.is_batch else item

    def collect(self, out: Output) -> None:
        """Non-streamed: keep a finished output, formatted now so its e2e_latency is its own."""
        if out.finished:
            self._finished[out.index] = (out.finish_reason, self.item(out))

    def response(self) -> dict[str, Any] | list[dict[str, Any]]:
        """The non-streamed body from the collected outputs: a list in index order for a batch."""
        items = [self._finished[i][1] for i in sorted(self._finished)]
        return items if self.is_batch else items[0]

    def http_error(self) -> FinishReason | None:
        """The first collected abort that carries an HTTP status: the non-streamed response answers
        with that error instead of the outputs."""
        for reason, _ in self._finished.values():
            if reason.is_abort and reason.status_code:
                return reason
        return None
