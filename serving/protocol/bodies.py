"""The small bodies: /abort_request, /update_weights_from_disk, /tokenize, /detokenize."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serving.protocol.errors import RequestError, schema_error, unsupported
from serving.protocol.json_checks import MISSING, describe, is_int_list, is_str_list, object_body, read_field


def parse_abort_request(body: object) -> tuple[str, bool]:
    """POST /abort_request: `{"rid": "" , "abort_all": false}` -> (rid, abort_all). A missing body
    counts as `{}`. The rid is a prefix: the scheduler aborts every request whose id starts with it."""
    body = object_body(body, allow_empty=True)
    return read_field(body, "rid", "str", ""), read_field(body, "abort_all", "bool", False)


@dataclass(frozen=True)
class UpdateWeightsRequest:
    """POST /update_weights_from_disk body (contract 5.5). `load_format` None = the server's current
    `--load-format`. The CUDA-only knobs (torch_empty_cache, recapture_cuda_graph) are accepted and
    have nothing to do on our runtime; a non-zero `token_step` is refused (not supported yet)."""

    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True


def parse_update_weights_request(body: object) -> UpdateWeightsRequest:
    body = object_body(body, allow_empty=False)
    kinds = {"model_path": "str", "load_format": "str?", "weight_version": "str?", "token_step": "int"}
    kwargs = {}
    for f in dataclasses.fields(UpdateWeightsRequest):
        kind = kinds.get(f.name, "bool")
        default = MISSING if f.name == "model_path" else f.default
        kwargs[f.name] = read_field(body, f.name, kind, default)
    if not kwargs["model_path"]:
        raise RequestError("model_path cannot be empty.")
    if kwargs["token_step"] != 0:
        raise unsupported("token_step")
    return UpdateWeightsRequest(**kwargs)


@dataclass(frozen=True)
class TokenizeRequest:
    """POST /tokenize body (contract 5.15)."""

    prompt: str | list[str]
    model: str = "default"
    add_special_tokens: bool = True

    @property
    def is_batch(self) -> bool:
        return isinstance(self.prompt, list)


def parse_tokenize_request(body: object) -> TokenizeRequest:
    body = object_body(body, allow_empty=False)
    if "prompt" not in body:
        raise schema_error("Field 'prompt' is required.")
    prompt = body["prompt"]
    if not isinstance(prompt, str) and not is_str_list(prompt):
        raise schema_error(f"Field 'prompt' must be a string or a list of strings, got {describe(prompt)}.")
    return TokenizeRequest(
        prompt=prompt if isinstance(prompt, str) else list(prompt),
        model=read_field(body, "model", "str", "default"),
        add_special_tokens=read_field(body, "add_special_tokens", "bool", True),
    )


@dataclass(frozen=True)
class DetokenizeRequest:
    """POST /detokenize body (contract 5.15). `tokens: []` decodes to `""`."""

    tokens: list[int] | list[list[int]]
    model: str = "default"
    skip_special_tokens: bool = True

    @property
    def is_batch(self) -> bool:
        return bool(self.tokens) and isinstance(self.tokens[0], list)


def parse_detokenize_request(body: object, *, vocab_size: int | None = None) -> DetokenizeRequest:
    """`vocab_size` (the tokenizer's), when given, turns ids it cannot decode into a 400 instead of
    SGLang's 500."""
    body = object_body(body, allow_empty=False)
    if "tokens" not in body:
        raise schema_error("Field 'tokens' is required.")
    tokens = body["tokens"]
    is_flat = is_int_list(tokens)
    if not is_flat and not (isinstance(tokens, list) and all(is_int_list(row) for row in tokens)):
        raise schema_error(f"Field 'tokens' must be a list of integers or a list of such lists, got {describe(tokens)}.")
    rows = [tokens] if is_flat else tokens
    for row in rows:
        for token_id in row:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                size = f" (vocab size {vocab_size})" if vocab_size is not None else ""
                raise RequestError(f"Token id {token_id} in tokens is out of vocabulary{size}.")
    return DetokenizeRequest(
        tokens=list(tokens) if is_flat else [list(r) for r in rows],
        model=read_field(body, "model", "str", "default"),
        skip_special_tokens=read_field(body, "skip_special_tokens", "bool", True),
    )
