"""/v1/completions and /v1/chat/completions bodies (contract 7.2 / 7.3) -> the `/generate` body they run as.

Jax-free and tokenizer-free: a completion becomes a complete `/generate` body (text or input_ids, the
sampling params under /generate's names); a chat request becomes its normalised messages plus a body
without a prompt, which the route completes with the rendered template's ids. Everything that
`/generate` validates (sampling ranges, penalties, grammars, logprobs, LoRA, ...) is validated there, so
the two APIs cannot disagree, and a feature /generate refuses is refused here with the same message.
Wrong JSON types of the OpenAI-only fields are `SchemaError`s (FastAPI's validation envelope in SGLang).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from serving.protocol.errors import RequestError, schema_error, unsupported
from serving.protocol.json_checks import describe, is_int, is_int_list, is_number, is_str_list

# OpenAI name -> /generate sampling_params name, for the fields whose value passes through unchanged
# (their types are checked by SamplingParams.from_dict).
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "stop_regex": "stop_regex", "regex": "regex", "ebnf": "ebnf",
    "json_schema": "json_schema", "ignore_eos": "ignore_eos", "skip_special_tokens": "skip_special_tokens",
    "no_stop_trim": "no_stop_trim", "custom_params": "custom_params", "seed": "sampling_seed",
    "min_tokens": "min_new_tokens", "spaces_between_special_tokens": "spaces_between_special_tokens",
}
# Top-level /generate fields an OpenAI body may carry as SGLang extras; /generate validates (or refuses) them.
_GENERATE_FIELDS = ("rid", "lora_path", "session_params", "custom_logit_processor", "return_hidden_states",
                   "data_parallel_rank")
# The sampling fields whose null means "the model's default" on chat (`--sampling-defaults model`).
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# Templates that iterate over a message's content parts take the OpenAI list form; the others a string
# (SGLang's detect_jinja_template_content_format).
_LIST_CONTENT_TEMPLATE = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


@dataclass
class OpenAIGenerate:
    """A validated OpenAI generation request.

    `generate_body` is the `/generate` body it runs as (for chat, without its prompt: the route adds
    `input_ids` from the rendered template). `top_logprobs` is the top-k count when logprobs were asked
    for (0 allowed), None when not. `echo` / `prompts`: completions that return their prompt first.
    """

    model: str
    stream: bool
    generate_body: dict[str, Any]
    n: int = 1
    include_usage: bool = False
    continuous_usage: bool = False
    top_logprobs: int | None = None
    echo: bool = False
    prompts: list[str | list[int]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def model_sampling_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """What `--sampling-defaults model` fills into a chat request's null sampling fields: the checkpoint's
    generation_config.json values. transformers' `top_k: 0` means no limit, which SGLang spells -1."""
    defaults = {key: generation_config[key] for key in MODEL_DEFAULT_FIELDS if generation_config.get(key) is not None}
    if defaults.get("top_k") == 0:
        defaults["top_k"] = -1
    return defaults


def _get(body: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """One optional field; null means the default. kind: bool, int, number, str, object, list."""
    value = body.get(name)
    if value is None:
        return default
    checks = {"bool": (lambda v: isinstance(v, bool), "a boolean"), "int": (is_int, "an integer"),
              "number": (is_number, "a number"), "str": (lambda v: isinstance(v, str), "a string"),
              "object": (lambda v: isinstance(v, dict), "an object"), "list": (lambda v: isinstance(v, list), "an array")}
    ok, expected = checks[kind]
    if not ok(value):
        raise schema_error(f"Field '{name}' must be {expected} or null, got {describe(value)}.")
    return value


def _common(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], bool, bool, bool, int]:
    """What both routes share: (sampling_params, top-level /generate extras, stream, include_usage,
    continuous_usage, n)."""
    sampling = {target: body[name] for name, target in _SAMPLING_FIELDS.items() if body.get(name) is not None}
    extras = {name: body[name] for name in _GENERATE_FIELDS if body.get(name) is not None}
    n = _get(body, "n", "int", 1)
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}.")
    sampling["n"] = n
    stream = _get(body, "stream", "bool", False)
    options = _get(body, "stream_options", "object", {})
    include_usage = _get(options, "include_usage", "bool", False)
    continuous_usage = _get(options, "continuous_usage_stats", "bool", False)
    _response_format(_get(body, "response_format", "object"), sampling)
    return sampling, extras, stream, include_usage and stream, continuous_usage and stream, n


def _response_format(response_format: Mapping[str, Any] | None, sampling: dict[str, Any]) -> None:
    """`response_format` -> a JSON-schema constraint (SGLang's mapping; the grammar backend enforces it)."""
    if response_format is None:
        return
    kind = response_format.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        sampling["json_schema"] = '{"type": "object"}'
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema", spec.get("schema_")) if isinstance(spec, dict) else None
        if schema is None:
            raise RequestError("schema_ is required for json_schema response format request.")
        sampling["json_schema"] = schema if isinstance(schema, str) else json.dumps(schema)
    elif kind == "structural_tag":
        raise unsupported("response_format structural_tag")
    else:
        raise schema_error("response_format.type must be one of text, json_object, json_schema, structural_tag, "
                           f"got {describe(kind)}.")


def _logprob_fields(top_logprobs: int | None, start: int = -1) -> dict[str, Any]:
    if top_logprobs is None:
        return {}
    return {"return_logprob": True, "top_logprobs_num": top_logprobs, "logprob_start_len": start,
            "return_text_in_logprobs": True}


def parse_completion_request(body: object) -> OpenAIGenerate:
    """POST /v1/completions (contract 7.2)."""
    if not isinstance(body, dict):
        raise schema_error("Request body must be a JSON object.")
    if "prompt" not in body:
        raise schema_error("Field 'prompt' is required.")
    prompt = body["prompt"]
    if not (isinstance(prompt, str) or is_str_list(prompt) or is_int_list(prompt)
            or (isinstance(prompt, list) and prompt and all(is_int_list(p) for p in prompt))):
        raise schema_error("Field 'prompt' must be a string, a list of strings, a list of token ids or a list of "
                           f"such lists, got {describe(prompt)}.")
    if not prompt:
        raise RequestError("Prompt cannot be empty")
    sampling, extras, stream, include_usage, continuous_usage, n = _common(body)
    max_tokens = _get(body, "max_tokens", "int", 16)
    if max_tokens <= 0:
        raise RequestError("max_tokens must be positive")
    sampling["max_new_tokens"] = max_tokens
    if _get(body, "suffix", "str"):
        raise unsupported("suffix")
    best_of = _get(body, "best_of", "int")
    if best_of is not None and best_of != n:
        raise unsupported("best_of other than n")
    logprobs = _get(body, "logprobs", "int")
    if logprobs is not None and logprobs < 0:
        raise RequestError(f"logprobs must be at least 0, got {logprobs}.")
    echo = _get(body, "echo", "bool", False)
    is_ids = is_int_list(prompt) or not (isinstance(prompt, str) or is_str_list(prompt))
    key = "input_ids" if is_ids else "text"
    generate = {key: prompt, "sampling_params": sampling, "stream": stream, **extras,
                **_logprob_fields(logprobs, 0 if echo else -1)}
    prompts = [prompt] if isinstance(prompt, str) or is_int_list(prompt) else list(prompt)
    return OpenAIGenerate(model=_get(body, "model", "str", "default"), stream=stream, generate_body=generate, n=n,
                          include_usage=include_usage, continuous_usage=continuous_usage, top_logprobs=logprobs,
                          echo=echo, prompts=prompts)


def _message(message: object, index: int, list_content: bool) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise schema_error(f"messages[{index}] must be an object, got {describe(message)}.")
    role = message.get("role")
    if role not in _CHAT_ROLES:
        raise schema_error(f"messages[{index}].role must be one of {', '.join(_CHAT_ROLES)}, got {describe(role)}.")
    out = {k: v for k, v in message.items() if v is not None}
    content = message.get("content")
    if content is None or isinstance(content, str):
        return out
    if not isinstance(content, list):
        raise schema_error(f"messages[{index}].content must be a string, a list of content parts or null, "
                           f"got {describe(content)}.")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio", "audio_url", "video_url", "file"):
            raise unsupported(f"Multimodal input ({kind} content parts)")
        else:
            raise schema_error(f"messages[{index}].content parts must be {{\"type\": \"text\", \"text\": ...}}, "
                               f"got {describe(part)}.")
    out["content"] = [{"type": "text", "text": t} for t in texts] if list_content else " ".join(texts)
    return out


def _check_tools(body: Mapping[str, Any]) -> None:
    """Tool calling is not there yet; `tool_choice: "none"` (the default without tools) is honoured:
    SGLang then renders the conversation without the tools too."""
    tools = _get(body, "tools", "list", [])
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return
    if choice == "required" and not tools:
        raise RequestError("Tools cannot be empty if tool choice is set to required.")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not any(isinstance(t, dict) and (t.get("function") or {}).get("name") == name for t in tools):
            raise RequestError(f"Tool '{name}' not found in tools list.")
    if tools:
        raise unsupported("Tool calling (tools with tool_choice other than none)")


def parse_chat_request(body: object, *, chat_template: str | None, model_defaults: Mapping[str, Any],
                       context_length_flag: int | None = None) -> OpenAIGenerate:
    """POST /v1/chat/completions (contract 7.3). `model_defaults`: the checkpoint's generation_config
    values under `--sampling-defaults model` (empty under `openai`); `context_length_flag`: the server's
    `--context-length`, which SGLang checks max_completion_tokens against."""
    if not isinstance(body, dict):
        raise schema_error("Request body must be a JSON object.")
    messages = body.get("messages")
    if messages is None:
        raise schema_error("Field 'messages' is required.")
    if not isinstance(messages, list):
        raise schema_error(f"Field 'messages' must be an array, got {describe(messages)}.")
    if not messages:
        raise RequestError("Messages cannot be empty.")
    list_content = bool(chat_template and _LIST_CONTENT_TEMPLATE.search(chat_template))
    normalized = [_message(m, i, list_content) for i, m in enumerate(messages)]
    _check_tools(body)
    if _get(body, "continue_final_message", "bool", False):
        raise unsupported("continue_final_message")
    if _get(body, "audio", "object") is not None:
        raise unsupported("Audio output")
    sampling, extras, stream, include_usage, continuous_usage, n = _common(body)
    for name in MODEL_DEFAULT_FIELDS:
        if name not in sampling and name in model_defaults:
            sampling[name] = model_defaults[name]
    max_tokens = _get(body, "max_completion_tokens", "int", _get(body, "max_tokens", "int"))
    if max_tokens is not None:
        if max_tokens < 0:
            raise RequestError(f"max_completion_tokens must be at least 0, got {max_tokens}.")
        if context_length_flag is not None and max_tokens > context_length_flag:
            raise RequestError(f"max_completion_tokens is too large: {max_tokens}.This model supports at most "
                               f"{context_length_flag} completion tokens.")
    sampling["max_new_tokens"] = max_tokens  # null: as many as the context leaves
    logprobs = _get(body, "logprobs", "bool", False)
    top_logprobs = _get(body, "top_logprobs", "int", 0)
    if not 0 <= top_logprobs <= 20:
        raise RequestError(f"top_logprobs must be in [0, 20], got {top_logprobs}.")
    if top_logprobs and not logprobs:
        raise RequestError("top_logprobs needs logprobs set to true.")
    kwargs = dict(_get(body, "chat_template_kwargs", "object", {}))
    effort = _get(body, "reasoning_effort", "str")
    if effort is not None:
        kwargs.setdefault("reasoning_effort", effort)
    for name in ("separate_reasoning", "stream_reasoning"):  # no reasoning parser: nothing to separate
        _get(body, name, "bool", True)
    top = top_logprobs if logprobs else None
    generate = {"sampling_params": sampling, "stream": stream, **extras, **_logprob_fields(top)}
    return OpenAIGenerate(model=_get(body, "model", "str", "default"), stream=stream, generate_body=generate, n=n,
                          include_usage=include_usage, continuous_usage=continuous_usage, top_logprobs=top,
                          messages=normalized, template_kwargs=kwargs)
