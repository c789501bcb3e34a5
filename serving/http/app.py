"""The Sanic app: configuration, error handlers, the status lifecycle (Starting -> Up,
warm-up) and the engine's start/stop; the routes live in native.py and openai.py.

Status codes and bodies follow ../shared/reference/api-contract.md: a body that is not JSON is 400 in
FastAPI's validation envelope; unknown paths are 404 `{"detail": "Not Found"}`. The API key, CORS and
the request-size and timeout bounds are in access.py; /metrics and /openapi.json in observability.py.
"""

from __future__ import annotations

import logging

from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import MethodNotAllowed, NotFound

from serving.engine import Engine
from serving.http import access, experts, native, observability, openai, pooling, shutdown, weights
from serving.http.envelopes import BadBody, dumps, http_exception, schema_error

logger = logging.getLogger(__name__)

READY_MESSAGE = "The server is fired up and ready to roll!"
WARMUP_PROMPT = "The capital city of France is"


def create_app(engine: Engine) -> Sanic:
    args = engine.server_args
    app = Sanic("pallas_serve", dumps=dumps, configure_logging=False, request_class=access.BoundedRequest)
    app.ctx.status = "Starting"
    access.install(app, args)

    @app.on_request
    async def refuse_while_shutting_down(request: Request):
        if app.ctx.status == shutdown.SHUTTING_DOWN and not request.path.startswith("/health"):
            return http_exception("The server is shutting down.", 503)
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
    observability.register(app, engine)
    shutdown.install(app, engine, args.graceful_shutdown_timeout)
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
        app.ctx.status = shutdown.SHUTTING_DOWN

    @app.after_server_stop
    async def stop_engine(app: Sanic):
        engine.abort("", abort_all=True, cause="server shutdown")
        engine.shutdown()

    return app
