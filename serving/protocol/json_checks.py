"""JSON type checks shared by the body parsers, and the field reader of the simple bodies."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from serving.protocol.errors import schema_error


def describe(value: object) -> str:
    """A JSON-ish rendering of a value plus its JSON type, for error messages."""
    kind = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        tuple: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({kind})"


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(is_int(x) for x in value)


MISSING = object()


def read_field(body: Mapping[str, Any], name: str, kind: str, default: object = MISSING) -> Any:
    """Read one field of a simple body. kind: bool, int, str, str?, where ? allows null."""
    if name not in body:
        if default is MISSING:
            raise schema_error(f"Field '{name}' is required.")
        return default
    value = body[name]
    nullable = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None and nullable:
        return None
    ok = {"bool": lambda v: isinstance(v, bool), "int": is_int, "str": lambda v: isinstance(v, str)}[base](value)
    if not ok:
        expected = {"bool": "a boolean", "int": "an integer", "str": "a string"}[base]
        raise schema_error(f"Field '{name}' must be {expected}{' or null' if nullable else ''}, got {describe(value)}.")
    return value


def object_body(body: object, *, allow_empty: bool) -> Mapping[str, Any]:
    if body is None and allow_empty:
        return {}
    if not isinstance(body, dict):
        raise schema_error("Request body must be a JSON object.")
    return body
