"""Constrained decoding (json_schema, regex, ebnf) through the real server, on a tiny random checkpoint.

The model's outputs are random, so what is checked is what the grammar promises: every output parses
and validates (`jsonschema`, `re.fullmatch`, an independent regex for the EBNF's finite language), the
request ends when its grammar is complete, and greedy constrained tokens are transformers' argmax over the
tokens the grammar allows (teacher-forced, near-ties tolerated). The server's KV cache is small enough
that the batches of 20 retract requests mid-generation; a retracted request keeps its matcher.
"""

from __future__ import annotations

import json
import random
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from serving.grammar import DisabledGrammars, GrammarCompiler, JsonWhitespace, make_grammars, token_bitmask
from serving.protocol import RequestError, SamplingParams
from serving.sampler import SamplingBatch, apply_token_bitmask, sample
from serving.server_args import ServerArgs
from tests.conftest import ServerProcess, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import TIE_TOLERANCE, assert_greedy

VOCAB = 384
EOS = 0  # make_tiny_checkpoint's eos_token_id
MAX_NEW = 500  # room for the longest JSON the random schemas allow
# The server runs with --constrained-json-disable-any-whitespace: with llguidance's default (any run of
# whitespace between JSON tokens) a random model can spend 500 tokens inside `{` and never close it.
COMPACT = JsonWhitespace(any_whitespace=False)
REGEX = r"[a-z]{2,5}-[0-9]{3}"
EBNF = """root ::= expr
expr ::= term | term op term | term op term op term
term ::= num | "(" num op num ")"
num ::= [0-9] | [1-9] [0-9]
op ::= "+" | "-" | "*"
"""
# The EBNF's language, written independently as a Python regex.
_NUM = r"(?:[0-9]|[1-9][0-9])"
_TERM = rf"(?:{_NUM}|\({_NUM}[-+*]{_NUM}\))"
EBNF_LANGUAGE = re.compile(rf"{_TERM}(?:[-+*]{_TERM}){{0,2}}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A 1024-token context: room for a prompt of 40 tokens and a long JSON answer.
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-grammar"), "llama", max_position_embeddings=1024)


@pytest.fixture(scope="module")
def server(model_dir):
    # 160 pages of 4 tokens for up to 16 running requests of 40-token prompts and growing answers: retraction.
    proc = ServerProcess(model_dir, "--page-size", "4", "--max-total-tokens", "640",
                         "--max-running-requests", "16", "--chunked-prefill-size", "64",
                         "--constrained-json-disable-any-whitespace")
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def compiler(model_dir):
    """The server's grammars (compact JSON), for checking its tokens."""
    return GrammarCompiler(model_dir / "tokenizer.json", VOCAB, frozenset([EOS]), json_whitespace=COMPACT)


def random_schema(rng: random.Random) -> dict:
    """An object schema with 1-4 properties of the kinds the brief names, some of them required."""
    properties = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(["string", "integer", "boolean", "enum", "array"])
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 8)}
        elif kind == "integer":
            prop = {"type": "integer", "minimum": rng.randint(-50, 0), "maximum": rng.randint(1, 1000)}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["red", "green", "blue", "cat", "dog", "x y"], rng.randint(1, 3))}
        else:
            prop = {"type": "array", "items": {"type": rng.choice(["integer", "boolean"])},
                    "maxItems": rng.randint(0, 3)}
        properties[f"p{i}_{kind}"] = prop
    # At least one required: compact answers are then at least ~10 tokens, long enough that the batch's
    # growth outruns the small KV cache and requests are retracted.
    required = rng.sample(sorted(properties), rng.randint(1, len(properties)))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def generate(server, body: dict) -> list[dict] | dict:
    r = server.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def ends_by_grammar_or_eos(out: dict) -> None:
    """A constrained request that completed: stopped by its grammar (matched = its last token) or by EOS,
    which the grammar allowed."""
    ids = out["output_ids"]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[-1]}, out["meta_info"]


def allowed_tokens(bitmask_row: np.ndarray) -> np.ndarray:
    return np.unpackbits(bitmask_row.view(np.uint8), bitorder="little").astype(bool)[:VOCAB]


def assert_constrained_greedy(hf, compiler, sampling: SamplingParams, prompt: list[int], ours: list[int]) -> None:
    """Each of our tokens is transformers' argmax over the tokens a fresh matcher allows there (up to
    near-ties, as tests/hf_reference.py explains)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours])).logits[0].double().numpy()
    matcher = compiler.matcher(sampling)
    for i, token in enumerate(ours):
        row = np.where(allowed_tokens(token_bitmask([matcher])[0]), logits[len(prompt) - 1 + i], -np.inf)
        best = int(row.argmax())
        gap = row[best] - row[token]
        assert token == best or gap <= TIE_TOLERANCE * max(1.0, float(np.abs(row[np.isfinite(row)]).max())), (
            f"token {i} is {token}, the masked argmax is {best}; ours {ours[:i + 1]}")
        matcher.advance(token)


def assert_compact(text: str) -> None:
    """No whitespace in the JSON text outside its strings (what --constrained-json-disable-any-whitespace
    promises)."""
    in_string = escaped = False
    for i, char in enumerate(text):
        if in_string:
            in_string = escaped or char != '"'
            escaped = not escaped and char == "\\"
        elif char == '"':
            in_string = True
        else:
            assert not char.isspace(), f"whitespace at {i} outside a string: {text!r}"


def grammar_accepts(compiler: GrammarCompiler, tokenizer, schema: dict, text: str) -> bool:
    """Whether the compiler's json_schema grammar takes `text` whole (fed as the tokenizer's tokens)."""
    matcher = compiler.matcher(SamplingParams(json_schema=json.dumps(schema))).ll_matcher
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return all(matcher.consume_token(t) for t in ids) and matcher.is_accepting()


# -- the mask on device ------------------------------------------------------------------------------
def test_token_bitmask_on_device_matches_numpy():
    rng = np.random.default_rng(replayable_seed("GRAMMAR_MASK_SEED"))
    rows, vocab = 5, 389  # not a multiple of 32; the mask has a spare word past the logits
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, size=(rows, -(-vocab // 32) + 1), dtype=np.int64).astype(np.int32)
    bitmask[0] = -1  # an unconstrained row
    bitmask[1] = 0
    bitmask[1, 3] = -(2**31)  # one allowed token, through the sign bit: 3 * 32 + 31
    allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    masked = np.asarray(jax.jit(apply_token_bitmask)(jnp.asarray(logits), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(masked, np.where(allowed, logits, -np.inf))
    assert allowed[0].all() and np.flatnonzero(allowed[1]).tolist() == [127]

    arrays = SamplingBatch.host_arrays(rows)
    greedy = np.asarray(jax.jit(sample)(jnp.asarray(logits), SamplingBatch(**arrays), jnp.asarray(bitmask)))
    np.testing.assert_array_equal(greedy, np.where(allowed, logits, -np.inf).argmax(axis=1))
    arrays.update(temperature=np.ones(rows, np.float32), seeds=np.arange(rows, dtype=np.uint32))
    for step in range(20):
        arrays["steps"][:] = step
        drawn = np.asarray(jax.jit(sample)(jnp.asarray(logits), SamplingBatch(**arrays), jnp.asarray(bitmask)))
        assert allowed[np.arange(rows), drawn].all()


# -- compilation, the cache, the flag ------------------------------------------------------------------
def test_compiled_grammars_are_cached_by_kind_and_text(model_dir):
    compiler = GrammarCompiler(model_dir / "tokenizer.json", VOCAB, frozenset([EOS]), cache_size=2)
    first, again = SamplingParams(regex="a+"), SamplingParams(regex="a+")
    compiler.matcher(first)
    compiled = compiler._cache[("regex", "a+")]
    assert compiler.matcher(again).ll_matcher is not compiled  # each request gets its own copy
    assert compiler._cache[("regex", "a+")] is compiled
    with pytest.raises(RequestError, match="Invalid grammar request: regex"):
        compiler.matcher(SamplingParams(regex="(a"))
    assert isinstance(compiler._cache[("regex", "(a")], str)  # invalid grammars are cached too
    compiler.matcher(SamplingParams(ebnf='root ::= "b"'))
    assert list(compiler._cache) == [("regex", "(a"), ("ebnf", 'root ::= "b"')]  # least recent evicted
    compiler.clear()
    assert not compiler._cache
    assert compiler.matcher(SamplingParams()) is None


def test_grammar_backend_flag(model_dir):
    assert ServerArgs().grammar_backend is None
    assert ServerArgs(grammar_backend="llguidance").grammar_backend == "llguidance"
    for name in ("xgrammar", "outlines"):
        with pytest.raises(ValueError, match=f"^--grammar-backend {name} is not supported yet"):
            ServerArgs(grammar_backend=name)
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--grammar-backend", "lmformat"])
    disabled = make_grammars("none", model_dir, VOCAB, frozenset([EOS]))
    assert isinstance(disabled, DisabledGrammars) and disabled.matcher(SamplingParams()) is None
    with pytest.raises(RequestError, match="not supported when the server is launched with --grammar-backend none"):
        disabled.matcher(SamplingParams(json_schema="{}"))


def test_json_whitespace_options(model_dir):
    """llguidance's default lets any whitespace run between JSON tokens; the flags narrow it, and a schema's
    own x-guidance options win over them."""
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    loose = dict(schema, **{"x-guidance": {"whitespace_pattern": "[\\n\\t ]*"}})
    texts = ['{"n":1}', '{ "n": 1 }', '{\n  "n" :\t1}', '{  "n":1}']
    for whitespace, accepted in [(JsonWhitespace(), [True, True, True, True]),
                                 (COMPACT, [True, False, False, False]),
                                 (JsonWhitespace(pattern="[ ]?"), [True, True, False, False])]:
        compiler = GrammarCompiler(model_dir / "tokenizer.json", VOCAB, frozenset([EOS]), json_whitespace=whitespace)
        assert [grammar_accepts(compiler, tokenizer, schema, t) for t in texts] == accepted, whitespace
        assert grammar_accepts(compiler, tokenizer, loose, '{\n  "n" :\t1}')


def test_json_whitespace_flags():
    args = ServerArgs.from_cli(["--constrained-json-whitespace-pattern", "[\\n ]*"])
    assert args.constrained_json_whitespace_pattern == "[\\n ]*" and not args.constrained_json_disable_any_whitespace
    assert ServerArgs.from_cli(["--constrained-json-disable-any-whitespace"]).constrained_json_disable_any_whitespace
    with pytest.raises(ValueError, match=r"^--constrained-json-whitespace-pattern '\[ ' is not a regex llguidance "
                                         r"accepts: unclosed character class\.$"):
        ServerArgs(constrained_json_whitespace_pattern="[ ")
    with pytest.raises(ValueError, match="contradict each other"):
        ServerArgs(constrained_json_whitespace_pattern=" ?", constrained_json_disable_any_whitespace=True)


# -- through the server --------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_json_schemas_validate(server, hf, compiler, temperature):
    seed = replayable_seed("GRAMMAR_SCHEMA_SEED")
    rng = random.Random(seed)
    schemas = [random_schema(rng) for _ in range(20)]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(40)] for _ in schemas]
    params = [{"json_schema": json.dumps(s), "max_new_tokens": MAX_NEW, "temperature": temperature,
               "sampling_seed": seed + i} for i, s in enumerate(schemas)]
    outs = generate(server, {"input_ids": prompts, "sampling_params": params})
    for schema, prompt, param, out in zip(schemas, prompts, params, outs, strict=True):
        # Compact JSON and bounded strings, numbers and arrays: every answer fits in MAX_NEW tokens.
        jsonschema.validate(json.loads(out["text"]), schema)
        assert_compact(out["text"])
        ends_by_grammar_or_eos(out)
        if temperature == 0.0:
            assert_constrained_greedy(hf, compiler, SamplingParams(json_schema=param["json_schema"]), prompt,
                                      out["output_ids"])
    assert sum(out["meta_info"]["total_retractions"] for out in outs) > 0, "the cache never ran out"


def test_regex_with_n_samples(server):
    outs = generate(server, {"text": "Code:", "sampling_params": {
        "regex": REGEX, "n": 3, "temperature": 1.0, "max_new_tokens": 50}})
    assert len(outs) == 3
    for out in outs:
        assert re.fullmatch(REGEX, out["text"]), out["text"]
        ends_by_grammar_or_eos(out)  # a matcher shared between the samples would have broken the others


def test_ebnf_arithmetic(server):
    seed = replayable_seed("GRAMMAR_EBNF_SEED")
    outs = generate(server, {"text": ["1+1=", "Compute:", "x"], "sampling_params": [
        {"ebnf": EBNF, "temperature": t, "max_new_tokens": 60, "sampling_seed": seed} for t in (0.0, 1.0, 1.0)]})
    for out in outs:
        assert EBNF_LANGUAGE.fullmatch(out["text"]), out["text"]
        ends_by_grammar_or_eos(out)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"json_schema": "{not json"}, "Invalid grammar request: json_schema is not valid JSON"),
        ({"json_schema": '{"type": "frobnicate"}'}, "Invalid grammar request: json_schema: Invalid type"),
        ({"regex": "(ab"}, "Invalid grammar request: regex"),
        ({"ebnf": "root ::= missing_rule"}, "Invalid grammar request: ebnf"),
        ({"regex": "a", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
        ({"structural_tag": "{}"}, "is not supported yet"),
    ],
)
def test_invalid_grammar_is_400_and_the_server_keeps_serving(server, params, message):
    r = server.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 4, **params}})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert generate(server, {"text": "Hi", "sampling_params": {"regex": "ok", "max_new_tokens": 4}})["text"] == "ok"


def test_batch_mixing_constrained_and_free(server, hf):
    rng = np.random.default_rng(replayable_seed("GRAMMAR_MIXED_SEED"))
    prompts = [rng.integers(3, VOCAB, size=12).tolist() for _ in range(4)]
    free = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    outs = generate(server, {"input_ids": prompts, "sampling_params": [
        {"regex": REGEX, "temperature": 1.0, "max_new_tokens": 50}, free,
        {"json_schema": json.dumps(schema), "temperature": 0, "max_new_tokens": MAX_NEW}, free]})
    assert re.fullmatch(REGEX, outs[0]["text"])
    jsonschema.validate(json.loads(outs[2]["text"]), schema)
    ends_by_grammar_or_eos(outs[2])
    for i in (1, 3):  # the free rows' all-ones mask rows change nothing
        assert_greedy(hf, prompts[i], outs[i]["output_ids"], 16, label=f"free row {i}")


def test_streaming_and_prefix_cache(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    prompt = "Once upon a time there was a small model that answered questions about the world."
    params = {"json_schema": json.dumps(schema), "temperature": 0, "max_new_tokens": MAX_NEW}
    r = server.post("/generate", json={"text": prompt, "sampling_params": params, "stream": True}, stream=True)
    assert r.status_code == 200
    chunks = [json.loads(line[len(b"data: "):]) for line in r.iter_lines()
              if line.startswith(b"data: ") and line != b"data: [DONE]"]
    assert len(chunks) > 1 and all(b["text"].startswith(a["text"]) for a, b in zip(chunks, chunks[1:], strict=False))
    streamed = chunks[-1]
    jsonschema.validate(json.loads(streamed["text"]), schema)
    assert_compact(streamed["text"])
    ends_by_grammar_or_eos(streamed)
    again = generate(server, {"text": prompt, "sampling_params": params})  # its prompt is in the radix cache
    assert again["meta_info"]["cached_tokens"] > 0
    jsonschema.validate(json.loads(again["text"]), schema)
    pages = server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert pages["locked"] == 0 and pages["invariant_errors"] == 0
