"""JSON bodies in, error envelopes out: what every route module shares (contract 1.1)."""

from __future__ import annotations

import json
from typing import Any

from sanic import Request
from sanic import response as sanic_response


class BadBody(Exception):
    """The body is not JSON: answered in FastAPI's validation envelope (case B)."""


def dumps(obj: Any) -> str:
    """Compact JSON, as SGLang's SSE events (orjson) and our non-stream bodies."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def read_json(request: Request) -> Any:
    """The decoded body (None when empty); malformed JSON raises `BadBody` (a 400)."""
    if not request.body:
        return None
    try:
        return json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadBody(f"Request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadBody("Request body is not valid JSON: it nests arrays and objects too deeply.") from None


def error_response(message: str, status: int = 400):
    """Case A: what a native route answers for a ValueError (or a scheduler abort with a status)."""
    return sanic_response.json({"error": {"message": message}}, status=status)


def http_exception(message: str, status: int):
    """Case C: FastAPI's HTTPException body, what SGLang answers when the scheduler aborts a request with
    a status other than 400 (503 "The request queue is full.", 500 on an internal error)."""
    return sanic_response.json(
        {"object": "error", "message": message, "type": str(status), "param": None, "code": status}, status=status
    )


def schema_error(message: str):
    """Case B: FastAPI's validation envelope, overridden to 400 as SGLang does."""
    return sanic_response.json(
        {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}, status=400
    )


def openai_error(message: str, status: int = 400, err_type: str = "BadRequestError"):
    """Case D: the OpenAI-style routes' envelope, top level (not wrapped in "error")."""
    return sanic_response.json(
        {"object": "error", "message": message, "type": err_type, "param": None, "code": status}, status=status
    )
