"""SGLang's weight and memory control routes (contract 5.5, 5.8 to 5.10, pause / continue), over
`Engine.weights`, `Engine.generation` and `Engine.memory`.

Bodies that have the wrong shape answer FastAPI's validation envelope (case B), other refusals the
native routes' `{"error": {"message": ...}}` (case A), both 400.
"""

from __future__ import annotations

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http.envelopes import error_response, read_json, schema_error
from serving.protocol import RequestError, SchemaError, parse_update_weights_request
from serving.protocol.weights import (
    parse_get_weights_by_name,
    parse_memory_tags,
    parse_pause_request,
    parse_update_weight_version,
)


def _refusal(exc: RequestError):
    return schema_error(str(exc)) if isinstance(exc, SchemaError) else error_response(str(exc))


def register(app: Sanic, engine: Engine) -> None:
    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        try:
            update = parse_update_weights_request(read_json(request))
        except RequestError as exc:
            return _refusal(exc)
        result = await engine.weights.update_from_disk(update)
        return sanic_response.json(result, status=200 if result["success"] else 400)

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        try:
            new_version, abort_all = parse_update_weight_version(read_json(request))
        except RequestError as exc:
            return _refusal(exc)
        return sanic_response.json(engine.weights.update_version(new_version, abort_all))

    @app.route("/get_weights_by_name", methods=["GET", "POST"], ignore_body=False)
    async def get_weights_by_name(request: Request):
        try:
            return sanic_response.json(await engine.weights.get_by_name(parse_get_weights_by_name(read_json(request))))
        except RequestError as exc:
            return _refusal(exc)

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        try:
            mode = parse_pause_request(read_json(request))
        except RequestError as exc:
            return _refusal(exc)
        return sanic_response.json(await engine.generation.pause(mode))

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        return sanic_response.json(await engine.generation.resume())

    def memory_route(path: str, action) -> None:
        """/release_memory_occupation and /resume_memory_occupation: the same body (tags), one action each."""

        @app.route(path, methods=["GET", "POST"], ignore_body=False, name=path.strip("/"))
        async def memory_occupation(request: Request):
            try:
                await action(parse_memory_tags(read_json(request)))
            except RequestError as exc:
                return _refusal(exc)
            return sanic_response.json(None)

    memory_route("/release_memory_occupation", lambda tags: engine.memory.release(tags))
    memory_route("/resume_memory_occupation", lambda tags: engine.memory.resume(tags))
