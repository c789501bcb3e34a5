"""The logprob fields of a /generate body (contract 3.1, 3.6): `return_logprob`, `logprob_start_len`,
`top_logprobs_num`, `token_ids_logprob`, `return_text_in_logprobs`, into one `LogprobOptions` per prompt.

Each field is a scalar (broadcast to every prompt) or a per-prompt list; list values with n > 1 are
refused earlier (contract 3.2 rule 5). The check of `logprob_start_len` against the prompt length needs
tokens, so the engine does it (`check_start_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.protocol.errors import RequestError, schema_error
from serving.protocol.json_checks import describe, is_int, is_int_list


@dataclass(frozen=True)
class LogprobOptions:
    """One request's logprob options; a request without `return_logprob` has none at all."""

    start_len: int = -1  # logprob_start_len; -1: only the last prompt token (its logprob null)
    top_n: int = 0  # top_logprobs_num
    token_ids: tuple[int, ...] | None = None  # token_ids_logprob; [] is null
    with_text: bool = False  # return_text_in_logprobs


def _per_prompt(body: dict, name: str, batch_size: int, is_value, expected: str) -> list:
    """`name`'s value for each prompt: a scalar broadcast, or a list of one value per prompt."""
    value = body.get(name)
    if isinstance(value, list) and not (name == "token_ids_logprob" and (not value or is_int(value[0]))):
        if len(value) != batch_size:
            raise RequestError(f"{name} has {len(value)} values for a batch of {batch_size} prompts.")
        values = value
    else:
        values = [value] * batch_size
    for v in values:
        if v is not None and not is_value(v):
            raise schema_error(f"{name} must be {expected}, got {describe(value)}.")
    return values


def parse_logprob_fields(body: dict, batch_size: int, vocab_size: int | None) -> list[LogprobOptions | None]:
    """One LogprobOptions (or None: no return_logprob) per prompt, values range-checked."""
    flags = _per_prompt(body, "return_logprob", batch_size, lambda x: isinstance(x, bool),
                        "a boolean or a list of booleans")
    starts = _per_prompt(body, "logprob_start_len", batch_size, is_int, "an integer or a list of integers")
    tops = _per_prompt(body, "top_logprobs_num", batch_size, is_int, "an integer or a list of integers")
    ids = _per_prompt(body, "token_ids_logprob", batch_size, is_int_list,
                      "a list of token ids or a list of such lists")
    with_text = body.get("return_text_in_logprobs") or False
    options: list[LogprobOptions | None] = []
    for flag, start, top, token_ids in zip(flags, starts, tops, ids, strict=True):
        if not flag:
            options.append(None)
            continue
        start = -1 if start is None else start
        if start < -1:
            raise RequestError(f"logprob_start_len must be -1 or at least 0, got {start}.")
        top = 0 if top is None else top
        if top < 0 or (vocab_size is not None and top > vocab_size):
            raise RequestError(f"top_logprobs_num must be in [0, {vocab_size or 'vocab size'}], got {top}.")
        for token_id in token_ids or ():
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                raise RequestError(f"token_ids_logprob must hold token ids in [0, {vocab_size}), got {token_id}.")
        options.append(LogprobOptions(start, top, tuple(token_ids) if token_ids else None, with_text))
    return options


def check_start_len(options: LogprobOptions, prompt_len: int, prefill_only: bool) -> None:
    """SGLang's scheduler-side check (contract 3.2 rule 8): the start must leave a prompt token to
    report; a prefill-only request may start at the prompt's end (an empty list)."""
    start = options.start_len
    if start > prompt_len or (start == prompt_len and not prefill_only):
        raise RequestError(
            f"req.logprob_start_len={start} is higher than the number of input tokens "
            f"len(req.origin_input_ids)={prompt_len}. Please use a smaller logprob_start_len."
        )
