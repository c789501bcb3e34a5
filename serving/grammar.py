"""Constrained decoding (`json_schema`, `regex`, `ebnf`) on llguidance: grammars compiled on the host,
one matcher per request, token masks packed as bits for the sampler to apply on device.

Why llguidance and not xgrammar: llguidance's wheel depends on nothing (a Rust extension, abi3, so one
wheel for every Python >= 3.9) and builds its tokenizer from the `tokenizer.json` text we already serve
with the `tokenizers` library; xgrammar requires torch, transformers and triton at run time, and torch is
test-only here. SGLang supports both (`--grammar-backend llguidance`), with the same request keys.

The flow: `GrammarCompiler.matcher(sampling)` compiles the request's grammar (an LRU keyed by
`(kind, text)` holds one compiled matcher per grammar, invalid ones included, so a repeated grammar costs
a copy) and hands the request its own copy. Before each step that samples a token for a constrained
request, `token_bitmask` asks each matcher which tokens may come next (in parallel, on llguidance's
threads) and packs them into `int32[rows, ceil(vocab / 32)]` (bit `t % 32` of word `t // 32` set = token
`t` allowed); the runner applies it to the logits inside the jitted step. After the step, the request
feeds its sampled token to `GrammarMatcher.advance`, which says when the grammar is complete.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par
from tokenizers import Tokenizer as HFTokenizer

from serving.protocol import RequestError, SamplingParams

logger = logging.getLogger(__name__)

# The grammar keys in SGLang's priority order (contract 3.3: json_schema > regex > ebnf).
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")
# Compiled grammars kept (SGLang's grammar cache is unbounded; this bounds the memory a stream of
# distinct schemas can hold).
GRAMMAR_CACHE_SIZE = 256


@dataclass(frozen=True)
class JsonWhitespace:
    """Where a `json_schema` grammar lets the model put whitespace between JSON tokens: SGLang's
    `--constrained-json-whitespace-pattern` (a regex for that whitespace) and
    `--constrained-json-disable-any-whitespace` (compact JSON: none at all). Both are server defaults for
    llguidance's `x-guidance` options, so a schema's own `x-guidance` wins (where a schema names
    `whitespace_flexible` and the server a pattern, llguidance takes the pattern).

    Why it matters: with the default (any run of spaces, tabs and newlines) a weak or random model can spend
    its whole `max_new_tokens` on whitespace inside an object and never close it."""

    pattern: str | None = None
    any_whitespace: bool = True

    def defaults(self) -> dict[str, object]:
        if self.pattern is not None:
            return {"whitespace_pattern": self.pattern}
        return {"whitespace_flexible": self.any_whitespace}


def check_whitespace_pattern(pattern: str) -> None:
    """ValueError naming the problem when `--constrained-json-whitespace-pattern` is no regex llguidance
    takes (checked with the flags, so the server does not start rather than answering every JSON request
    400)."""
    grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                            defaults=JsonWhitespace(pattern).defaults())
    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        # llguidance draws the regex with a caret under the fault; its last line says what the fault is.
        reason = problem.strip().splitlines()[-1].removeprefix("error: ")
        raise ValueError(f"--constrained-json-whitespace-pattern {pattern!r} is not a regex llguidance accepts: "
                         f"{reason}.")


def grammar_key(sampling: SamplingParams) -> tuple[str, str] | None:
    """`(kind, text)` of the request's grammar, or None when it is unconstrained."""
    for kind in GRAMMAR_KINDS:
        text = getattr(sampling, kind)
        if text is not None:
            return kind, text
    return None


class GrammarMatcher:
    """One request's position in its grammar. Advanced on the scheduler thread only; a retracted request
    keeps it (its output tokens are kept too, so the two stay consistent through the re-prefill)."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler):
        self._matcher = matcher
        self.compiler = compiler

    @property
    def ll_matcher(self) -> llguidance.LLMatcher:
        return self._matcher

    def advance(self, token: int) -> bool:
        """Consume a sampled token; True when the grammar is complete (nothing but EOS may follow), which
        ends the request. Raises ValueError if the token breaks the grammar: the mask allows only tokens
        that keep it, so that happens only when nothing it allows could be sampled (`min_new_tokens`
        banning the EOS that is all the grammar allows)."""
        if not self._matcher.consume_token(token):
            raise ValueError(f"token {token} does not continue the grammar: {self._matcher.get_error()}")
        return self._matcher.is_stopped()


class GrammarCompiler:
    """The server's grammar backend: its llguidance tokenizer, the LRU of compiled grammars, and the
    executor that computes a batch's masks in parallel. Thread-safe (the engine compiles off the event
    loop; the scheduler thread builds masks)."""

    def __init__(self, tokenizer_file: Path, vocab_size: int, eos_token_ids: frozenset[int],
                 cache_size: int = GRAMMAR_CACHE_SIZE, json_whitespace: JsonWhitespace = JsonWhitespace()):
        tokenizer = HFTokenizer.from_file(str(tokenizer_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # The masks span the model's vocabulary (the logits' width, often padded past the tokenizer's:
        # llguidance never allows ids it has no bytes for) or the tokenizer's if that is wider (the
        # sampler ignores bits past the logits).
        n_vocab = max(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
        self.tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=n_vocab,
                                                eos_token=sorted(eos_token_ids) or None)
        self.mask_width = -(-n_vocab // 32)
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher | str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.json_whitespace = json_whitespace

    def matcher(self, sampling: SamplingParams) -> GrammarMatcher | None:
        """A fresh matcher for the request's grammar (None when it has none); RequestError (HTTP 400)
        naming the problem when the grammar is invalid."""
        key = grammar_key(sampling)
        if key is None:
            return None
        compiled = self._compiled(key)
        if isinstance(compiled, str):
            raise RequestError(compiled)
        return GrammarMatcher(compiled.deep_copy(), self)

    def _compiled(self, key: tuple[str, str]) -> llguidance.LLMatcher | str:
        """The compiled matcher in its initial state, or the error message of an invalid grammar."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        compiled = self._compile(*key)  # outside the lock: a large schema takes a while
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, kind: str, text: str) -> llguidance.LLMatcher | str:
        if kind == "json_schema":
            try:
                json.loads(text)
            except json.JSONDecodeError as exc:
                return f"Invalid grammar request: json_schema is not valid JSON: {exc}."
        try:
            if kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=self.json_whitespace.defaults())
            else:
                grammar = llguidance.grammar_from(kind, text)
        except ValueError as exc:
            return f"Invalid grammar request: {kind}: {exc}"
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return f"Invalid grammar request: {kind}: {matcher.get_error().strip()}"
        return matcher

    def clear(self) -> None:
        """Drop every compiled grammar (/flush_cache resets the grammar cache, as SGLang's does)."""
        with self._lock:
            self._cache.clear()

def token_bitmask(matchers: list[GrammarMatcher | None]) -> np.ndarray | None:
    """The packed allowed-token mask of a step's rows (`matchers[i]` for row i; None for a row that is
    unconstrained or whose sampled token is dropped, and whose row then allows everything); None when
    no row is constrained, so the step runs without a mask (no transfer, no mask work)."""
    rows = [(m.ll_matcher, i) for i, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    compiler = next(m for m in matchers if m is not None).compiler
    bitmask = np.full((len(matchers), compiler.mask_width), -1, np.int32)
    fill_next_token_bitmask_par(compiler.executor, rows, bitmask)
    return bitmask


class DisabledGrammars:
    """No grammar backend (`--grammar-backend none`, or no tokenizer.json): grammar keys are refused."""

    mask_width = None  # no masked step to compile

    def __init__(self, message: str):
        self.message = message

    def matcher(self, sampling: SamplingParams) -> None:
        if grammar_key(sampling) is not None:
            raise RequestError(self.message)

    def clear(self) -> None:
        """Nothing is cached."""


NO_BACKEND_MESSAGE = ("Grammar-based generation (json_schema, regex, ebnf, structural_tag) is not supported when "
                      "the server is launched with --grammar-backend none")


def make_grammars(backend: str | None, tokenizer_dir: Path, vocab_size: int, eos_token_ids: frozenset[int],
                  json_whitespace: JsonWhitespace = JsonWhitespace()) -> GrammarCompiler | DisabledGrammars:
    """The engine's grammar backend for `--grammar-backend` (None = llguidance; server_args refuses the
    names we do not implement). The grammar needs the tokenizer's bytes per token, which
    `--skip-tokenizer-init` does not stop us from reading. An invalid pattern is checked before (`check_whitespace_pattern`)."""
    if backend == "none":
        return DisabledGrammars(NO_BACKEND_MESSAGE)
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.exists():
        return DisabledGrammars(f"Constrained decoding without a tokenizer.json (in {tokenizer_dir}) is not "
                                "supported yet")
    try:
        return GrammarCompiler(tokenizer_file, vocab_size, eos_token_ids, json_whitespace=json_whitespace)
    except Exception as exc:  # a tokenizer llguidance cannot read must not stop the model from serving
        logger.warning("Constrained decoding is off: llguidance cannot use %s: %s", tokenizer_file, exc)
        return DisabledGrammars(f"Constrained decoding with this model's tokenizer ({exc}) is not supported yet")
