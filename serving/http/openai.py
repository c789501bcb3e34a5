"""The OpenAI-compatible routes (contract section 7): the model list; /v1/embeddings and /v1/rerank
(contract 4.3 / 4.5, pooled models); and, registered from their own modules, /v1/completions and
/v1/chat/completions (openai_generation.py) and /tokenize, /detokenize with their /v1/ twins (tokenize.py)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http import openai_generation, tokenize
from serving.http.envelopes import openai_error, read_json, schema_error
from serving.protocol import RequestError, SchemaError
from serving.protocol.pooling import (
    embeddings_response,
    parse_embeddings_request,
    parse_rerank_request,
    rerank_response,
)


def register(app: Sanic, engine: Engine) -> None:
    openai_generation.register(app, engine)
    tokenize.register(app, engine)

    def model_card(name: str) -> dict[str, Any]:
        # owned_by "sglang": contract 7.1, the card SGLang clients already know.
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
                "root": name, "parent": None, "max_model_len": engine.context_length}

    @app.get("/v1/models")
    async def list_models(request: Request):
        return sanic_response.json({"object": "list", "data": [model_card(engine.served_model_name)]})

    @app.get("/v1/models/<model_id:path>")
    async def get_model(request: Request, model_id: str):
        # Sanic hands the path segment over still percent-encoded; the `openai` client's
        # models.retrieve("org/model") requests /v1/models/org%2Fmodel (FastAPI decodes it for SGLang).
        model_id = unquote(model_id)
        if model_id != engine.served_model_name:
            return sanic_response.json({"error": {
                "message": f"The model '{model_id}' does not exist", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}}, status=404)
        return sanic_response.json(model_card(engine.served_model_name))

    # -- pooled models: validation failures of the body's shape in case B, the rest in case D ----------
    def pooled_error(exc: RequestError):
        return schema_error(str(exc)) if isinstance(exc, SchemaError) else openai_error(str(exc), exc.status_code)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        try:
            normalized = parse_embeddings_request(read_json(request))
            outputs = await engine.encode_request(normalized)
        except RequestError as exc:
            return pooled_error(exc)
        return sanic_response.json(embeddings_response(normalized, outputs, engine.model_path))

    @app.route("/v1/rerank", methods=["POST", "PUT"])
    async def rerank(request: Request):
        start = time.perf_counter()
        try:
            rerank_request = parse_rerank_request(read_json(request))
            outputs = await engine.encode_request(rerank_request.encode_request())
        except RequestError as exc:
            return pooled_error(exc)
        return sanic_response.json(rerank_response(rerank_request, outputs, engine.weight_version, start))
