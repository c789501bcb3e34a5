"""Embedding, classification and rerank bodies (contract section 4), without jax: parsed into
`NormalizedEncode`, and the wire shapes of their results.

- `/encode`, `/classify` (`parse_encode_request`): `text` (a string, a list of strings, or a list of
  `[query, document]` pairs for a cross-encoder) or `input_ids` (a list, or a list of lists). A list
  input answers a list, even of one (SGLang once unwrapped those). Unknown keys are ignored;
  `sampling_params` is ignored (nothing is sampled).
- `/v1/embeddings` (`parse_embeddings_request`): OpenAI's `input`, with SGLang's validation messages;
  `encoding_format` "float" or "base64" (little-endian float32 bytes, OpenAI's encoding).
- `/v1/rerank` (`parse_rerank_request`): `query` + `documents`, scored as pairs; `top_n` and
  `return_documents` (not in SGLang 0.5.6, which ignores them; Cohere's meaning) cut the sorted list
  and drop the document text.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from serving.protocol.errors import RequestError, schema_error, unsupported
from serving.protocol.json_checks import describe, is_int, is_int_list, is_str_list, object_body
from serving.protocol.outputs import Output

IS_EMBEDDING_MESSAGE = (
    "This model does not appear to be an embedding model by default. Please add `--is-embedding` when "
    "launching the server or try another model."
)
NOT_CROSS_ENCODER_MESSAGE = (
    "This model is not a cross-encoder: [query, document] pairs and /v1/rerank need one (e.g. an "
    "XLMRobertaForSequenceClassification reranker such as BAAI/bge-reranker-v2-m3)."
)
ENCODING_FORMATS = ("float", "base64")


class EncodeItem(NamedTuple):
    """One sequence to pool: exactly one of `text`, `pair` (query, document) and `input_ids` is set."""

    index: int
    rid: str
    text: str | None = None
    pair: tuple[str, str] | None = None
    input_ids: list[int] | None = None


@dataclass
class NormalizedEncode:
    is_batch: bool
    items: list[EncodeItem] = field(default_factory=list)
    dimensions: int | None = None  # Matryoshka: keep the first `dimensions` values (the engine checks)
    encoding_format: str = "float"


def _rids(body: Mapping[str, Any], count: int, is_batch: bool) -> list[str]:
    rid = body.get("rid")
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if not is_batch:
        if not isinstance(rid, str):
            raise schema_error(f"Field 'rid' must be a string, got {describe(rid)}.")
        return [rid]
    if not is_str_list(rid) or len(rid) != count:
        raise RequestError(f"rid must be a list of {count} strings for a batch of {count} inputs.")
    return list(rid)


def _dimensions(body: Mapping[str, Any]) -> int | None:
    value = body.get("dimensions")
    if value is not None and not is_int(value):
        raise schema_error(f"Field 'dimensions' must be an integer or null, got {describe(value)}.")
    return value


def _blank(text: str) -> bool:
    return not text.strip()


def parse_encode_request(body: object) -> NormalizedEncode:
    """An `/encode` or `/classify` body (contract 4.1 / 4.2)."""
    body = object_body(body, allow_empty=False)
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None and input_ids is not None:
        raise RequestError("text and input_ids cannot be provided at the same time")
    for key in ("image_data", "video_data", "audio_data", "input_embeds"):
        if body.get(key) is not None:
            raise unsupported(key)
    if text is None and input_ids is None:
        raise RequestError("At least one of text, input_ids, or image should be provided")
    dimensions = _dimensions(body)
    if input_ids is not None:
        is_batch = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
        seqs = input_ids if is_batch else [input_ids]
        if not seqs:
            raise RequestError("input_ids cannot be empty")
        for seq in seqs:
            if not is_int_list(seq):
                raise schema_error(f"Field 'input_ids' must be a list of integers or a list of such lists, got "
                                   f"{describe(input_ids)}.")
            if not seq:
                raise RequestError("input_ids cannot be empty")
        rids = _rids(body, len(seqs), is_batch)
        return NormalizedEncode(is_batch, [EncodeItem(i, rids[i], input_ids=list(s)) for i, s in enumerate(seqs)],
                                dimensions)
    if isinstance(text, str):
        if _blank(text):
            raise RequestError("text cannot be empty or whitespace only")
        return NormalizedEncode(False, [EncodeItem(0, _rids(body, 1, False)[0], text=text)], dimensions)
    if not isinstance(text, list) or not text:
        raise schema_error(f"Field 'text' must be a string or a non-empty list, got {describe(text)}.")
    rids = _rids(body, len(text), True)
    items = []
    for i, entry in enumerate(text):
        if isinstance(entry, str):
            if _blank(entry):
                raise RequestError(f"text at index {i} cannot be empty or whitespace only")
            items.append(EncodeItem(i, rids[i], text=entry))
        elif is_str_list(entry) and len(entry) == 2:
            if any(_blank(part) for part in entry):
                raise RequestError(f"text pair at index {i} cannot have an empty or whitespace-only part")
            items.append(EncodeItem(i, rids[i], pair=(entry[0], entry[1])))
        else:
            raise schema_error(f"Field 'text' must hold strings or [query, document] pairs; item {i} is "
                               f"{describe(entry)}.")
    return NormalizedEncode(True, items, dimensions)


def parse_embeddings_request(body: object) -> NormalizedEncode:
    """A `/v1/embeddings` body (contract 4.3), with SGLang's validation order and messages."""
    body = object_body(body, allow_empty=False)
    if "input" not in body:
        raise schema_error("Field 'input' is required.")
    value = body["input"]
    fmt = body.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise RequestError(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}; got {fmt!r}")
    if not value:
        raise RequestError("Input cannot be empty")
    if isinstance(value, str):
        if _blank(value):
            raise RequestError("Input cannot be empty or whitespace only")
        items = [EncodeItem(0, uuid.uuid4().hex, text=value)]
        return NormalizedEncode(False, items, _dimensions(body), fmt)
    if not isinstance(value, list):
        raise schema_error(f"Field 'input' must be a string or a list, got {describe(value)}.")
    first = value[0]
    if isinstance(first, str):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RequestError("All items in input list must be strings")
            if _blank(item):
                raise RequestError(f"Input at index {i} cannot be empty or whitespace only")
        items = [EncodeItem(i, uuid.uuid4().hex, text=t) for i, t in enumerate(value)]
    elif is_int(first):
        for i, item in enumerate(value):
            if not is_int(item):
                raise RequestError("All items in input list must be integers")
            if item < 0:
                raise RequestError(f"Token ID at index {i} must be non-negative")
        items = [EncodeItem(0, uuid.uuid4().hex, input_ids=list(value))]
    elif isinstance(first, list):
        for i, seq in enumerate(value):
            if not is_int_list(seq) or not seq:
                raise RequestError(f"Input at index {i} must be a non-empty list of token ids")
            if any(t < 0 for t in seq):
                raise RequestError(f"Token ID in input at index {i} must be non-negative")
        items = [EncodeItem(i, uuid.uuid4().hex, input_ids=list(s)) for i, s in enumerate(value)]
    elif isinstance(first, dict):
        raise unsupported("Multimodal embedding input")
    else:
        raise schema_error(f"Field 'input' has an unsupported item {describe(first)}.")
    return NormalizedEncode(True, items, _dimensions(body), fmt)


@dataclass
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = True

    def encode_request(self) -> NormalizedEncode:
        """One (query, document) pair per document, in document order."""
        items = [EncodeItem(i, uuid.uuid4().hex, pair=(self.query, doc)) for i, doc in enumerate(self.documents)]
        return NormalizedEncode(True, items)


def parse_rerank_request(body: object) -> RerankRequest:
    """A `/v1/rerank` body (contract 4.5), with SGLang's validation order and messages."""
    body = object_body(body, allow_empty=False)
    query, documents = body.get("query"), body.get("documents")
    if query is not None and not isinstance(query, str):
        raise schema_error(f"Field 'query' must be a string, got {describe(query)}.")
    if documents is not None and not isinstance(documents, list):
        raise schema_error(f"Field 'documents' must be a list of strings, got {describe(documents)}.")
    if not query:
        raise RequestError("Query cannot be empty")
    if _blank(query):
        raise RequestError("Query cannot be empty or whitespace only")
    if not documents:
        raise RequestError("Documents cannot be empty")
    for doc in documents:
        if not doc or not isinstance(doc, str):
            raise RequestError("Each document must be a non-empty string")
        if _blank(doc):
            raise RequestError("Each document cannot be empty or whitespace only")
    top_n = body.get("top_n")
    if top_n is not None and (not is_int(top_n) or top_n < 1):
        raise RequestError(f"top_n must be a positive integer, got {describe(top_n)}")
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise schema_error(f"Field 'return_documents' must be a boolean, got {describe(return_documents)}.")
    return RerankRequest(query, list(documents), top_n, return_documents)


# -- results on the wire ------------------------------------------------------------------------

def encode_meta(out: Output, weight_version: str, start: float) -> dict[str, Any]:
    """SGLang's embedding meta_info: no completion_tokens / cached_tokens (contract 4.1)."""
    return {"id": out.rid, "finish_reason": out.finish_reason.to_dict() if out.finish_reason else None,
            "prompt_tokens": out.prompt_tokens, "weight_version": weight_version,
            "total_retractions": out.retractions, "e2e_latency": time.perf_counter() - start,
            "response_sent_to_client_ts": time.time()}


def encode_response(request: NormalizedEncode, outputs: list[Output], weight_version: str, start: float):
    """`/encode` and `/classify`: `{"embedding", "meta_info"}`, or a list of them for a list input."""
    items = [{"embedding": out.embedding, "meta_info": encode_meta(out, weight_version, start)} for out in outputs]
    return items if request.is_batch else items[0]


def embeddings_response(request: NormalizedEncode, outputs: list[Output], model: str) -> dict[str, Any]:
    """`/v1/embeddings` (contract 4.3); `model` is the server's model path, as SGLang reports it."""
    def encoded(vector: list[float]):
        if request.encoding_format == "base64":
            return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
        return vector

    prompt_tokens = sum(out.prompt_tokens for out in outputs)
    return {"data": [{"embedding": encoded(out.embedding), "index": out.index, "object": "embedding"}
                     for out in outputs],
            "model": model, "object": "list",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None, "reasoning_tokens": 0}}


def rerank_response(request: RerankRequest, outputs: list[Output], weight_version: str, start: float):
    """`/v1/rerank` (contract 4.5): a bare list sorted by score, descending (ties keep document order)."""
    ranked = sorted(outputs, key=lambda out: -out.embedding[0])
    if request.top_n is not None:
        ranked = ranked[: request.top_n]
    results = []
    for out in ranked:
        item = {"score": out.embedding[0], "document": request.documents[out.index], "index": out.index,
                "meta_info": encode_meta(out, weight_version, start)}
        if not request.return_documents:
            del item["document"]
        results.append(item)
    return results
