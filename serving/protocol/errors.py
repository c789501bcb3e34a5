"""The two errors request validation raises; the HTTP layer maps them to its error envelopes.

`RequestError` is what a native route answers as 400 `{"error": {"message": ...}}` (contract 1.1
case A). `SchemaError` is the subset where the body itself has the wrong shape (not an object, a field
of the wrong JSON type, a required field missing) -- the failures SGLang's FastAPI layer reports with
its validation envelope (case B). A server may treat both alike.
"""

from __future__ import annotations

NOT_SUPPORTED_SUFFIX = "is not supported yet"


class RequestError(ValueError):
    """A request the server rejects with HTTP 400; `str(exc)` is the client-facing message."""

    status_code = 400


class SchemaError(RequestError):
    """The body has the wrong shape (not an object, wrong JSON type, missing required field)."""


class Unavailable(RequestError):
    """The server cannot take the request now (its scheduler died or a step hangs): HTTP 503."""

    status_code = 503


def unsupported(what: str) -> RequestError:
    return RequestError(f"{what} {NOT_SUPPORTED_SUFFIX}")


def schema_error(message: str) -> SchemaError:
    return SchemaError(message)
