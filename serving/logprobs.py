"""Logprobs for /generate (contract 3.6): computed on device only for steps that ask, recorded per request.

What is reported is the log-softmax of the model's raw logits: before penalties, logit_bias, the
min_new_tokens ban and temperature (SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1; SGLang's default
reports the processed distribution instead, which makes a token's logprob depend on the request's
sampling knobs; the raw one is what a client comparing models or scoring text means).

Device side: a step that carries a `LogprobBatch` (any request in it asked) returns, besides the
tokens, each row's chosen-token logprob, its top `num_top` (a static, power-of-two width) and the
logprobs of its requested ids; and for the prompt positions that input logprobs need, the same three
against the next prompt token. Only those numbers leave the device. A step without one is the plain
compiled step.

Host side: `LogprobRecord` (on the Request) keeps the entries `[logprob, token_id, text|null]`, and
`LogprobPlan` (one per step) says which step rows and prompt positions belong to which request.
The radix-cached prefix yields no logits, so a request that still needs input logprobs matches at most
`next_input` prompt tokens (`Request.prefix_limit`), as SGLang caps its prefix at logprob_start_len.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from serving.protocol.logprob_params import LogprobOptions, check_start_len

if TYPE_CHECKING:
    from serving.request import Request
    from serving.tokenizer import Tokenizer


def _width(n: int) -> int:
    """0 stays 0 (no column at all); otherwise the next power of two."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


class LogprobBatch(NamedTuple):
    token_ids: jax.Array  # int32[S, Wt]: each row's requested ids, -1 pads (Wt may be 0)
    input_indices: jax.Array  # int32[P]: step-token indices whose logits input logprobs need
    input_targets: jax.Array  # int32[P]: the prompt token each of them predicts
    input_rows: jax.Array  # int32[P]: the sequence row each belongs to

    @staticmethod
    def pad(host: dict[str, np.ndarray], num_seqs: int) -> dict[str, np.ndarray]:
        token_ids = np.full((num_seqs, host["token_ids"].shape[1]), -1, np.int32)
        token_ids[: len(host["token_ids"])] = host["token_ids"]
        return {**host, "token_ids": token_ids}


def _gather(logprobs, targets, token_ids, num_top: int) -> dict[str, jax.Array]:
    out = {"token": jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0],
           "ids": jnp.take_along_axis(logprobs, jnp.maximum(token_ids, 0), axis=-1)}
    if num_top:
        out["top_values"], out["top_ids"] = jax.lax.top_k(logprobs, num_top)
    return out


# Prompt positions whose logits are materialised at once: a long prefill chunk asking for input logprobs
# would otherwise hold [chunk, vocab] float32 (1.6 GB for 8192 x 49152).
INPUT_LOGITS_BLOCK = 256


def step_logprobs(model, hidden, sampled_logits, tokens, batch: LogprobBatch, num_top: int) -> dict[str, Any]:
    """Inside a jit: the numbers of the module docstring (`output` per row, `input` per needed prompt
    position, computed INPUT_LOGITS_BLOCK positions at a time). `sampled_logits` are the raw logits of
    the rows the step samples."""
    output = _gather(jax.nn.log_softmax(sampled_logits, axis=-1), tokens, batch.token_ids, num_top)

    def input_block(block):
        indices, targets, rows = block
        logprobs = jax.nn.log_softmax(model.logits(hidden[indices]), axis=-1)
        return _gather(logprobs, targets, batch.token_ids[rows], num_top)

    # The position count is a power of two, so it splits into whole blocks.
    size = min(INPUT_LOGITS_BLOCK, batch.input_indices.shape[0])
    blocks = tuple(x.reshape(-1, size) for x in (batch.input_indices, batch.input_targets, batch.input_rows))
    inputs = jax.lax.map(input_block, blocks)
    inputs = jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), inputs)
    return {"output": output, "input": inputs}


@dataclass(eq=False)
class LogprobRecord:
    """One request's logprob entries so far, in the wire shape (contract 3.6)."""

    options: LogprobOptions
    prompt: Sequence[int]
    prefill_only: bool
    token_text: Callable[[int], str] | None  # None: text stays null
    start: int = 0  # first input position reported
    next_input: int = 0  # next prompt position whose logits are still needed
    input_token: list = field(default_factory=list)
    input_top: list = field(default_factory=list)
    input_ids: list = field(default_factory=list)
    output_token: list = field(default_factory=list)
    output_top: list = field(default_factory=list)
    output_ids: list = field(default_factory=list)

    def __post_init__(self) -> None:
        # -1: only the last prompt token (its entry null); prefill-only with the default: nothing.
        prompt_len = len(self.prompt)
        start = self.options.start_len
        if start < 0:
            start = prompt_len if self.prefill_only else prompt_len - 1
        self.start = self.next_input = start
        if start < prompt_len:  # the first input entry: no prediction for it
            self.input_token.append(self._entry(None, self.prompt[start]))
            self.input_top.append(None)
            self.input_ids.append(None)

    @property
    def input_end(self) -> int:
        """Positions `[start, input_end)` need logits: each predicts the prompt token after it."""
        return len(self.prompt) - 1

    def _entry(self, logprob: float | None, token_id: int) -> list:
        text = self.token_text(token_id) if self.token_text is not None and self.options.with_text else None
        return [None if logprob is None else float(logprob), int(token_id), text]

    def _row(self, values: np.ndarray | None, ids: np.ndarray | None, count: int) -> list:
        return [self._entry(v, t) for v, t in zip(values[:count].tolist(), ids[:count].tolist(), strict=True)]

    def _add(self, token_list, top_list, ids_list, token_id, numbers, i) -> None:
        token_list.append(self._entry(numbers["token"][i], token_id))
        if self.options.top_n:
            top_list.append(self._row(numbers["top_values"][i], numbers["top_ids"][i], self.options.top_n))
        if self.options.token_ids:
            asked = np.asarray(self.options.token_ids)
            ids_list.append(self._row(numbers["ids"][i], asked, len(asked)))

    def add_output(self, token_id: int, numbers: dict[str, np.ndarray], row: int) -> None:
        self._add(self.output_token, self.output_top, self.output_ids, token_id, numbers, row)

    def add_input(self, token_id: int, numbers: dict[str, np.ndarray], i: int) -> None:
        self._add(self.input_token, self.input_top, self.input_ids, token_id, numbers, i)
        self.next_input += 1

    def meta(self) -> dict[str, list]:
        """The meta_info keys, copied (a stream snapshot must not grow afterwards)."""
        out = {"input_token_logprobs": list(self.input_token), "output_token_logprobs": list(self.output_token)}
        if self.options.top_n:
            out["input_top_logprobs"] = list(self.input_top)
            out["output_top_logprobs"] = list(self.output_top)
        if self.options.token_ids:
            out["input_token_ids_logprobs"] = list(self.input_ids)
            out["output_token_ids_logprobs"] = list(self.output_ids)
        return out


@dataclass
class LogprobPlan:
    """Which requests of one step get which numbers: built with the host batch, applied after the run."""

    outputs: list[tuple[Request, int]]  # (request, step row) of rows that sample a kept token
    inputs: list[tuple[Request, int]]  # (request, prompt token id) per needed position, in `input_*` order
    num_top: int
    host: dict[str, np.ndarray]

    def record(self, numbers: dict[str, dict[str, np.ndarray]], tokens: np.ndarray) -> None:
        for i, (request, token_id) in enumerate(self.inputs):
            request.logprobs.add_input(token_id, numbers["input"], i)
        for request, row in self.outputs:
            if request.finish_reason is None:  # not aborted while the step ran
                request.logprobs.add_output(int(tokens[row]), numbers["output"], row)


def build_logprob_plan(batch: Sequence[tuple[Request, int]]) -> LogprobPlan | None:
    """The step's LogprobBatch host arrays and plan, or None when no request in it wants logprobs."""
    if not any(r.logprobs is not None for r, _ in batch):
        return None
    outputs, inputs, indices, rows = [], [], [], []
    offset = 0
    for row, (request, n) in enumerate(batch):
        record = request.logprobs
        start = request.num_computed
        if record is not None:
            if start + n >= request.total_len:
                outputs.append((request, row))
            for position in range(max(start, record.next_input), min(start + n, record.input_end)):
                indices.append(offset + position - start)
                inputs.append((request, request.input_ids[position + 1]))
                rows.append(row)
        offset += n
    asked = [list(r.logprobs.options.token_ids or ()) if r.logprobs is not None else [] for r, _ in batch]
    token_ids = np.full((len(batch), _width(max(map(len, asked)))), -1, np.int32)
    for i, ids in enumerate(asked):
        token_ids[i, : len(ids)] = ids
    num_top = _width(max((r.logprobs.options.top_n for r, _ in batch if r.logprobs is not None), default=0))
    # Input positions padded to a power of two (at least one: index 0 is a valid token of the step).
    width = max(_width(len(indices)), 1)
    padded = np.zeros((3, width), np.int32)
    padded[:, : len(indices)] = [indices, [t for _, t in inputs], rows]
    host = {"token_ids": token_ids, "input_indices": padded[0], "input_targets": padded[1], "input_rows": padded[2]}
    return LogprobPlan(outputs, inputs, num_top, host)


def new_logprob_record(options: LogprobOptions | None, input_ids: list[int], max_new_tokens: int,
                       tokenizer: Tokenizer | None) -> LogprobRecord | None:
    """A request's record when it asked for logprobs; RequestError (400) for a start past its prompt.
    Entry texts decode one token with special tokens kept, as SGLang's detokenize_logprob_tokens does."""
    if options is None:
        return None
    check_start_len(options, len(input_ids), prefill_only=max_new_tokens == 0)
    token_text = None if tokenizer is None else (lambda token_id: tokenizer.decode([token_id], False))
    return LogprobRecord(options, input_ids, prefill_only=max_new_tokens == 0, token_text=token_text)
