"""POST /generate (contract 3.1 / 3.2): a decoded body in, a typed `NormalizedGenerate` out.

Nothing here needs a tokenizer, a model or jax: checks that need token counts (context length,
auto-truncation) belong to the engine. Where SGLang crashes or silently accepts nonsense we are
stricter and answer 400: out-of-vocabulary `input_ids` (SGLang: not checked); an empty batch; a
`sampling_params` list whose length differs from the batch size. The logprob fields are read by
`logprob_params.py`. Features that a later issue brings (multimodal input, LoRA, sessions, ...) are
accepted at their neutral value and otherwise rejected with a message that ends with `is not supported yet`.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from serving.protocol.errors import RequestError, schema_error, unsupported
from serving.protocol.json_checks import describe, is_int, is_int_list, is_str_list
from serving.protocol.logprob_params import LogprobOptions, parse_logprob_fields
from serving.protocol.sampling import SamplingParams, merge_preferred, sampling_type_error

logger = logging.getLogger(__name__)


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
    logprobs: LogprobOptions | None = None  # with return_logprob


@dataclass
class NormalizedGenerate:
    """A validated /generate body.

    `is_batch` says whether the response is a JSON list (list input or n > 1) and whether stream
    events carry `index`. `n` is the parallel-sample count; item i belongs to prompt i // n.
    `data_parallel_rank`: the replica (`--dp-size`) every item must run on, or None to let the router pick.
    """

    is_batch: bool
    stream: bool
    items: list[GenerateItem] = field(default_factory=list)
    n: int = 1
    data_parallel_rank: int | None = None


def _new_rid() -> str:
    return uuid.uuid4().hex


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
        raise unsupported("input_embeds")

    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    is_single = True
    if text is not None:
        if isinstance(text, str):
            texts = [text]
        elif is_str_list(text):
            if not text:
                raise RequestError("text cannot be an empty list.")
            texts = list(text)
            is_single = False
        else:
            raise schema_error(f"text must be a string or a list of strings, got {describe(text)}.")
    if input_ids is not None:
        bad = schema_error("input_ids must be a list of token ids or a list of such lists, "
                      f"got {describe(input_ids)}.")
        if not isinstance(input_ids, list):
            raise bad
        if not input_ids:
            raise RequestError("input_ids cannot be empty.")
        if is_int(input_ids[0]):
            if not is_int_list(input_ids):
                raise bad
            ids_single, ids = True, [list(input_ids)]
        else:
            if not all(is_int_list(row) for row in input_ids):
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
        if not is_int(value):
            raise sampling_type_error("n", "an integer", value)
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
            duplicates = [r for r, count in Counter(rid).items() if count > 1]
            if duplicates:
                raise RequestError(f"Duplicate request IDs detected within the request: {duplicates}")
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
    raise schema_error(f"sampling_params must be an object or a list of objects, got {describe(sampling_params)}.")


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
            raise schema_error(f"{name} must be {expected}, got {describe(body.get(name))}.")
        return values

    # The logprob fields are read by serving.protocol.logprob_params.
    if any(check_types("return_hidden_states", lambda x: isinstance(x, bool), "a boolean or a list of booleans")):
        raise RequestError(_HIDDEN_STATES)
    if check_types("custom_logit_processor", lambda x: isinstance(x, str), "a string or a list of strings"):
        raise RequestError(_CUSTOM_LOGIT_PROCESSOR)
    if [x for x in _flatten(body.get("lora_path")) if x is not None]:
        raise unsupported("lora_path")
    if body.get("session_params") is not None:
        raise unsupported("session_params")
    for name in ("image_data", "video_data", "audio_data"):
        value = body.get(name)
        if value is not None and value != []:
            raise unsupported(name)


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise schema_error(f"{name} must be a boolean, got {describe(value)}.")
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
        raise schema_error("Request body must be a JSON object.")
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
    logprobs = parse_logprob_fields(body, batch_size, vocab_size)

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
            items.append(GenerateItem(prompt_idx * n + sample_idx, rid, text, input_ids, sampling[prompt_idx],
                                      logprobs[prompt_idx]))
    rank = body.get("data_parallel_rank")
    if rank is not None and not (is_int(rank) and rank >= 0):
        raise schema_error(f"data_parallel_rank must be a non-negative integer, got {describe(rank)}.")
    return NormalizedGenerate(is_batch=not is_single or n > 1, stream=stream, items=items, n=n,
                              data_parallel_rank=rank)
