"""Who may call the server and how much they may send: the API key, CORS, the body-size limit and the
connection timeouts; `--log-requests`' line per HTTP request.

As SGLang (contract 1.2, 1.3):
- `--api-key`: every request needs `Authorization: Bearer <key>` except CORS preflights (any OPTIONS)
  and paths starting with `/health` or `/metrics`; otherwise 401 `{"error": "Unauthorized"}`, also for
  unknown paths (the check runs before routing, like SGLang's middleware). The comparison is
  constant-time (`hmac.compare_digest` on bytes), so response timing does not reveal how much of a
  guessed key was right.
- CORS as Starlette's `CORSMiddleware` with every origin, method and header allowed and credentials
  allowed: a preflight (OPTIONS with `Origin` and `Access-Control-Request-Method`) is 200 `OK` echoing
  the origin and requested headers; other responses to a request with an `Origin` carry
  `Access-Control-Allow-Origin: *` (the origin itself when the request sends cookies) and
  `Access-Control-Allow-Credentials: true`.

Our own bounds, which SGLang leaves to uvicorn: a body over `--max-request-body-size` is 413 and a
client that takes longer than `--request-read-timeout` to send its headers, or again as long for its
body, gets 408, and HTTP that Sanic cannot parse gets 400, all in FastAPI's HTTPException envelope; idle keep-alive connections close after `--keep-alive-timeout` (uvicorn's 5 s).
Nothing limits how long a response takes: a generation runs as long as it needs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import BadRequest, PayloadTooLarge, RequestTimeout

from serving.http.envelopes import http_exception
from serving.server_args import ServerArgs

logger = logging.getLogger("serving.requests")

OPEN_PATH_PREFIXES = ("/health", "/metrics")
# The method of the stand-in request Sanic builds to answer a request it could not read (408, 400, 413
# before the headers were complete): that answer must not turn into a 401. No route answers it.
UNREAD_REQUEST_METHOD = "NONE"
CORS_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"  # Starlette's list for allow_methods=["*"]
CORS_MAX_AGE = "600"


class BoundedRequest(Request):
    """Sanic's request, whose body must arrive within REQUEST_TIMEOUT (`--request-read-timeout`).

    Sanic's own REQUEST_TIMEOUT stops at the end of the headers; the body is read once routing is done,
    under RESPONSE_TIMEOUT, which is infinite here so that generations are never cut short. Without this
    a client trickling its body would hold a connection (and its bytes) forever."""

    async def receive_body(self) -> None:
        try:
            await asyncio.wait_for(super().receive_body(), self.app.config.REQUEST_TIMEOUT)
        except TimeoutError:
            raise RequestTimeout("Request Timeout") from None


def install(app: Sanic, args: ServerArgs) -> None:
    """Limits, timeouts and the access middleware, installed before any route (the app is built with
    `request_class=BoundedRequest`)."""
    app.config.REQUEST_MAX_SIZE = args.max_request_body_size
    app.config.REQUEST_TIMEOUT = args.request_read_timeout
    app.config.KEEP_ALIVE_TIMEOUT = args.keep_alive_timeout
    # Sanic answers 503 "Response Timeout" to a handler that runs longer than RESPONSE_TIMEOUT (60 s by
    # default, or $SANIC_RESPONSE_TIMEOUT): a generation may take as long as it needs, as in SGLang.
    app.config.RESPONSE_TIMEOUT = float("inf")
    expected = None if args.api_key is None else f"Bearer {args.api_key}".encode()
    if args.log_requests:
        logger.setLevel(logging.INFO)  # asked for by name: shown whatever --log-level says

    @app.on_request(priority=100)
    async def check_access(request: Request):
        if request.method == "OPTIONS":
            return _preflight(request)
        if expected is None or request.method == UNREAD_REQUEST_METHOD or request.path.startswith(OPEN_PATH_PREFIXES):
            return None
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return sanic_response.json({"error": "Unauthorized"}, status=401)
        return None

    @app.on_response(priority=100)
    async def cors_and_log(request: Request, response):
        origin = request.headers.get("origin")
        if origin is not None and "access-control-allow-origin" not in response.headers:
            if "cookie" in request.headers:
                response.headers["Access-Control-Allow-Origin"] = origin
                response.headers["Vary"] = "Origin"
            else:
                response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Allow-Credentials"] = "true"
        if args.log_requests:
            logger.info("%s %s -> %d (request body %d bytes)", request.method, request.path, response.status,
                        len(request.body or b""))

    @app.exception(PayloadTooLarge)
    async def too_large(request: Request, exc: Exception):
        return http_exception(f"The request is larger than the server accepts ({args.max_request_body_size} bytes, "
                              "--max-request-body-size).", 413)

    @app.exception(BadRequest)
    async def malformed_http(request: Request, exc: Exception):
        """Sanic's own 400s (a request line, header, length or chunk it cannot parse), in JSON like the rest."""
        return http_exception(f"Malformed HTTP request: {exc}", 400)

    @app.exception(RequestTimeout)
    async def read_timeout(request: Request, exc: Exception):
        if request.stream is not None:  # the rest of a late body may still come: close, do not reuse
            request.stream.keep_alive = False
        return http_exception(f"The request was not received within {args.request_read_timeout} s "
                              "(--request-read-timeout).", 408)


def _preflight(request: Request):
    """Starlette's preflight answer, or None (a plain OPTIONS is routed, so 405 as in FastAPI)."""
    origin = request.headers.get("origin")
    if origin is None or "access-control-request-method" not in request.headers:
        return None
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Allow-Methods": CORS_METHODS,
               "Access-Control-Max-Age": CORS_MAX_AGE, "Access-Control-Allow-Credentials": "true"}
    requested = request.headers.get("access-control-request-headers")
    if requested:
        headers["Access-Control-Allow-Headers"] = requested
    return sanic_response.text("OK", headers=headers)
