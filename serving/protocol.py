"""Typed request structs for the native API and their validation.

Everything the HTTP layer receives passes through here before it reaches the engine: a decoded JSON
body goes in, a typed, normalized request (or a `RequestError` with the exact message SGLang 0.5.6
would give, see shared/reference/api-contract.md sections 3.2 and 3.3) comes out. Nothing here needs a
tokenizer, a model or jax: checks that need token counts (context length, auto-truncation) belong to
the engine.

Where SGLang crashes or silently accepts nonsense we are stricter and answer 400:
- an unknown key inside `sampling_params` (SGLang: TypeError -> HTTP 500);
- out-of-vocabulary `input_ids` (SGLang: not checked);
- an empty batch, a `sampling_params` list whose length differs from the batch size.
Features that a later issue brings (penalties, constrained decoding, logprobs, multimodal input,
LoRA, sessions, ...) are accepted at their neutral value and otherwise rejected with a message that
ends with `is not supported yet`.

Error classes: `RequestError` is what a native route answers as 400 `{"error": {"message": ...}}`
(contract 1.1 case A). `SchemaError` is the subset where the body itself has the wrong shape (not an
object, a field of the wrong JSON type, a required field missing) -- the failures SGLang's FastAPI layer
reports with its validation envelope (case B). A server may treat both alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

NOT_SUPPORTED_SUFFIX = "is not supported yet"

# Below this temperature a request samples greedily (SGLang's _SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-6

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class RequestError(ValueError):
    """A request the server rejects with HTTP 400; `str(exc)` is the client-facing message."""

    status_code = 400


class SchemaError(RequestError):
    """The body has the wrong shape (not an object, wrong JSON type, missing required field)."""


def _unsupported(what: str) -> RequestError:
    return RequestError(f"{what} {NOT_SUPPORTED_SUFFIX}")


# ---------------------------------------------------------------------------------------------------
# JSON type checks
# ---------------------------------------------------------------------------------------------------


def _describe(value: object) -> str:
    """A JSON-ish rendering of a value plus its JSON type, for error messages."""
    kind = {
        type(None): "null",
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        tuple: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({kind})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _is_int_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(x) for x in value)


# ---------------------------------------------------------------------------------------------------
# sampling_params (contract 3.3)
# ---------------------------------------------------------------------------------------------------


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
        # Features a later issue brings: accepted only at their neutral value.
        if self.frequency_penalty != 0:
            raise _unsupported("frequency_penalty other than 0")
        if self.presence_penalty != 0:
            raise _unsupported("presence_penalty other than 0")
        if self.repetition_penalty != 1:
            raise _unsupported("repetition_penalty other than 1")
        for key in ("json_schema", "regex", "ebnf", "structural_tag"):
            if getattr(self, key) is not None:
                raise _unsupported(f"Constrained decoding ({key})")
        if self.stop_regex:
            raise _unsupported("stop_regex")
        if self.logit_bias:
            raise _unsupported("logit_bias")
        if self.custom_params is not None:
            raise _unsupported("custom_params")
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
            raise RequestError(f"sampling_params must be an object, got {_describe(params)}.")
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


def _sampling_type_error(key: str, expected: str, value: object) -> RequestError:
    return RequestError(f"Sampling parameter '{key}' must be {expected}, got {_describe(value)}.")


def _check_int(nullable: bool):
    def check(key: str, value: object) -> int | None:
        if value is None and nullable:
            return None
        if not _is_int(value):
            raise _sampling_type_error(key, "an integer or null" if nullable else "an integer", value)
        return value

    return check


def _check_float(key: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _sampling_type_error(key, "a finite number", value)
    return value


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _sampling_type_error(key, "a boolean", value)
    return value


def _check_str_or_null(key: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _sampling_type_error(key, "a string or null", value)
    return value


def _check_strings(key: str, value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not _is_str_list(value):
        raise _sampling_type_error(key, "a string, a list of strings, or null", value)
    return tuple(value)


def _check_token_ids(key: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not _is_int_list(value) or any(x < 0 for x in value):
        raise _sampling_type_error(key, "a list of non-negative integers or null", value)
    return tuple(value)


def _check_object(key: str, value: object) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise _sampling_type_error(key, "an object or null", value)
    return value


def _check_logit_bias(key: str, value: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _sampling_type_error(key, "an object mapping token ids to numbers, or null", value)
    for token_id, bias in value.items():
        try:
            int(token_id)
        except (TypeError, ValueError):
            raise RequestError(
                f"logit_bias keys must be token ids (integers as strings), got {_describe(token_id)}."
            ) from None
        if not _is_number(bias) or not math.isfinite(bias):
            raise RequestError(f"logit_bias values must be finite numbers, got {_describe(bias)}.")
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


# ---------------------------------------------------------------------------------------------------
# POST /generate (contract 3.1 / 3.2)
# ---------------------------------------------------------------------------------------------------

# Every field of GenerateReqInput (contract 3.1, plus the late-2025 additions). Other top-level keys
# are ignored, as FastAPI does for SGLang, and logged at debug level.
GENERATE_FIELDS = frozenset({
    "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "sampling_params",
    "rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob",
    "return_text_in_logprobs", "stream", "log_metrics", "return_hidden_states", "modalities",
    "session_params", "lora_path", "lora_id", "custom_logit_processor", "bootstrap_host",
    "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "validation_time", "data_parallel_rank",
    "background", "conversation_id", "priority", "extra_key", "no_logs", "custom_labels", "return_bytes",
    "return_entropy", "http_worker_ipc", "return_routed_experts", "decode_tp_size", "require_reasoning",
    "received_time", "received_time_perf", "need_wait_for_image", "num_items_assigned",
})

_EMPTY_TEXT = "texts cannot be empty and tokenizer must be initialized"
_SKIP_TOKENIZER_TEXT = (
    "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide "
    "input_ids or re-initialize the engine with skip_tokenizer_init=False."
)
_HIDDEN_STATES = (
    "The server is not configured to return the hidden states. Please set "
    "`--enable-return-hidden-states` to enable this feature."
)
_CUSTOM_LOGIT_PROCESSOR = (
    "The server is not configured to enable custom logit processor. Please set "
    "`--enable-custom-logit-processor` to enable this feature."
)


class GenerateItem(NamedTuple):
    """One request the engine runs, in output order.

    `index` is the position in the response list (prompt-major: prompt_idx * n + sample_idx).
    When both `text` and `input_ids` were given, `input_ids` is what runs (SGLang's quirk: the batch
    shape comes from `text`, the tokens from `input_ids`); otherwise exactly one of them is set.
    """

    index: int
    rid: str
    text: str | None
    input_ids: list[int] | None
    sampling: SamplingParams


@dataclass
class NormalizedGenerate:
    """A validated /generate body.

    `is_batch` says whether the response is a JSON list (list input or n > 1) and whether stream
    events carry `index`. `n` is the parallel-sample count; item i belongs to prompt i // n.
    """

    is_batch: bool
    stream: bool
    items: list[GenerateItem] = field(default_factory=list)
    n: int = 1


def _new_rid() -> str:
    return uuid.uuid4().hex


def _schema(message: str) -> SchemaError:
    return SchemaError(message)


def _normalize_prompts(body: dict) -> tuple[bool, list[str] | None, list[list[int]] | None]:
    """Rules 1-2: which input, single or batch. Returns (is_single, texts, input_ids)."""
    text = body.get("text")
    input_ids = body.get("input_ids")
    input_embeds = body.get("input_embeds")
    given = sum(x is not None for x in (text, input_ids, input_embeds))
    if given == 0 or given == 3:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    if input_embeds is not None:
        # No embedding-input path in our model runner.
        raise _unsupported("input_embeds")

    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    is_single = True
    if text is not None:
        if isinstance(text, str):
            texts = [text]
        elif _is_str_list(text):
            if not text:
                raise RequestError("text cannot be an empty list.")
            texts = list(text)
            is_single = False
        else:
            raise _schema(f"text must be a string or a list of strings, got {_describe(text)}.")
    if input_ids is not None:
        bad = _schema("input_ids must be a list of token ids or a list of such lists, "
                      f"got {_describe(input_ids)}.")
        if not isinstance(input_ids, list):
            raise bad
        if not input_ids:
            raise RequestError("input_ids cannot be empty.")
        if _is_int(input_ids[0]):
            if not _is_int_list(input_ids):
                raise bad
            ids_single, ids = True, [list(input_ids)]
        else:
            if not all(_is_int_list(row) for row in input_ids):
                raise bad
            if any(not row for row in input_ids):
                raise RequestError("input_ids cannot be empty.")
            ids_single, ids = False, [list(row) for row in input_ids]
        if texts is None:
            is_single = ids_single
        elif ids_single != is_single or len(ids) != len(texts):
            raise RequestError("text and input_ids were both given but describe different batch sizes.")
    return is_single, texts, ids


def _read_n(sampling_params: object) -> int:
    """Rule 3: the parallel-sample count, read from the request's own sampling params."""
    if isinstance(sampling_params, list):
        values = [p.get("n", 1) if isinstance(p, dict) else 1 for p in sampling_params]
    elif isinstance(sampling_params, dict):
        values = [sampling_params.get("n", 1)]
    else:
        values = [1]
    for value in values:
        if not _is_int(value):
            raise _sampling_type_error("n", "an integer", value)
    if any(v != values[0] for v in values):
        raise RequestError("The parallel_sample_num should be the same for all samples in sample params.")
    n = values[0] if values else 1
    if n < 1:
        raise RequestError(f"n must be at least 1, got {n}.")
    return n


def _normalize_rids(rid: object, batch_size: int, is_single: bool) -> list[str]:
    """Rules 4-5: one rid per prompt (before n-expansion)."""
    if rid is None:
        return [_new_rid() for _ in range(batch_size)]
    if isinstance(rid, str):
        return [rid] if is_single else [f"{rid}_{i}" for i in range(batch_size)]
    if isinstance(rid, list):
        if len(rid) != batch_size:
            raise RequestError("The specified rids length mismatch with the batch_size for batch processing.")
        if all(isinstance(r, str) for r in rid):
            return list(rid)
    raise RequestError("The rid should be a string or a list of strings.")


def _per_prompt_sampling(sampling_params: object, batch_size: int) -> list[dict]:
    if sampling_params is None:
        return [{}] * batch_size
    if isinstance(sampling_params, dict):
        return [sampling_params] * batch_size
    if isinstance(sampling_params, list) and all(isinstance(p, dict) for p in sampling_params):
        if len(sampling_params) != batch_size:
            raise RequestError("The length of sampling_params should be equal to the batch size.")
        return list(sampling_params)
    raise _schema(f"sampling_params must be an object or a list of objects, got {_describe(sampling_params)}.")


def _flatten(value: object) -> list:
    return value if isinstance(value, list) else [value]


def _check_per_item_fields(body: dict, n: int) -> None:
    """Rule 5 (list-valued params with n > 1) and the per-item features we do not support yet."""
    for name in ("return_logprob", "logprob_start_len", "top_logprobs_num", "custom_logit_processor"):
        if isinstance(body.get(name), list) and n > 1:
            raise RequestError(f"Cannot use list {name} with parallel_sample_num > 1")
    token_ids_logprob = body.get("token_ids_logprob")
    if isinstance(token_ids_logprob, list) and token_ids_logprob and isinstance(token_ids_logprob[0], list):
        if n > 1:
            raise RequestError("Cannot use list token_ids_logprob with parallel_sample_num > 1")

    def check_types(name: str, ok, expected: str) -> list:
        values = [x for x in _flatten(body.get(name)) if x is not None]
        if not all(ok(x) for x in values):
            raise _schema(f"{name} must be {expected}, got {_describe(body.get(name))}.")
        return values

    if any(check_types("return_logprob", lambda x: isinstance(x, bool), "a boolean or a list of booleans")):
        raise _unsupported("return_logprob")
    check_types("logprob_start_len", _is_int, "an integer or a list of integers")
    if any(x > 0 for x in check_types("top_logprobs_num", _is_int, "an integer or a list of integers")):
        raise _unsupported("top_logprobs_num")
    if token_ids_logprob is not None:
        rows = token_ids_logprob if token_ids_logprob and isinstance(token_ids_logprob[0], list) else [
            token_ids_logprob]
        if not isinstance(token_ids_logprob, list) or not all(_is_int_list(r) for r in rows):
            raise _schema("token_ids_logprob must be a list of token ids or a list of such lists, "
                          f"got {_describe(token_ids_logprob)}.")
        if any(rows):
            raise _unsupported("token_ids_logprob")
    if any(check_types("return_hidden_states", lambda x: isinstance(x, bool), "a boolean or a list of booleans")):
        raise RequestError(_HIDDEN_STATES)
    if check_types("custom_logit_processor", lambda x: isinstance(x, str), "a string or a list of strings"):
        raise RequestError(_CUSTOM_LOGIT_PROCESSOR)
    if [x for x in _flatten(body.get("lora_path")) if x is not None]:
        raise _unsupported("lora_path")
    if body.get("session_params") is not None:
        raise _unsupported("session_params")
    for name in ("image_data", "video_data", "audio_data"):
        value = body.get(name)
        if value is not None and value != []:
            raise _unsupported(name)


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _schema(f"{name} must be a boolean, got {_describe(value)}.")
    return value


def parse_generate_request(
    body: object,
    *,
    vocab_size: int | None,
    preferred_sampling_params: Mapping[str, Any] | None,
    skip_tokenizer_init: bool = False,
) -> NormalizedGenerate:
    """Validate and normalize a decoded /generate body (contract 3.2 rules 1-7, those without tokens).

    `preferred_sampling_params` is the parsed `--preferred-sampling-params` object, merged under each
    prompt's params. `vocab_size` (when known) bounds `input_ids`. Items come out prompt-major; with
    n > 1 every copy gets a fresh uuid4-hex rid (the client's rid is validated, then not used), and the
    hidden prefill-only warm-up copy SGLang sends first is left to the engine.
    """
    if not isinstance(body, dict):
        raise _schema("Request body must be a JSON object.")
    unknown = sorted(k for k in body if k not in GENERATE_FIELDS)
    if unknown:
        logger.debug("Ignoring unknown /generate fields: %s", ", ".join(unknown))

    is_single, texts, ids = _normalize_prompts(body)
    batch_size = len(texts) if texts is not None else len(ids)
    n = _read_n(body.get("sampling_params"))
    rids = _normalize_rids(body.get("rid"), batch_size, is_single)
    per_prompt = _per_prompt_sampling(body.get("sampling_params"), batch_size)
    stream = _bool_field(body, "stream", False)
    _bool_field(body, "return_text_in_logprobs", False)
    _check_per_item_fields(body, n)

    for prompt_idx in range(batch_size):
        if ids is None:
            if skip_tokenizer_init:
                raise RequestError(_SKIP_TOKENIZER_TEXT)
            if texts[prompt_idx] == "":
                raise RequestError(_EMPTY_TEXT)
        elif vocab_size is not None:
            for token_id in ids[prompt_idx]:
                if not 0 <= token_id < vocab_size:
                    raise RequestError(
                        f"Token id {token_id} in input_ids is out of vocabulary (vocab size {vocab_size})."
                    )

    # Validate each distinct params object once; a broadcast dict yields one shared SamplingParams.
    built: dict[int, SamplingParams] = {}
    sampling: list[SamplingParams] = []
    for params in per_prompt:
        if id(params) not in built:
            merged = merge_preferred(preferred_sampling_params, params)
            merged["n"] = n
            built[id(params)] = SamplingParams.from_dict(merged, vocab_size)
        sampling.append(built[id(params)])

    items: list[GenerateItem] = []
    for prompt_idx in range(batch_size):
        text = texts[prompt_idx] if texts is not None else None
        input_ids = ids[prompt_idx] if ids is not None else None
        for sample_idx in range(n):
            rid = rids[prompt_idx] if n == 1 else _new_rid()
            items.append(GenerateItem(prompt_idx * n + sample_idx, rid, text, input_ids, sampling[prompt_idx]))
    return NormalizedGenerate(is_batch=not is_single or n > 1, stream=stream, items=items, n=n)


# ---------------------------------------------------------------------------------------------------
# Simpler bodies
# ---------------------------------------------------------------------------------------------------

_MISSING = object()


def _field(body: Mapping[str, Any], name: str, kind: str, default: object = _MISSING) -> Any:
    """Read one field of a simple body. kind: bool, int, str, str?, where ? allows null."""
    if name not in body:
        if default is _MISSING:
            raise _schema(f"Field '{name}' is required.")
        return default
    value = body[name]
    nullable = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None and nullable:
        return None
    ok = {"bool": lambda v: isinstance(v, bool), "int": _is_int, "str": lambda v: isinstance(v, str)}[base](value)
    if not ok:
        expected = {"bool": "a boolean", "int": "an integer", "str": "a string"}[base]
        raise _schema(f"Field '{name}' must be {expected}{' or null' if nullable else ''}, got {_describe(value)}.")
    return value


def _object_body(body: object, *, allow_empty: bool) -> Mapping[str, Any]:
    if body is None and allow_empty:
        return {}
    if not isinstance(body, dict):
        raise _schema("Request body must be a JSON object.")
    return body


def parse_abort_request(body: object) -> tuple[str, bool]:
    """POST /abort_request: `{"rid": "" , "abort_all": false}` -> (rid, abort_all). A missing body
    counts as `{}`. The rid is a prefix: the scheduler aborts every request whose id starts with it."""
    body = _object_body(body, allow_empty=True)
    return _field(body, "rid", "str", ""), _field(body, "abort_all", "bool", False)


@dataclass(frozen=True)
class UpdateWeightsRequest:
    """POST /update_weights_from_disk body (contract 5.5). `load_format` None = the server's current
    `--load-format`. The CUDA-only knobs (torch_empty_cache, recapture_cuda_graph) are accepted and
    have nothing to do on our runtime."""

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
    body = _object_body(body, allow_empty=False)
    kinds = {"model_path": "str", "load_format": "str?", "weight_version": "str?", "token_step": "int"}
    kwargs = {}
    for f in dataclasses.fields(UpdateWeightsRequest):
        kind = kinds.get(f.name, "bool")
        default = _MISSING if f.name == "model_path" else f.default
        kwargs[f.name] = _field(body, f.name, kind, default)
    if not kwargs["model_path"]:
        raise RequestError("model_path cannot be empty.")
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
    body = _object_body(body, allow_empty=False)
    if "prompt" not in body:
        raise _schema("Field 'prompt' is required.")
    prompt = body["prompt"]
    if not isinstance(prompt, str) and not _is_str_list(prompt):
        raise _schema(f"Field 'prompt' must be a string or a list of strings, got {_describe(prompt)}.")
    return TokenizeRequest(
        prompt=prompt if isinstance(prompt, str) else list(prompt),
        model=_field(body, "model", "str", "default"),
        add_special_tokens=_field(body, "add_special_tokens", "bool", True),
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
    body = _object_body(body, allow_empty=False)
    if "tokens" not in body:
        raise _schema("Field 'tokens' is required.")
    tokens = body["tokens"]
    is_flat = _is_int_list(tokens)
    if not is_flat and not (isinstance(tokens, list) and all(_is_int_list(row) for row in tokens)):
        raise _schema(f"Field 'tokens' must be a list of integers or a list of such lists, got {_describe(tokens)}.")
    rows = [tokens] if is_flat else tokens
    for row in rows:
        for token_id in row:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                size = f" (vocab size {vocab_size})" if vocab_size is not None else ""
                raise RequestError(f"Token id {token_id} in tokens is out of vocabulary{size}.")
    return DetokenizeRequest(
        tokens=list(tokens) if is_flat else [list(r) for r in rows],
        model=_field(body, "model", "str", "default"),
        skip_special_tokens=_field(body, "skip_special_tokens", "bool", True),
    )


# ---------------------------------------------------------------------------------------------------
# finish_reason shapes (contract 3.5)
# ---------------------------------------------------------------------------------------------------


def finish_stop_token(token_id: int) -> dict[str, Any]:
    """EOS, a stop_token_ids hit, or a model's extra stop id."""
    return {"type": "stop", "matched": int(token_id)}


def finish_stop_str(stop: str) -> dict[str, Any]:
    """A stop string (or stop regex pattern) matched."""
    return {"type": "stop", "matched": stop}


def finish_length(length: int) -> dict[str, Any]:
    """max_new_tokens reached; `length` is the effective max_new_tokens (0 for prefill-only)."""
    return {"type": "length", "length": int(length)}


def finish_abort(message: str, status_code: int | None = None, err_type: str | None = None) -> dict[str, Any]:
    """A running request aborted (user abort: message "Aborted", status/err_type null)."""
    return {"type": "abort", "message": message, "status_code": status_code, "err_type": err_type}


def finish_abort_waiting() -> dict[str, Any]:
    """A request aborted while still queued: only two keys, as in SGLang."""
    return {"type": "abort", "message": "Abort in waiting queue"}
