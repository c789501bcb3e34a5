"""Pooled requests (embeddings, classification / reward scores, rerank pairs) through the engine.

A validated `NormalizedEncode` becomes prefill-only requests of the served model's task: texts are
tokenized by the engine as for /generate, (query, document) pairs with the tokenizer's pair template.
The scheduler runs each whole prompt in one step and the runner's pooling step returns one vector per
sequence; the outputs come back in input order. Matryoshka `dimensions` are checked against the model
config (`matryoshka_dimensions` / `is_matryoshka`, as SGLang reads them) and cut the vector, which is
L2-normalised again when the model normalises.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING

import numpy as np

from serving.protocol import GenerateItem, NormalizedGenerate, Output, RequestError, SamplingParams
from serving.protocol.pooling import (
    IS_EMBEDDING_MESSAGE,
    NOT_CROSS_ENCODER_MESSAGE,
    EncodeItem,
    NormalizedEncode,
)
from serving.request import Task

if TYPE_CHECKING:
    from serving.engine import Engine

_SKIP_TOKENIZER_TEXT = "The server runs with --skip-tokenizer-init: give input_ids, not text."


class PooledRequestFailed(RequestError):
    """A request the scheduler aborted; carries the abort's HTTP status (400 if it has none)."""

    def __init__(self, message: str, status_code: int | None):
        super().__init__(message)
        self.status_code = status_code or 400


def check_dimensions(engine: Engine, dimensions: int | None) -> None:
    """Contract 4.1's Matryoshka checks, in its order."""
    if dimensions is None:
        return
    raw = engine.config.raw
    allowed = raw.get("matryoshka_dimensions")
    if not (raw.get("is_matryoshka") or allowed):
        raise RequestError(f"Model '{engine.model_path}' does not support matryoshka representation, changing "
                           "output dimensions will lead to poor results.")
    if dimensions < 1:
        raise RequestError("Requested dimensions must be greater than 0")
    if allowed and dimensions not in allowed:
        raise RequestError(f"Model '{engine.model_path}' only supports {allowed} matryoshka dimensions, using "
                           "other output dimensions will lead to poor results.")
    if dimensions > engine.config.hidden_size:
        raise RequestError(f"Provided dimensions are greater than max embedding dimension: "
                           f"{engine.config.hidden_size}")


def _item(engine: Engine, item: EncodeItem, cross_encoder: bool) -> GenerateItem:
    if item.pair is not None and not cross_encoder:
        raise RequestError(NOT_CROSS_ENCODER_MESSAGE)
    if item.input_ids is not None:
        bad = [t for t in item.input_ids if t >= engine.vocab_size]
        if bad:
            raise RequestError(f"Token ID {bad[0]} is out of vocabulary (vocab size: {engine.vocab_size})")
        return GenerateItem(item.index, item.rid, None, item.input_ids, SamplingParams())
    if engine.tokenizer is None:
        raise RequestError(_SKIP_TOKENIZER_TEXT)
    if item.pair is not None:
        return GenerateItem(item.index, item.rid, None, engine.tokenizer.encode_pair(*item.pair), SamplingParams())
    return GenerateItem(item.index, item.rid, item.text, None, SamplingParams())


async def run_pooled(engine: Engine, request: NormalizedEncode) -> list[Output]:
    """The finished outputs of every item, in input order; RequestError for what the model cannot serve."""
    if engine.task is Task.GENERATE:
        raise RequestError(IS_EMBEDDING_MESSAGE)
    check_dimensions(engine, request.dimensions)
    cross_encoder = bool(getattr(engine.runner.model_class, "cross_encoder", False))
    items = [_item(engine, item, cross_encoder) for item in request.items]
    finished: dict[int, Output] = {}
    async for out in engine.stream_outputs(NormalizedGenerate(request.is_batch, False, items), task=engine.task):
        if out.finished:
            finished[out.index] = out
    outputs = [finished[i] for i in sorted(finished)]
    for out in outputs:
        if out.finish_reason.is_abort:
            raise PooledRequestFailed(out.finish_reason.message, out.finish_reason.status_code)
    if request.dimensions is not None:
        normalize = engine.runner.pooling[1]
        outputs = [dataclasses.replace(out, embedding=_cut(out.embedding, request.dimensions, normalize))
                   for out in outputs]
    return outputs


def _cut(vector: list[float], dimensions: int, normalize: bool) -> list[float]:
    head = np.asarray(vector[:dimensions], np.float32)
    if normalize:
        head = head / max(float(np.linalg.norm(head)), 1e-12)
    return head.tolist()


def probe_request(body: dict) -> NormalizedEncode:
    """The warm-up / health-check /generate body as an encode request (its rid kept)."""
    item = EncodeItem(0, body.get("rid") or uuid.uuid4().hex, text=body.get("text"), input_ids=body.get("input_ids"))
    return NormalizedEncode(False, [item])
