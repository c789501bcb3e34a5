"""/v1/completions and /v1/chat/completions (contract 7.2 / 7.3): thin handlers over `Engine.stream_outputs`.

A request is parsed into the `/generate` body it runs as (`protocol/openai_requests.py`), validated by
the same `Engine.parse` as /generate, run, and its `/generate` items are reshaped into OpenAI objects
(`protocol/openai_responses.py`). Errors use the OpenAI envelope (contract 1.1 case D), a body of the
wrong shape FastAPI's (case B); once a stream has started an error is an SSE event (case E).
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import aclosing
from pathlib import Path
from typing import Any

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.chat_template import template_source
from serving.engine import Engine
from serving.http.envelopes import dumps, http_exception, openai_error, read_json, schema_error
from serving.protocol import NormalizedGenerate, RequestError, SchemaError
from serving.protocol.openai_requests import (
    OpenAIGenerate,
    model_sampling_defaults,
    parse_chat_request,
    parse_completion_request,
)
from serving.protocol.openai_responses import Kind, OpenAIFormatter

_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"
_NO_TOKENIZER = "The OpenAI-compatible routes need a tokenizer; this server was started with --skip-tokenizer-init."


def request_error(exc: RequestError):
    """A wrong body shape in FastAPI's envelope (case B), any other refusal in OpenAI's (case D)."""
    return schema_error(str(exc)) if isinstance(exc, SchemaError) else openai_error(str(exc), exc.status_code)


def check_json_content_type(request: Request) -> None:
    """SGLang's validate_json_request on every /v1 POST route and /tokenize, /detokenize."""
    if (request.headers.get("content-type") or "").split(";")[0].strip().lower() != "application/json":
        raise SchemaError(_MEDIA_TYPE)


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's sampling defaults (generation_config.json), for `--sampling-defaults model`."""
    path = model_dir / "generation_config.json"
    return model_sampling_defaults(json.loads(path.read_text()) if path.exists() else {})


def register(app: Sanic, engine: Engine) -> None:
    args = engine.server_args
    tokenizer = engine.tokenizer
    if args.chat_template is not None and tokenizer is not None:
        tokenizer.set_chat_template(template_source(args.chat_template))  # a bad template fails startup
    model_defaults = generation_defaults(engine.model_dir) if args.sampling_defaults == "model" else {}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            check_json_content_type(request)
            parsed = parse_completion_request(read_json(request))
            if tokenizer is None:
                raise RequestError(_NO_TOKENIZER)
            normalized = engine.parse(parsed.generate_body)
        except RequestError as exc:
            return request_error(exc)
        echo = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False)
                for p in parsed.prompts] if parsed.echo else []
        return await _run(request, "completion", parsed, normalized, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_json_content_type(request)
            if tokenizer is None:
                raise RequestError(_NO_TOKENIZER)
            parsed = parse_chat_request(read_json(request), chat_template=tokenizer.chat_template,
                                        model_defaults=model_defaults, context_length_flag=args.context_length)
            try:
                prompt = tokenizer.apply_chat_template(parsed.messages, add_generation_prompt=True,
                                                       **parsed.template_kwargs)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            # As transformers' apply_chat_template(tokenize=True): the template writes the special tokens.
            input_ids = tokenizer.encode(prompt, add_special_tokens=False)
            normalized = engine.parse({**parsed.generate_body, "input_ids": input_ids})
        except RequestError as exc:
            return request_error(exc)
        return await _run(request, "chat", parsed, normalized, [])

    async def _run(request: Request, kind: Kind, parsed: OpenAIGenerate, normalized: NormalizedGenerate,
                   echo: list[str]):
        formatter = OpenAIFormatter(kind, parsed, engine.weight_version, args.enable_cache_report, echo)
        # Cumulative /generate items whatever --stream-output says: the deltas are computed here.
        items = engine.formatter(dataclasses.replace(normalized, stream=False))
        if parsed.stream:
            return await _stream(request, formatter, items, normalized)
        finals: dict[int, dict[str, Any]] = {}
        error = None
        try:
            async with aclosing(engine.stream_outputs(normalized)) as outputs:
                async for out in outputs:
                    if not out.finished:
                        continue
                    finals[out.index] = items.item(out)
                    if out.finish_reason.is_abort and out.finish_reason.status_code:
                        error = out.finish_reason  # closing the stream aborts the other choices
                        break
        except RequestError as exc:
            return openai_error(str(exc), exc.status_code)
        if error is not None:
            if error.status_code == 400:
                return openai_error(error.message)
            return http_exception(error.message, error.status_code)
        return sanic_response.json(formatter.response([finals[i] for i in sorted(finals)]))

    async def _stream(request: Request, formatter: OpenAIFormatter, items, normalized: NormalizedGenerate):
        response = await request.respond(content_type="text/event-stream; charset=utf-8")
        finals: dict[int, dict[str, Any]] = {}
        try:
            async with aclosing(engine.stream_outputs(normalized)) as outputs:
                async for out in outputs:
                    item = items.item(out)
                    for chunk in formatter.chunks(out.index, item):
                        await response.send(f"data: {dumps(chunk)}\n\n")
                    if out.finished:
                        finals[out.index] = item
            if formatter.request.include_usage:
                usage = formatter.usage_chunk([finals[i] for i in sorted(finals)])
                await response.send(f"data: {dumps(usage)}\n\n")
        except RequestError as exc:
            error = {"object": "error", "message": str(exc), "type": "BadRequestError", "param": None,
                     "code": exc.status_code}
            await response.send(f"data: {dumps({'error': error})}\n\n")
        await response.send("data: [DONE]\n\n")
        await response.eof()
