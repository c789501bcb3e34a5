"""The Sanic app: configuration, API-key auth, error handlers, the status lifecycle (Starting -> Up,
warm-up) and the engine's start/stop; the routes live in native.py and openai.py.

Status codes and bodies follow ../shared/reference/api-contract.md: a body that is not JSON is 400 in
FastAPI's validation envelope; unknown paths are 404 `{"detail": "Not Found"}`; a missing or wrong
bearer key is 401 `{"error": "Unauthorized"}`.
"""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import MethodNotAllowed, NotFound

from serving.engine import Engine
from serving.http import experts, native, openai, pooling, weights
from serving.http.envelopes import BadBody, dumps, schema_error

logger = logging.getLogger(__name__)

READY_MESSAGE = "The server is fired up and ready to roll!"
WARMUP_PROMPT = "The capital city of France is"


def create_app(engine: Engine) -> Sanic:
    args = engine.server_args
    app = Sanic("pallas_serve", dumps=dumps, configure_logging=False)
    app.config.KEEP_ALIVE_TIMEOUT = 5
    # Sanic answers 503 "Response Timeout" to a handler that runs longer than RESPONSE_TIMEOUT (60 s by
    # default, or $SANIC_RESPONSE_TIMEOUT): a generation may take as long as it needs, as in SGLang.
    app.config.RESPONSE_TIMEOUT = float("inf")
    app.config.REQUEST_MAX_SIZE = 256 * 1024 * 1024
    app.ctx.status = "Starting"

    @app.on_request
    async def check_api_key(request: Request):
        if args.api_key is None or request.method == "OPTIONS":
            return None
        if request.path.startswith("/health") or request.path.startswith("/metrics"):
            return None
        if request.headers.get("authorization") != f"Bearer {args.api_key}":
            return sanic_response.json({"error": "Unauthorized"}, status=401)
        return None

    @app.exception(NotFound)
    async def not_found(request: Request, exc: Exception):
        return sanic_response.json({"detail": "Not Found"}, status=404)

    @app.exception(MethodNotAllowed)
    async def method_not_allowed(request: Request, exc: Exception):
        return sanic_response.json({"detail": "Method Not Allowed"}, status=405)

    @app.exception(BadBody)
    async def bad_body(request: Request, exc: Exception):
        return schema_error(str(exc))

    native.register(app, engine)
    pooling.register(app, engine)
    openai.register(app, engine)
    experts.register(app, engine)
    weights.register(app, engine)

    @app.after_server_start
    async def warm_up(app: Sanic):
        if not args.skip_server_warmup:
            params = {"temperature": 0, "max_new_tokens": 8}
            body = {"text": WARMUP_PROMPT, "sampling_params": params}
            if args.skip_tokenizer_init:
                body = {"input_ids": [10, 11, 12], "sampling_params": params}
            try:
                await engine.probe(body)
            except Exception:
                logger.exception("warm-up request failed")
                app.ctx.status = "UnHealthy"
                return
        app.ctx.status = "Up"
        logger.info(READY_MESSAGE)
        print(READY_MESSAGE, flush=True)

    @app.before_server_stop
    async def stopping(app: Sanic):
        app.ctx.status = "Shutting down"

    @app.after_server_stop
    async def stop_engine(app: Sanic):
        engine.abort("", abort_all=True, cause="server shutdown")
        engine.shutdown()

    return app
