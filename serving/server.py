"""Sanic app: SGLang's native routes, as thin as possible over `Engine`; validation lives in protocol.py.

Status codes and bodies follow ../shared/reference/api-contract.md: a ValueError of a native route is
400 `{"error": {"message": ...}}`; a body that is not JSON is 400 in FastAPI's validation envelope;
unknown paths are 404 `{"detail": "Not Found"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import MethodNotAllowed, NotFound

from serving.engine import Engine
from serving.protocol import RequestError, parse_abort_request, parse_update_weights_request

logger = logging.getLogger(__name__)

FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
    "requests, the operation will not be performed.)\n"
)
READY_MESSAGE = "The server is fired up and ready to roll!"
HEALTH_CHECK_TIMEOUT = 20.0


def error_response(message: str, status: int = 400):
    return sanic_response.json({"error": {"message": message}}, status=status)


def schema_error(message: str):
    return sanic_response.json(
        {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}, status=400
    )


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def read_json(request: Request) -> Any:
    """The decoded body (None when empty); malformed JSON raises `_BadBody` (a 400)."""
    if not request.body:
        return None
    try:
        return json.loads(request.body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _BadBody(f"Request body is not valid JSON: {exc}") from None


class _BadBody(Exception):
    pass


def create_app(engine: Engine) -> Sanic:
    args = engine.server_args
    app = Sanic("pallas_serve", dumps=_dumps, configure_logging=False)
    app.config.KEEP_ALIVE_TIMEOUT = 5
    # Sanic answers 503 "Response Timeout" to a handler that runs longer than RESPONSE_TIMEOUT (60 s by
    # default, or $SANIC_RESPONSE_TIMEOUT): a generation may take as long as it needs, as in SGLang.
    app.config.RESPONSE_TIMEOUT = float("inf")
    app.config.REQUEST_MAX_SIZE = 256 * 1024 * 1024
    app.ctx.status = "Starting"

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "pallas-serve",
                "root": name, "parent": None, "max_model_len": engine.context_length}

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

    @app.exception(_BadBody)
    async def bad_body(request: Request, exc: Exception):
        return schema_error(str(exc))

    # -- generation -------------------------------------------------------------------------------
    @app.route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        body = read_json(request)
        try:
            normalized = engine.parse(body)
        except RequestError as exc:
            if isinstance(body, dict) and body.get("stream") is True:
                # SGLang validates lazily inside the stream: 200, an error event, then [DONE].
                response = await request.respond(content_type="text/event-stream; charset=utf-8")
                await response.send(f"data: {_dumps({'error': {'message': str(exc)}})}\n\n")
                await response.send("data: [DONE]\n\n")
                await response.eof()
                return None
            return error_response(str(exc))
        if normalized.stream:
            return await _stream(request, normalized)
        try:
            result = await engine.generate_request(normalized)
        except RequestError as exc:
            return error_response(str(exc))
        for item in result if isinstance(result, list) else [result]:
            reason = item["meta_info"]["finish_reason"] or {}
            if reason.get("type") == "abort" and reason.get("status_code"):
                return error_response(reason["message"], status=reason["status_code"])
        return sanic_response.json(result)

    async def _stream(request: Request, normalized):
        response = await request.respond(content_type="text/event-stream; charset=utf-8")
        try:
            async for index, out in engine.stream_generate(normalized):
                chunk = {"index": index, **out} if normalized.is_batch else out
                await response.send(f"data: {_dumps(chunk)}\n\n")
        except RequestError as exc:
            await response.send(f"data: {_dumps({'error': {'message': str(exc)}})}\n\n")
        await response.send("data: [DONE]\n\n")
        await response.eof()

    async def _probe() -> bool:
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "rid": f"HEALTH_CHECK_{time.time()}"}
        try:
            await asyncio.wait_for(engine.generate_request(engine.parse(body)), HEALTH_CHECK_TIMEOUT)
            return True
        except (TimeoutError, RequestError):
            return False

    @app.get("/health")
    @app.get("/health_generate", name="health_generate_route")
    async def health(request: Request):
        if app.ctx.status not in ("Up", "UnHealthy"):
            return sanic_response.empty(status=503)
        ok = await _probe()
        app.ctx.status = "Up" if ok else "UnHealthy"
        return sanic_response.empty(status=200 if ok else 503)

    # -- information ------------------------------------------------------------------------------
    @app.get("/get_model_info")
    @app.get("/model_info", name="model_info_route")
    async def model_info(request: Request):
        return sanic_response.json({
            "model_path": engine.model_path, "tokenizer_path": engine.tokenizer_path,
            "is_generation": True, "preferred_sampling_params": args.preferred_sampling_params,
            "weight_version": engine.weight_version,
        })

    @app.get("/get_weight_version")
    @app.get("/weight_version", name="weight_version_route")
    async def weight_version(request: Request):
        return sanic_response.json({"weight_version": engine.weight_version})

    @app.get("/get_server_info")
    @app.get("/server_info", name="server_info_route")
    async def server_info(request: Request):
        page_counts = await asyncio.wrap_future(engine.page_counts_future())
        return sanic_response.json(engine.server_info(page_counts))

    @app.get("/get_load")
    async def get_load(request: Request):
        load = await asyncio.wrap_future(engine.scheduler.call(engine.scheduler.load))
        return sanic_response.json([{"rid": None, "http_worker_ipc": None, "dp_rank": 0, **load}])

    @app.get("/v1/models")
    async def list_models(request: Request):
        return sanic_response.json({"object": "list", "data": [model_card(engine.served_model_name)]})

    @app.get("/v1/models/<model_id:path>")
    async def get_model(request: Request, model_id: str):
        if model_id != engine.served_model_name:
            return sanic_response.json({"error": {
                "message": f"The model '{model_id}' does not exist", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}}, status=404)
        return sanic_response.json(model_card(engine.served_model_name))

    # -- control ----------------------------------------------------------------------------------
    @app.route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request):
        ok = await asyncio.wrap_future(engine.scheduler.call(engine.scheduler.flush))
        return sanic_response.text(FLUSH_TEXT, status=200 if ok else 400)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        try:
            update = parse_update_weights_request(read_json(request))
        except RequestError as exc:
            return error_response(str(exc))
        result = await engine.update_weights_from_disk(update)
        return sanic_response.json(result, status=200 if result["success"] else 400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        try:
            rid, abort_all = parse_abort_request(read_json(request))
        except RequestError as exc:
            return error_response(str(exc))
        if rid or abort_all:
            engine.abort(rid, abort_all)
        return sanic_response.empty(status=200)

    # -- lifecycle --------------------------------------------------------------------------------
    @app.after_server_start
    async def warm_up(app: Sanic):
        if not args.skip_server_warmup:
            body = {"text": "The capital city of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 8}}
            if args.skip_tokenizer_init:
                body = {"input_ids": [10, 11, 12], "sampling_params": body["sampling_params"]}
            try:
                await engine.generate_request(engine.parse(body))
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
        engine.abort("", abort_all=True)
        engine.shutdown()

    return app
