"""Chat templates rendered the way transformers renders them (`PreTrainedTokenizerBase.apply_chat_template`),
without importing transformers: the same sandboxed Jinja environment (trim_blocks, lstrip_blocks,
loopcontrols, the `{% generation %}` tag), the same globals (`raise_exception`, `strftime_now`), the same
`tojson` filter, and the tokenizer's special tokens as template variables, only those that are set (a
template may test `bos_token is defined`). A model's chat template and a prompt rendered by transformers
must tokenize to the same ids, or the model sees a conversation format it was not trained on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not compile, or that refused a conversation (`raise_exception`)."""


class _GenerationTag(Extension):
    """transformers' `AssistantTracker`: `{% generation %}...{% endgeneration %}` marks the assistant's
    tokens for training masks; for rendering it is its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and sorts keys; transformers replaces it with plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def select_template(value: str | list | None, has_tools: bool = False) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of `{"name", "template"}` from which
    transformers takes `tool_use` when tools are given and `default` otherwise."""
    if not isinstance(value, list):
        return value
    named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
    if has_tools and "tool_use" in named:
        return named["tool_use"]
    return named.get("default")


def template_source(flag: str | None) -> str | None:
    """`--chat-template`: the text of a file, or the value itself when it is an inline template."""
    if flag is None:
        return None
    path = os.path.expanduser(flag)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return flag


class ChatTemplate:
    """One compiled template plus the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None]):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"The chat template does not compile: {exc}") from None
        self.source = source
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text; `kwargs` (chat_template_kwargs) override the special tokens, as in transformers.
        Whatever a template raises on these messages (`raise_exception("roles must alternate")`, an
        undefined field, `"text" + None`) becomes a ChatTemplateError: the client's messages caused it."""
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except Exception as exc:  # noqa: BLE001 - a template is user code; any failure is a 400
            raise ChatTemplateError(f"The chat template failed to render these messages: {exc}") from None
