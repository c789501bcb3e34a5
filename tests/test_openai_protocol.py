"""The OpenAI routes' jax-free parts: body parsing into /generate bodies, response formatting from
/generate items, and chat templates rendered exactly as transformers renders them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from serving.chat_template import ChatTemplateError, select_template
from serving.protocol import RequestError, SchemaError, parse_generate_request
from serving.protocol.openai_requests import (
    model_sampling_defaults,
    parse_chat_request,
    parse_completion_request,
)
from serving.protocol.openai_responses import OpenAIFormatter
from serving.tokenizer import Tokenizer
from tests.conftest import replayable_seed, write_tokenizer

# SmolLM2-Instruct's template (the bundled default model): loop.first, a default system prompt.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2-style: bos_token, raise_exception on alternation, strip, tojson, the generation tag, loop controls.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{% generation %}{{ ' ' + message['content'] | trim + eos_token }}{% endgeneration %}{% endif %}"
    "{% if loop.index > 50 %}{% break %}{% endif %}{% endfor %}"
    "{% if meta is defined %}{{ meta | tojson }}{% endif %}{% if unk_token is defined %}UNK{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|im_start|>"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def _random_conversation(rng: np.random.Generator, turns: int) -> list[dict]:
    words = ["Paris", "café", "東京", "hello", "  spaced  ", "emoji 🙂", "a\nb", "\"quoted\""]
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": " ".join(rng.choice(words, size=int(rng.integers(1, 6))))} for i in range(turns)]


@pytest.mark.parametrize("template", [SMOLLM_TEMPLATE, STRICT_TEMPLATE, None], ids=["smollm", "strict", "own"])
def test_chat_template_renders_like_transformers(tokenizer_dir, hf_tokenizer, template):
    rng = np.random.default_rng(replayable_seed("CHAT_TEMPLATE_SEED"))
    ours = Tokenizer(tokenizer_dir)
    if template is not None:
        ours.set_chat_template(template)
    for turns in (1, 2, 3, 5):
        messages = _random_conversation(rng, turns)
        for kwargs in ({}, {"meta": {"k": "é", "n": [1, 2]}}):
            expected = hf_tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                        tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, **kwargs) == expected


def test_chat_template_refusals_are_value_errors(tokenizer_dir):
    ours = Tokenizer(tokenizer_dir)
    ours.set_chat_template(STRICT_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])
    ours.set_chat_template(SMOLLM_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="failed to render"):  # no content: '...' + undefined
        ours.apply_chat_template([{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ours.set_chat_template("{% for m in messages %}")
    assert select_template([{"name": "default", "template": "a"}, {"name": "tool_use", "template": "b"}]) == "a"
    assert select_template([{"name": "tool_use", "template": "b"}], has_tools=True) == "b"


def test_completion_body_becomes_a_generate_body():
    parsed = parse_completion_request({
        "model": "m", "prompt": ["a", "b"], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5,
        "min_p": 0.1, "n": 2, "stop": "x", "stop_token_ids": [3], "seed": 11, "ignore_eos": True,
        "skip_special_tokens": False, "min_tokens": 1, "regex": None, "user": "u",
        "stream": True, "stream_options": {"include_usage": True}})
    assert parsed.generate_body == {"text": ["a", "b"], "stream": True, "sampling_params": {
        "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "n": 2, "stop": "x",
        "stop_token_ids": [3], "sampling_seed": 11, "ignore_eos": True, "skip_special_tokens": False,
        "min_new_tokens": 1}}
    assert (parsed.model, parsed.n, parsed.include_usage, parsed.prompts) == ("m", 2, True, ["a", "b"])
    normalized = parse_generate_request(parsed.generate_body, vocab_size=384, preferred_sampling_params=None)
    assert [item.index for item in normalized.items] == [0, 1, 2, 3]
    assert parse_completion_request({"prompt": [[1, 2], [3]]}).generate_body["input_ids"] == [[1, 2], [3]]
    assert parse_completion_request({"prompt": [1, 2]}).generate_body["sampling_params"]["max_new_tokens"] == 16
    logprobs = parse_completion_request({"prompt": "a", "logprobs": 2, "echo": True}).generate_body
    assert (logprobs["return_logprob"], logprobs["top_logprobs_num"], logprobs["logprob_start_len"]) == (True, 2, 0)


@pytest.mark.parametrize(("body", "error", "message"), [
    ({"prompt": ""}, RequestError, "Prompt cannot be empty"),
    ({"prompt": []}, RequestError, "Prompt cannot be empty"),
    ({"prompt": 5}, SchemaError, "Field 'prompt' must be a string"),
    ({}, SchemaError, "Field 'prompt' is required."),
    ({"prompt": "a", "max_tokens": 0}, RequestError, "max_tokens must be positive"),
    ({"prompt": "a", "max_tokens": "9"}, SchemaError, "Field 'max_tokens' must be an integer or null"),
    ({"prompt": "a", "suffix": "z"}, RequestError, "suffix is not supported yet"),
    ({"prompt": "a", "best_of": 3}, RequestError, "best_of other than n is not supported yet"),
    ({"prompt": "a", "n": 0}, RequestError, "n must be at least 1, got 0."),
    ({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {}}}, RequestError,
     "schema_ is required for json_schema response format request."),
])
def test_completion_refusals(body, error, message):
    with pytest.raises(error) as info:
        parse_completion_request(body)
    assert str(info.value).startswith(message)


def test_chat_body_becomes_a_generate_body():
    parsed = parse_chat_request({
        "messages": [{"role": "system", "content": "s", "name": None},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 9, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "tools": [],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "chat_template_kwargs": {"enable_thinking": False}, "top_p": 0.5},
        chat_template="{{ messages }}", model_defaults={"top_k": 20, "top_p": 0.8})
    assert parsed.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "a b"}]
    assert parsed.generate_body == {"stream": False, "return_logprob": True, "top_logprobs_num": 2,
                                    "logprob_start_len": -1, "return_text_in_logprobs": True, "sampling_params": {
                                        "max_new_tokens": 9, "top_p": 0.5, "top_k": 20, "n": 1,
                                        "json_schema": '{"type": "object"}'}}
    assert parsed.template_kwargs == {"enable_thinking": False}
    list_form = parse_chat_request({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
                                   chat_template="{% for part in message['content'] %}{% endfor %}", model_defaults={})
    assert list_form.messages[0]["content"] == [{"type": "text", "text": "a"}]
    assert list_form.generate_body["sampling_params"]["max_new_tokens"] is None  # as many as the context leaves


@pytest.mark.parametrize(("body", "message"), [
    ({"messages": []}, "Messages cannot be empty."),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "Multimodal input (image_url content parts) is not supported yet"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "Tool calling (tools with tool_choice other than none) is not supported yet"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     "Tools cannot be empty if tool choice is set to required."),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs needs logprobs set to true."),
    ({"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message is not supported yet"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role must be one of"),
])
def test_chat_refusals(body, message):
    with pytest.raises(RequestError) as info:
        parse_chat_request(body, chat_template=None, model_defaults={})
    assert str(info.value).startswith(message)
    # tools with tool_choice "none" are ignored, as SGLang does (the template does not see them either)
    parse_chat_request({"messages": [{"role": "user", "content": "x"}], "tool_choice": "none",
                        "tools": [{"type": "function", "function": {"name": "f"}}]}, chat_template=None, model_defaults={})


def test_model_sampling_defaults():
    config = {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "do_sample": True, "max_new_tokens": 5, "min_p": None}
    assert model_sampling_defaults(config) == {"temperature": 0.6, "top_p": 0.9, "top_k": -1}
    parsed = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "temperature": 0.1},
                                chat_template=None, model_defaults=model_sampling_defaults(config))
    assert parsed.generate_body["sampling_params"] == {"temperature": 0.1, "top_p": 0.9, "top_k": -1, "n": 1,
                                                       "max_new_tokens": None}


def _item(rid, text, ids, reason, prompt_tokens=4, cached=0, logprobs=None, tops=None):
    meta = {"id": rid, "finish_reason": reason, "prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
            "cached_tokens": cached}
    if logprobs is not None:
        meta["output_token_logprobs"] = logprobs
        meta["output_top_logprobs"] = tops
    return {"text": text, "output_ids": ids, "meta_info": meta}


def test_completion_response_and_stream_deltas():
    parsed = parse_completion_request({"prompt": "ab", "n": 2, "logprobs": 1, "echo": True})
    fmt = OpenAIFormatter("completion", parsed, "v1", cache_report=True, echo_texts=["ab"])
    entries = [[-0.5, 7, "x"], [-1.5, 8, "y"]]
    tops = [[[-0.5, 7, "x"]], [[-0.25, 9, "z"]]]
    items = [_item("r0", "xy", [7, 8], {"type": "stop", "matched": 8}, cached=2, logprobs=entries, tops=tops),
             _item("r1", "x", [7], {"type": "length", "length": 1}, logprobs=entries[:1], tops=tops[:1])]
    body = fmt.response(items)
    assert body["id"] == "r0" and body["object"] == "text_completion"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": 2}, "reasoning_tokens": 0}
    first = body["choices"][0]
    assert (first["text"], first["finish_reason"], first["matched_stop"]) == ("abxy", "stop", 8)
    assert first["logprobs"] == {"text_offset": [-1, -1], "token_logprobs": [-0.5, -1.5], "tokens": ["x", "y"],
                                 "top_logprobs": [{"x": -0.5}, {"z": -0.25}]}
    stream = OpenAIFormatter("completion", parsed, "v1", cache_report=False, echo_texts=["ab"])
    partial = _item("r0", "x", [7], None, logprobs=entries[:1], tops=tops[:1])
    chunks = stream.chunks(0, partial) + stream.chunks(0, items[0])
    assert [c["choices"][0]["text"] for c in chunks] == ["abx", "y"]
    assert [c["choices"][0]["logprobs"]["tokens"] for c in chunks] == [["x"], ["y"]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "stop"]


def test_chat_stream_chunks_and_logprobs():
    parsed = parse_chat_request({"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                 "top_logprobs": 1, "stream": True, "stream_options": {"include_usage": True}},
                                chat_template=None, model_defaults={})
    fmt = OpenAIFormatter("chat", parsed, "v1", cache_report=False)
    entries, tops = [[-0.5, 7, "é"]], [[[-0.5, 7, "é"]]]
    chunks = fmt.chunks(0, _item("r", "é", [7], {"type": "stop", "matched": 0}, logprobs=entries, tops=tops))
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {"content": "é"}, {}]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "stop"]
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [{
        "token": "é", "bytes": [195, 169], "logprob": -0.5,
        "top_logprobs": [{"token": "é", "bytes": [195, 169], "logprob": -0.5}]}]}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "r" for c in chunks)
    usage = fmt.usage_chunk([_item("r", "é", [7], {"type": "stop", "matched": 0})])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
