"""`/metrics` (with `--enable-metrics`; 404 without, as in SGLang) and `/openapi.json`.

The OpenAPI document is built from Sanic's route table when it is asked for, so every route any module
registers is in it with the methods it really answers, and nothing can drift: one operation per route
and method, its summary the path in words and its description the handler's docstring, path
parameters from the route's `<name:type>` segments, and a request body of "any JSON object" for POST
and PUT (no route declares a schema). `DISABLE_OPENAPI_DOC` in the environment turns it off, as in
SGLang.
"""

from __future__ import annotations

import os
import re
from typing import Any

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.metrics import CONTENT_TYPE
from serving.server_info import _version

OPENAPI_VERSION = "3.1.0"  # what FastAPI 0.1xx serves
_PARAM = re.compile(r"<([^:>]+)(?::[^>]+)?>")
_BODY_METHODS = {"POST", "PUT", "PATCH"}
_DOCUMENTED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def register(app: Sanic, engine: Engine) -> None:
    if engine.server_args.enable_metrics:
        @app.get("/metrics")
        async def metrics(request: Request):
            """Prometheus metrics (SGLang's sglang:* series)."""
            return sanic_response.raw(await engine.metrics_text(), content_type=CONTENT_TYPE)

    if os.environ.get("DISABLE_OPENAPI_DOC", "").lower() not in ("", "0", "false", "no"):
        return

    @app.get("/openapi.json")
    async def openapi(request: Request):
        """This document: every route the server answers."""
        return sanic_response.json(openapi_document(request.app))


def openapi_document(app: Sanic) -> dict[str, Any]:
    """An OpenAPI 3 document of every route in `app`'s route table."""
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes:
        path = "/" + _PARAM.sub(r"{\1}", route.path)
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _PARAM.findall(route.path)]
        for method in sorted(set(route.methods) & set(_DOCUMENTED_METHODS)):
            operation: dict[str, Any] = {
                "summary": _summary(path),
                "operationId": f"{route.name.rsplit('.', 1)[-1]}_{method.lower()}",
                "responses": {"200": {"description": "Successful Response"}},
            }
            doc = (route.handler.__doc__ or "").strip()
            if doc:
                operation["description"] = doc
            if params:
                operation["parameters"] = params
            if method in _BODY_METHODS:
                operation["requestBody"] = {
                    "required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
            paths.setdefault(path, {})[method.lower()] = operation
    return {"openapi": OPENAPI_VERSION, "info": {"title": "pallas-serve", "version": _version()},
            "paths": dict(sorted(paths.items()))}


def _summary(path: str) -> str:
    """The path in words (`/get_load` -> "Get load"): handlers' docstrings say why, not what."""
    words = re.sub(r"[/_]+", " ", path).strip()
    return words[:1].upper() + words[1:] if words else "Root"
