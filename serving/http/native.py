"""SGLang's native routes (contract sections 3, 5 and 9), as thin as possible over `Engine`.

A ValueError of a native route is 400 `{"error": {"message": ...}}`; a scheduler abort that carries a
status turns a non-streamed /generate into that error, while a stream delivers it as its last chunk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http.envelopes import dumps, error_response, http_exception, read_json
from serving.protocol import (
    NormalizedGenerate,
    RequestError,
    parse_abort_request,
)
from serving.protocol.weights import parse_flush_timeout

FLUSH_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
    "requests, the operation will not be performed.)\n"
)
HEALTH_CHECK_TIMEOUT = 20.0


def register(app: Sanic, engine: Engine) -> None:
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
                await response.send(f"data: {dumps({'error': {'message': str(exc)}})}\n\n")
                await response.send("data: [DONE]\n\n")
                await response.eof()
                return None
            return error_response(str(exc))
        if normalized.stream:
            return await _stream(request, normalized)
        formatter = engine.formatter(normalized)
        try:
            async with aclosing(engine.stream_outputs(normalized)) as outputs:
                async for out in outputs:
                    formatter.collect(out)
                    if out.finished and out.finish_reason.is_abort and out.finish_reason.status_code:
                        break  # the whole response is that error: closing aborts the other items
        except RequestError as exc:
            return error_response(str(exc)) if exc.status_code == 400 else http_exception(str(exc), exc.status_code)
        error = formatter.http_error()
        if error is not None:
            if error.status_code == 400:  # SGLang raises a ValueError (case A), otherwise an HTTPException
                return error_response(error.message)
            return http_exception(error.message, error.status_code)
        return sanic_response.json(formatter.response())

    async def _stream(request: Request, normalized: NormalizedGenerate):
        response = await request.respond(content_type="text/event-stream; charset=utf-8")
        formatter = engine.formatter(normalized)
        try:
            async for out in engine.stream_outputs(normalized):
                await response.send(f"data: {dumps(formatter.chunk(out))}\n\n")
        except RequestError as exc:
            await response.send(f"data: {dumps({'error': {'message': str(exc)}})}\n\n")
        await response.send("data: [DONE]\n\n")
        await response.eof()

    async def _healthy() -> bool:
        """SGLang's rule (contract 9): a one-token probe request, checked once a second for up to
        HEALTH_CHECK_TIMEOUT; any step the engine completes meanwhile counts as healthy too, so a server
        busy with a long prefill or a full queue passes. A dead scheduler or a hung step fails at once."""
        if engine.health_problem() is not None:
            return False
        # A unique rid: two probes at once must not be refused as duplicate request ids.
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                "rid": f"HEALTH_CHECK_{time.time()}_{uuid.uuid4().hex[:8]}"}
        steps = engine.steps_done
        probe = asyncio.ensure_future(engine.probe(body))
        deadline = time.monotonic() + HEALTH_CHECK_TIMEOUT
        try:
            while True:
                done, _ = await asyncio.wait({probe}, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                if done:
                    return probe.exception() is None
                if engine.health_problem() is not None:
                    return False
                if engine.steps_done > steps:
                    return True
                if time.monotonic() >= deadline:
                    return False
        finally:
            if not probe.done():
                probe.cancel()  # its stream's cleanup aborts the probe request in the engine
            elif not probe.cancelled():
                probe.exception()  # retrieved, so asyncio does not log it as never retrieved

    @app.get("/health")
    @app.get("/health_generate", name="health_generate_route")
    async def health(request: Request):
        if app.ctx.status not in ("Up", "UnHealthy"):
            return sanic_response.empty(status=503)
        ok = await _healthy()
        if app.ctx.status in ("Up", "UnHealthy"):  # not if a shutdown began meanwhile
            app.ctx.status = "Up" if ok else "UnHealthy"
        return sanic_response.empty(status=200 if ok else 503)

    # -- information ------------------------------------------------------------------------------
    @app.get("/get_model_info")
    @app.get("/model_info", name="model_info_route")
    async def model_info(request: Request):
        return sanic_response.json(engine.model_info())

    @app.get("/get_weight_version")
    @app.get("/weight_version", name="weight_version_route")
    async def weight_version(request: Request):
        return sanic_response.json({"weight_version": engine.weight_version})

    @app.get("/get_server_info")
    @app.get("/server_info", name="server_info_route")
    async def server_info(request: Request):
        return sanic_response.json(await engine.get_server_info())

    @app.get("/get_load")
    async def get_load(request: Request):
        loads = await engine.get_load()  # one per data-parallel replica, in rank order
        return sanic_response.json([{"rid": None, "http_worker_ipc": None, "dp_rank": rank, **load}
                                    for rank, load in enumerate(loads)])

    # -- control ----------------------------------------------------------------------------------
    @app.route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request):
        try:
            timeout = parse_flush_timeout(request.args.get("timeout"))
        except RequestError as exc:
            return error_response(str(exc))
        ok = await engine.flush_cache(timeout)
        return sanic_response.text(FLUSH_TEXT, status=200 if ok else 400)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        try:
            rid, abort_all = parse_abort_request(read_json(request))
        except RequestError as exc:
            return error_response(str(exc))
        if rid or abort_all:
            engine.abort(rid, abort_all)
        return sanic_response.empty(status=200)
