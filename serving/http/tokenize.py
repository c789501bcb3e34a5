"""/tokenize, /detokenize and their /v1/ twins (contract 5.15): the served tokenizer, nothing else.

`max_model_len` is the tokenizer's `model_max_length`, as SGLang reports it (the context length when
the tokenizer states none). An id the tokenizer cannot decode is a 400 here (SGLang: a 500).
"""

from __future__ import annotations

from sanic import Request, Sanic
from sanic import response as sanic_response

from serving.engine import Engine
from serving.http.envelopes import read_json
from serving.http.openai_generation import check_json_content_type, request_error
from serving.protocol import RequestError, parse_detokenize_request, parse_tokenize_request

_NO_TOKENIZER = "Tokenization needs a tokenizer; this server was started with --skip-tokenizer-init."


def register(app: Sanic, engine: Engine) -> None:
    tokenizer = engine.tokenizer

    @app.post("/tokenize")
    @app.post("/v1/tokenize", name="v1_tokenize")
    async def tokenize(request: Request):
        try:
            check_json_content_type(request)
            body = parse_tokenize_request(read_json(request))
            if tokenizer is None:
                raise RequestError(_NO_TOKENIZER)
        except RequestError as exc:
            return request_error(exc)
        prompts = body.prompt if body.is_batch else [body.prompt]
        tokens = [tokenizer.encode(p, add_special_tokens=body.add_special_tokens) if p else [] for p in prompts]
        max_model_len = tokenizer.model_max_length or engine.context_length
        if body.is_batch:
            return sanic_response.json({"tokens": tokens, "count": [len(t) for t in tokens],
                                        "max_model_len": max_model_len})
        return sanic_response.json({"tokens": tokens[0], "count": len(tokens[0]), "max_model_len": max_model_len})

    @app.post("/detokenize")
    @app.post("/v1/detokenize", name="v1_detokenize")
    async def detokenize(request: Request):
        try:
            check_json_content_type(request)
            if tokenizer is None:
                raise RequestError(_NO_TOKENIZER)
            body = parse_detokenize_request(read_json(request), vocab_size=tokenizer.vocab_size)
        except RequestError as exc:
            return request_error(exc)
        if body.is_batch:
            texts = [tokenizer.decode(row, skip_special_tokens=body.skip_special_tokens) for row in body.tokens]
            return sanic_response.json({"text": texts})
        return sanic_response.json({"text": tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens)})
