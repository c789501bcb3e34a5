"""`sampling_params` (contract 3.3): the typed, validated `SamplingParams` and its JSON checks."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serving.protocol.errors import RequestError, unsupported
from serving.protocol.json_checks import describe, is_int, is_int_list, is_number, is_str_list

# Below this temperature a request samples greedily (SGLang's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-6

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters: every key of contract 3.3 with SGLang's default.

    Differences from SGLang's in-memory object, all deliberate:
    - `stop`, `stop_token_ids` and `stop_regex` are tuples; JSON null and `[]` both become `()`, a
      single string becomes a 1-tuple, and empty stop strings are dropped (SGLang would stop after
      the first token on `""`, which nobody means).
    - `top_k` stays -1 for "whole vocabulary" and `temperature` is kept as given; greedy decoding is
      the `greedy` property (temperature < 1e-6), the engine maps both to its sampler.
    - `sampling_seed` defaults to null (SGLang's late-2025 behaviour): the engine derives a seed. A
      given seed makes the request's sampling reproducible; it is any signed 64-bit integer.
    - `n` is what normalization expanded the request by; each expanded item samples once.
    - `spaces_between_special_tokens` changes nothing, exactly as in SGLang with a fast tokenizer (the
      only kind we load): transformers' fast decode ignores it, and so does `tokenizers`' decode.

    Construction validates ranges (exact contract messages) and rejects features we do not have yet,
    so a SamplingParams that exists is one the engine can run. Type checking of JSON input happens in
    `from_dict`.
    """

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_regex: tuple[str, ...] = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    custom_params: Mapping[str, Any] | None = None
    stream_interval: int | None = None
    logit_bias: Mapping[str, float] | None = None
    sampling_seed: int | None = None

    def __post_init__(self) -> None:
        # Range checks, in SGLang's order (SamplingParams.verify), printing the value as given.
        # Written as `not (ok)` so NaN fails too.
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 and self.top_k != -1:
            raise RequestError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise RequestError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise RequestError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 <= self.repetition_penalty <= 2.0:
            raise RequestError(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.")
        if not 0 <= self.min_new_tokens:
            raise RequestError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 0:
                raise RequestError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
            if not self.min_new_tokens <= self.max_new_tokens:
                raise RequestError(
                    f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], "
                    f"got {self.min_new_tokens}."
                )
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            raise RequestError("Only one of regex, json_schema, or ebnf can be set.")
        # Our own checks.
        if self.n < 1:
            raise RequestError(f"n must be at least 1, got {self.n}.")
        if self.stream_interval is not None and self.stream_interval < 1:
            raise RequestError(f"stream_interval must be at least 1, got {self.stream_interval}.")
        if self.sampling_seed is not None and not _INT64_MIN <= self.sampling_seed <= _INT64_MAX:
            raise RequestError(f"sampling_seed must be a signed 64-bit integer, got {self.sampling_seed}.")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RequestError(f"stop_regex {pattern!r} is not a valid regular expression: {exc}.") from None
        # Features a later issue brings: accepted only at their neutral value.
        # json_schema / regex / ebnf are compiled by the engine's grammar backend (serving/grammar.py).
        if self.structural_tag is not None:
            raise unsupported("Constrained decoding (structural_tag)")
        if self.custom_params is not None:
            raise unsupported("custom_params")
        # Normalize representations only after the messages above printed the values as given.
        for key in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                    "repetition_penalty"):
            object.__setattr__(self, key, float(getattr(self, key)))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_regex", tuple(self.stop_regex))
        if self.logit_bias is not None and not self.logit_bias:
            object.__setattr__(self, "logit_bias", None)

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature below 1e-6, 0 included)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict with the same keys a client sends."""
        out = dataclasses.asdict(self)
        for key in ("stop", "stop_token_ids", "stop_regex"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> SamplingParams:
        """Validate a decoded JSON `sampling_params` object and build the params.

        Rejects unknown keys and wrong JSON types (naming the key and the expected type); JSON null
        is accepted for keys whose default is null. `vocab_size`, when known, bounds `logit_bias` keys.
        """
        if not isinstance(params, Mapping):
            raise RequestError(f"sampling_params must be an object, got {describe(params)}.")
        unknown = sorted(k for k in params if k not in _SAMPLING_KEYS)
        if unknown:
            raise RequestError(
                f"Unknown sampling parameter '{unknown[0]}'. "
                f"Known parameters: {', '.join(sorted(_SAMPLING_KEYS))}"
            )
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            kwargs[key] = _SAMPLING_CHECKS[key](key, value)
        bias = kwargs.get("logit_bias")
        if bias and vocab_size is not None:
            for token_id in bias:
                if not 0 <= int(token_id) < vocab_size:
                    raise RequestError(f"logit_bias must has keys in [0, {vocab_size - 1}], got {token_id}.")
        return cls(**kwargs)


def sampling_type_error(key: str, expected: str, value: object) -> RequestError:
    return RequestError(f"Sampling parameter '{key}' must be {expected}, got {describe(value)}.")


def _check_int(nullable: bool):
    def check(key: str, value: object) -> int | None:
        if value is None and nullable:
            return None
        if not is_int(value):
            raise sampling_type_error(key, "an integer or null" if nullable else "an integer", value)
        return value

    return check


def _check_float(key: str, value: object) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise sampling_type_error(key, "a finite number", value)
    return value


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise sampling_type_error(key, "a boolean", value)
    return value


def _check_str_or_null(key: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise sampling_type_error(key, "a string or null", value)
    return value


def _check_strings(key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not is_str_list(value):
        raise sampling_type_error(key, "a string, a list of strings, or null", value)
    return tuple(value)


def _check_token_ids(key: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not is_int_list(value) or any(x < 0 for x in value):
        raise sampling_type_error(key, "a list of non-negative integers or null", value)
    return tuple(value)


def _check_object(key: str, value: object) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise sampling_type_error(key, "an object or null", value)
    return value


def _check_logit_bias(key: str, value: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise sampling_type_error(key, "an object mapping token ids to numbers, or null", value)
    for token_id, bias in value.items():
        try:
            int(token_id)
        except (TypeError, ValueError):
            raise RequestError(
                f"logit_bias keys must be token ids (integers as strings), got {describe(token_id)}."
            ) from None
        if not is_number(bias) or not math.isfinite(bias):
            raise RequestError(f"logit_bias values must be finite numbers, got {describe(bias)}.")
    return value


_SAMPLING_CHECKS = {
    "max_new_tokens": _check_int(nullable=True),
    "min_new_tokens": _check_int(nullable=False),
    "stop": _check_strings,
    "stop_token_ids": _check_token_ids,
    "stop_regex": _check_strings,
    "temperature": _check_float,
    "top_p": _check_float,
    "top_k": _check_int(nullable=False),
    "min_p": _check_float,
    "frequency_penalty": _check_float,
    "presence_penalty": _check_float,
    "repetition_penalty": _check_float,
    "n": _check_int(nullable=False),
    "json_schema": _check_str_or_null,
    "regex": _check_str_or_null,
    "ebnf": _check_str_or_null,
    "structural_tag": _check_str_or_null,
    "ignore_eos": _check_bool,
    "skip_special_tokens": _check_bool,
    "spaces_between_special_tokens": _check_bool,
    "no_stop_trim": _check_bool,
    "custom_params": _check_object,
    "stream_interval": _check_int(nullable=True),
    "logit_bias": _check_logit_bias,
    "sampling_seed": _check_int(nullable=True),
}
_SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(SamplingParams))
assert _SAMPLING_KEYS == set(_SAMPLING_CHECKS), "every sampling key needs a type check"


def merge_preferred(preferred: Mapping[str, Any] | None, request_params: Mapping[str, Any]) -> dict[str, Any]:
    """`--preferred-sampling-params` underneath the request's own params (request keys win)."""
    return {**(preferred or {}), **request_params}
