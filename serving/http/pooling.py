"""SGLang's native routes of pooled models (contract 4.1 / 4.2): `/encode` and `/classify`, one handler.

Both answer `{"embedding": [...], "meta_info": {...}}` (a list of them for a list input); for a reward or
classification model the "embedding" is the score vector (the walk-through reads `embedding[0]`). On a
generation model they are 400 with SGLang's `--is-embedding` message. The OpenAI-shaped routes of the
same models (/v1/embeddings, /v1/rerank) are in openai.py.
"""

from __future__ import annotations

import time

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http.envelopes import error_response, read_json
from serving.protocol import RequestError
from serving.protocol.pooling import encode_response, parse_encode_request


def register(app: Sanic, engine: Engine) -> None:
    @app.route("/encode", methods=["POST", "PUT"])
    @app.route("/classify", methods=["POST", "PUT"], name="classify_route")
    async def encode(request: Request):
        start = time.perf_counter()
        try:
            normalized = parse_encode_request(read_json(request))
            outputs = await engine.encode_request(normalized)
        except RequestError as exc:
            return error_response(str(exc), status=exc.status_code)
        return sanic_response.json(encode_response(normalized, outputs, engine.weight_version, start))
