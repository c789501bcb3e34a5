"""Bodies of the weight and memory control routes (contract 5.4, 5.8 to 5.10, pause / continue)."""

from __future__ import annotations

from dataclasses import dataclass

from serving.protocol.errors import RequestError, schema_error
from serving.protocol.json_checks import describe, is_str_list, object_body, read_field

PAUSE_MODES = ("abort", "retract", "in_place")
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


def parse_pause_request(body: object) -> str:
    """POST /pause_generation `{"mode": "abort" | "retract" | "in_place"}` (default abort) -> the mode."""
    mode = read_field(object_body(body, allow_empty=True), "mode", "str", "abort")
    if mode not in PAUSE_MODES:
        raise RequestError(f"mode must be one of {', '.join(PAUSE_MODES)}; got {mode!r}.")
    return mode


def parse_memory_tags(body: object) -> tuple[str, ...]:
    """`{"tags": [...] | null}` of /release_memory_occupation and /resume_memory_occupation; null or
    empty means every tag. `cuda_graph` is accepted and has nothing to hold on this runtime (XLA keeps
    compiled executables, not captured graphs, and they own no device buffers of the model's)."""
    tags = object_body(body, allow_empty=True).get("tags")
    if tags is None or tags == []:
        return MEMORY_TAGS
    if not is_str_list(tags):
        raise schema_error(f"Field 'tags' must be a list of strings or null, got {describe(tags)}.")
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise RequestError(f"Unknown memory tag {unknown[0]!r}; tags are {', '.join(MEMORY_TAGS)}.")
    return tuple(dict.fromkeys(tags))


def parse_update_weight_version(body: object) -> tuple[str, bool]:
    """POST /update_weight_version `{"new_version": str, "abort_all_requests": true}`."""
    body = object_body(body, allow_empty=False)
    return read_field(body, "new_version", "str"), read_field(body, "abort_all_requests", "bool", True)


@dataclass(frozen=True)
class WeightsByNameRequest:
    """GET|POST /get_weights_by_name (contract 5.9): a Hugging Face tensor name."""

    name: str
    truncate_size: int = 100


def parse_get_weights_by_name(body: object) -> WeightsByNameRequest:
    body = object_body(body, allow_empty=False)
    truncate = read_field(body, "truncate_size", "int", 100)
    if truncate < 0:
        raise RequestError(f"truncate_size must be non-negative, got {truncate}.")
    return WeightsByNameRequest(read_field(body, "name", "str"), truncate)


def parse_flush_timeout(value: str | None) -> float:
    """`/flush_cache?timeout=<seconds>` (SGLang's query parameter, default 0: answer at once)."""
    if value is None or value == "":
        return 0.0
    try:
        timeout = float(value)
    except ValueError:
        raise RequestError(f"timeout must be a number of seconds, got {value!r}.") from None
    if not 0 <= timeout < float("inf"):  # NaN fails too
        raise RequestError(f"timeout must be a finite non-negative number of seconds, got {value!r}.")
    return timeout
