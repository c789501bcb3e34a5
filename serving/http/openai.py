"""The OpenAI-compatible routes (contract section 7): today the model list. /v1/completions,
/v1/chat/completions and the other /v1 routes go here."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine


def register(app: Sanic, engine: Engine) -> None:
    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "pallas-serve",
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
