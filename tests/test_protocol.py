"""Request validation and normalization (serving/protocol/) against the contract's exact messages, and the
wire formatting of outputs (finish reasons, /generate objects and stream chunks)."""

from __future__ import annotations

import re

import pytest

from serving.protocol import (
    NOT_SUPPORTED_SUFFIX,
    DetokenizeRequest,
    FinishReason,
    GenerateFormatter,
    GenerateItem,
    Output,
    RequestError,
    SamplingParams,
    SchemaError,
    TokenizeRequest,
    UpdateWeightsRequest,
    merge_preferred,
    parse_abort_request,
    parse_detokenize_request,
    parse_generate_request,
    parse_tokenize_request,
    parse_update_weights_request,
)

VOCAB = 1000
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def generate(body, *, vocab_size=VOCAB, preferred=None, skip_tokenizer_init=False):
    return parse_generate_request(
        body, vocab_size=vocab_size, preferred_sampling_params=preferred, skip_tokenizer_init=skip_tokenizer_init
    )


def generate_error(body, **kwargs) -> str:
    with pytest.raises(RequestError) as info:
        generate(body, **kwargs)
    return str(info.value)


# --- sampling_params ----------------------------------------------------------------------------


def test_sampling_defaults_match_contract():
    p = SamplingParams.from_dict({})
    assert p.max_new_tokens == 128
    assert p.min_new_tokens == 0
    assert p.stop == () and p.stop_token_ids == () and p.stop_regex == ()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.n == 1
    assert p.json_schema is p.regex is p.ebnf is p.structural_tag is None
    assert p.ignore_eos is False and p.no_stop_trim is False
    assert p.skip_special_tokens is True and p.spaces_between_special_tokens is True
    assert p.custom_params is None and p.logit_bias is None
    assert p.stream_interval is None and p.sampling_seed is None
    assert p.greedy is False
    assert p == SamplingParams()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
        ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens], got -1."),
        ({"min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens must be in [0, max_new_tokens(5)], got 10."),
        ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
        ({"temperature": -1}, "temperature must be non-negative, got -1."),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"top_k": -2}, "top_k must be -1 (disable) or at least 1, got -2."),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1."),
        ({"min_p": -0.1}, "min_p must be in [0, 1], got -0.1."),
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
        ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3."),
        ({"repetition_penalty": 2.1}, "repetition_penalty must be in [0, 2], got 2.1."),
        ({"regex": "a", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
        ({"regex": "a", "ebnf": "root ::= 'a'"}, "Only one of regex, json_schema, or ebnf can be set."),
        ({"logit_bias": {"1000": 1.0}}, "logit_bias must has keys in [0, 999], got 1000."),
        ({"logit_bias": {"-1": 1.0}}, "logit_bias must has keys in [0, 999], got -1."),
        ({"stop_regex": "a("}, "stop_regex 'a(' is not a valid regular expression: missing ), unterminated "
                               "subpattern at position 1."),
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"stream_interval": 0}, "stream_interval must be at least 1, got 0."),
        ({"sampling_seed": 2**63}, f"sampling_seed must be a signed 64-bit integer, got {2**63}."),
    ],
)
def test_sampling_range_messages(params, message):
    with pytest.raises(RequestError) as info:
        SamplingParams.from_dict(params, VOCAB)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("params", "feature"),
    [
        ({"structural_tag": "{}"}, "structural_tag"),
        ({"custom_params": {}}, "custom_params"),
    ],
)
def test_sampling_features_not_supported_yet(params, feature):
    with pytest.raises(RequestError) as info:
        SamplingParams.from_dict(params, VOCAB)
    message = str(info.value)
    assert message.endswith(NOT_SUPPORTED_SUFFIX)
    assert feature in message


def test_sampling_neutral_values_accepted():
    p = SamplingParams.from_dict(
        {"frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1, "logit_bias": {},
         "stop_regex": [], "custom_params": None, "json_schema": None, "regex": None, "ebnf": None,
         "structural_tag": None},
        VOCAB,
    )
    assert p.logit_bias is None and p.stop_regex == ()
    assert isinstance(p.repetition_penalty, float) and p.repetition_penalty == 1.0


def test_unknown_sampling_key_lists_known_keys():
    with pytest.raises(RequestError) as info:
        SamplingParams.from_dict({"temprature": 0.5, "zzz": 1})
    message = str(info.value)
    assert message.startswith("Unknown sampling parameter 'temprature'. Known parameters: ")
    known = message.split("Known parameters: ")[1].split(", ")
    assert known == sorted(known)
    assert "temperature" in known and "sampling_seed" in known and len(known) == 25


@pytest.mark.parametrize(
    ("params", "key", "expected"),
    [
        ({"max_new_tokens": 5.0}, "max_new_tokens", "an integer or null"),
        ({"max_new_tokens": True}, "max_new_tokens", "an integer or null"),
        ({"min_new_tokens": None}, "min_new_tokens", "an integer"),
        ({"top_k": "5"}, "top_k", "an integer"),
        ({"n": 2.0}, "n", "an integer"),
        ({"temperature": "0.5"}, "temperature", "a finite number"),
        ({"temperature": None}, "temperature", "a finite number"),
        ({"temperature": True}, "temperature", "a finite number"),
        ({"top_p": float("nan")}, "top_p", "a finite number"),
        ({"ignore_eos": 1}, "ignore_eos", "a boolean"),
        ({"skip_special_tokens": "true"}, "skip_special_tokens", "a boolean"),
        ({"stop": 5}, "stop", "a string, a list of strings, or null"),
        ({"stop": ["a", 1]}, "stop", "a string, a list of strings, or null"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids", "a list of non-negative integers or null"),
        ({"stop_token_ids": [-1]}, "stop_token_ids", "a list of non-negative integers or null"),
        ({"stop_token_ids": 5}, "stop_token_ids", "a list of non-negative integers or null"),
        ({"regex": 5}, "regex", "a string or null"),
        ({"json_schema": {"type": "object"}}, "json_schema", "a string or null"),
        ({"custom_params": []}, "custom_params", "an object or null"),
        ({"logit_bias": [1]}, "logit_bias", "an object mapping token ids to numbers, or null"),
        ({"stream_interval": "1"}, "stream_interval", "an integer or null"),
        ({"sampling_seed": 1.5}, "sampling_seed", "an integer or null"),
    ],
)
def test_sampling_wrong_types_name_key_and_type(params, key, expected):
    with pytest.raises(RequestError) as info:
        SamplingParams.from_dict(params, VOCAB)
    assert str(info.value).startswith(f"Sampling parameter '{key}' must be {expected}, got ")


def test_logit_bias_bad_key_and_value():
    with pytest.raises(RequestError, match="logit_bias keys must be token ids"):
        SamplingParams.from_dict({"logit_bias": {"abc": 1.0}}, VOCAB)
    with pytest.raises(RequestError, match="logit_bias values must be finite numbers"):
        SamplingParams.from_dict({"logit_bias": {"1": "x"}}, VOCAB)


def test_sampling_nulls_and_empty_lists_accepted():
    p = SamplingParams.from_dict(
        {"max_new_tokens": None, "stop": None, "stop_token_ids": None, "stop_regex": None, "stream_interval": None,
         "sampling_seed": None, "logit_bias": None},
        VOCAB,
    )
    assert p.max_new_tokens is None and p.stop == () and p.stop_token_ids == ()


def test_runtime_endpoint_sampling_params_validate():
    # The exact dict SGLang's frontend RuntimeEndpoint.generate sends (contract 10.2).
    params = {
        "skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 64,
        "min_new_tokens": 0, "n": 1, "stop": [], "stop_token_ids": [], "stop_regex": [], "temperature": 0,
        "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "ignore_eos": False, "regex": None, "json_schema": None,
    }
    p = SamplingParams.from_dict(params, VOCAB)
    assert p.greedy and p.max_new_tokens == 64 and p.stop == ()
    out = generate({"text": "Hello", "sampling_params": params, "return_logprob": False,
                    "logprob_start_len": -1, "top_logprobs_num": 0, "return_text_in_logprobs": False})
    assert out.items[0].sampling == p


def test_stop_normalization_and_greedy():
    p = SamplingParams.from_dict({"stop": "END", "stop_token_ids": [2, 3], "temperature": 1e-7})
    assert p.stop == ("END",) and p.stop_token_ids == (2, 3)
    assert p.greedy
    assert SamplingParams.from_dict({"stop": ["a", "", "b"]}).stop == ("a", "b")
    assert not SamplingParams.from_dict({"temperature": 1e-6}).greedy
    assert SamplingParams.from_dict({"temperature": 0}).temperature == 0.0
    assert isinstance(SamplingParams.from_dict({"temperature": 1}).temperature, float)


def test_sampling_to_dict_round_trips():
    p = SamplingParams.from_dict({"stop": "x", "temperature": 0.7, "sampling_seed": 7})
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert p.to_dict()["stop"] == ["x"]


def test_direct_construction_validates():
    with pytest.raises(RequestError, match="temperature must be non-negative"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(RequestError, match="top_k must be -1"):
        SamplingParams(top_k=0)


def test_sampling_seed_accepted():
    assert SamplingParams.from_dict({"sampling_seed": 1234}).sampling_seed == 1234
    assert SamplingParams.from_dict({"sampling_seed": -5}).sampling_seed == -5


def test_merge_preferred_request_wins():
    assert merge_preferred(None, {"a": 1}) == {"a": 1}
    assert merge_preferred({"temperature": 0.2, "top_k": 5}, {"temperature": 0.9}) == {
        "temperature": 0.9, "top_k": 5}


# --- /generate normalization --------------------------------------------------------------------


def test_single_text_defaults():
    out = generate({"text": "What is the capital of France?"})
    assert out.is_batch is False and out.stream is False and out.n == 1
    (item,) = out.items
    assert isinstance(item, GenerateItem)
    index, rid, text, input_ids, sampling, logprobs = item
    assert logprobs is None
    assert index == 0 and HEX32.match(rid) and text == "What is the capital of France?" and input_ids is None
    assert sampling == SamplingParams()


def test_single_input_ids_and_rid_kept():
    out = generate({"input_ids": [1, 2, 3], "rid": "my-req", "stream": True})
    assert out.is_batch is False and out.stream is True
    assert out.items == [GenerateItem(0, "my-req", None, [1, 2, 3], SamplingParams())]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "Either text, input_ids or input_embeds should be provided."),
        ({"text": None, "input_ids": None}, "Either text, input_ids or input_embeds should be provided."),
        ({"text": "a", "input_ids": [1], "input_embeds": [[0.1]]},
         "Either text, input_ids or input_embeds should be provided."),
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [[1], []]}, "input_ids cannot be empty."),
        ({"text": ""}, "texts cannot be empty and tokenizer must be initialized"),
        ({"text": ["a", ""]}, "texts cannot be empty and tokenizer must be initialized"),
        ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]},
         "The parallel_sample_num should be the same for all samples in sample params."),
        ({"text": ["a", "b"], "rid": ["x"]},
         "The specified rids length mismatch with the batch_size for batch processing."),
        ({"text": ["a", "b"], "rid": 5}, "The rid should be a string or a list of strings."),
        ({"text": ["a", "b"], "rid": ["x", 5]}, "The rid should be a string or a list of strings."),
        ({"text": "a", "rid": 5}, "The rid should be a string or a list of strings."),
        ({"text": ["a", "b", "c"], "rid": ["x", "y", "x"]},
         "Duplicate request IDs detected within the request: ['x']"),
        ({"text": "a", "sampling_params": {"n": 2}, "return_logprob": [False]},
         "Cannot use list return_logprob with parallel_sample_num > 1"),
        ({"text": "a", "sampling_params": {"n": 2}, "logprob_start_len": [0]},
         "Cannot use list logprob_start_len with parallel_sample_num > 1"),
        ({"text": "a", "sampling_params": {"n": 2}, "top_logprobs_num": [0]},
         "Cannot use list top_logprobs_num with parallel_sample_num > 1"),
        ({"text": "a", "sampling_params": {"n": 2}, "token_ids_logprob": [[1]]},
         "Cannot use list token_ids_logprob with parallel_sample_num > 1"),
        ({"text": "a", "sampling_params": {"n": 2}, "custom_logit_processor": ["x"]},
         "Cannot use list custom_logit_processor with parallel_sample_num > 1"),
        ({"text": "a", "return_hidden_states": True},
         "The server is not configured to return the hidden states. Please set "
         "`--enable-return-hidden-states` to enable this feature."),
        ({"text": ["a", "b"], "return_hidden_states": [False, True]},
         "The server is not configured to return the hidden states. Please set "
         "`--enable-return-hidden-states` to enable this feature."),
        ({"text": "a", "custom_logit_processor": "serialized"},
         "The server is not configured to enable custom logit processor. Please set "
         "`--enable-custom-logit-processor` to enable this feature."),
        ({"input_ids": [1, 1000]}, "Token id 1000 in input_ids is out of vocabulary (vocab size 1000)."),
        ({"input_ids": [[1], [2, -1]]}, "Token id -1 in input_ids is out of vocabulary (vocab size 1000)."),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "The length of sampling_params should be equal to the batch size."),
        ({"text": "a", "sampling_params": {"n": 0}}, "n must be at least 1, got 0."),
        ({"text": []}, "text cannot be an empty list."),
        ({"text": ["a", "b"], "input_ids": [1, 2]},
         "text and input_ids were both given but describe different batch sizes."),
    ],
)
def test_generate_messages(body, message):
    assert generate_error(body) == message


def test_skip_tokenizer_init_rejects_text_but_not_ids():
    message = generate_error({"text": "hello"}, skip_tokenizer_init=True)
    assert message == (
        "The engine initialized with skip_tokenizer_init=True cannot accept text prompts. Please provide "
        "input_ids or re-initialize the engine with skip_tokenizer_init=False."
    )
    assert generate({"input_ids": [1, 2]}, skip_tokenizer_init=True).items[0].input_ids == [1, 2]


@pytest.mark.parametrize(
    ("body", "feature"),
    [
        ({"input_embeds": [[0.1, 0.2]]}, "input_embeds"),
        ({"text": "a", "image_data": "http://x/y.png"}, "image_data"),
        ({"text": "a", "video_data": ["v.mp4"]}, "video_data"),
        ({"text": "a", "audio_data": "a.wav"}, "audio_data"),
        ({"text": "a", "lora_path": "adapter"}, "lora_path"),
        ({"text": ["a", "b"], "lora_path": [None, "adapter"]}, "lora_path"),
        ({"text": "a", "session_params": {"id": "s"}}, "session_params"),
    ],
)
def test_generate_features_not_supported_yet(body, feature):
    message = generate_error(body)
    assert message.startswith(feature) and message.endswith(NOT_SUPPORTED_SUFFIX)


def test_top_logprobs_num_without_return_logprob_is_ignored():
    # SGLang reads top_logprobs_num only with return_logprob; a client that always sends it must work.
    assert len(generate({"text": "a", "return_logprob": False, "top_logprobs_num": 5}).items) == 1
    assert len(generate({"text": ["a", "b"], "top_logprobs_num": [3, 0]}).items) == 2


def test_neutral_top_level_values_accepted():
    out = generate({
        "text": "a", "return_logprob": False, "logprob_start_len": -1, "top_logprobs_num": 0,
        "token_ids_logprob": [], "return_hidden_states": False, "custom_logit_processor": None,
        "lora_path": None, "session_params": None, "image_data": None, "video_data": [], "audio_data": None,
        "return_text_in_logprobs": True, "log_metrics": True, "priority": None, "stream": None,
    })
    assert len(out.items) == 1 and out.stream is False


@pytest.mark.parametrize(
    "body",
    [
        [1, 2],
        "text",
        None,
        {"text": 5},
        {"text": ["a", 1]},
        {"input_ids": "1 2"},
        {"input_ids": [1, "2"]},
        {"input_ids": [1, [2]]},
        {"input_ids": [[1], [True]]},
        {"text": "a", "sampling_params": "temperature=0"},
        {"text": "a", "sampling_params": [{}, 3]},
        {"text": "a", "stream": "yes"},
        {"text": "a", "return_logprob": "false"},
        {"text": "a", "top_logprobs_num": 1.5},
    ],
)
def test_generate_schema_errors(body):
    with pytest.raises(SchemaError):
        generate(body)


def test_non_object_body_message():
    assert generate_error([{"text": "a"}]) == "Request body must be a JSON object."


def test_unknown_top_level_keys_ignored():
    out = generate({"text": "a", "model": "whatever", "made_up": {"x": 1}})
    assert len(out.items) == 1


def test_batch_text_and_string_rid():
    out = generate({"text": ["a", "b", "c"], "rid": "job", "sampling_params": {"temperature": 0}})
    assert out.is_batch is True
    assert [(i.index, i.rid, i.text) for i in out.items] == [(0, "job_0", "a"), (1, "job_1", "b"), (2, "job_2", "c")]
    assert all(i.sampling.greedy for i in out.items)


def test_batch_rid_list_and_per_item_sampling():
    out = generate({
        "input_ids": [[1, 2], [3]], "rid": ["r1", "r2"],
        "sampling_params": [{"max_new_tokens": 4}, {"max_new_tokens": 8, "temperature": 0.5}],
    })
    assert [i.rid for i in out.items] == ["r1", "r2"]
    assert [i.input_ids for i in out.items] == [[1, 2], [3]]
    assert [i.sampling.max_new_tokens for i in out.items] == [4, 8]
    assert out.items[1].sampling.temperature == 0.5


def test_batch_default_rids_are_fresh_uuids():
    out = generate({"text": ["a", "b"]})
    rids = [i.rid for i in out.items]
    assert all(HEX32.match(r) for r in rids) and len(set(rids)) == 2


def test_n_expansion_single_prompt_becomes_list():
    out = generate({"text": "a", "rid": "keep-me", "sampling_params": {"n": 3, "temperature": 0.8}})
    assert out.is_batch is True and out.n == 3
    assert [i.index for i in out.items] == [0, 1, 2]
    rids = [i.rid for i in out.items]
    assert "keep-me" not in rids and all(HEX32.match(r) for r in rids) and len(set(rids)) == 3
    assert all(i.sampling.n == 3 and i.text == "a" for i in out.items)


def test_n_expansion_is_prompt_major():
    out = generate({"text": ["p0", "p1"], "sampling_params": [{"n": 2, "max_new_tokens": 1},
                                                              {"n": 2, "max_new_tokens": 2}]})
    assert [(i.index, i.text, i.sampling.max_new_tokens) for i in out.items] == [
        (0, "p0", 1), (1, "p0", 1), (2, "p1", 2), (3, "p1", 2)]
    assert len({i.rid for i in out.items}) == 4


def test_n_expansion_still_validates_rids():
    message = generate_error({"text": ["a", "b"], "rid": ["x"], "sampling_params": {"n": 2}})
    assert message == "The specified rids length mismatch with the batch_size for batch processing."


def test_scalar_logprob_params_broadcast_with_n():
    out = generate({"text": "a", "sampling_params": {"n": 2}, "return_logprob": False, "top_logprobs_num": 0})
    assert len(out.items) == 2


def test_preferred_sampling_params_merged_under_request():
    out = generate({"text": "a", "sampling_params": {"temperature": 0.3}},
                   preferred={"temperature": 0.9, "max_new_tokens": 7, "n": 4})
    (item,) = out.items
    assert item.sampling.temperature == 0.3 and item.sampling.max_new_tokens == 7
    # n comes from the request only, as in SGLang.
    assert out.n == 1 and item.sampling.n == 1


def test_preferred_unknown_key_rejected_per_request():
    with pytest.raises(RequestError, match="Unknown sampling parameter 'bogus'"):
        generate({"text": "a"}, preferred={"bogus": 1})


def test_oov_check_skipped_without_vocab_size():
    assert generate({"input_ids": [10**6]}, vocab_size=None).items[0].input_ids == [10**6]


def test_text_and_input_ids_both_given():
    out = generate({"text": ["a", "b"], "input_ids": [[1], [2]]})
    assert [(i.text, i.input_ids) for i in out.items] == [("a", [1]), ("b", [2])]
    # input_ids win, so an empty text is fine alongside them (SGLang's quirk).
    assert generate({"text": "", "input_ids": [5]}).items[0].input_ids == [5]


def test_sampling_error_in_one_batch_item():
    message = generate_error({"text": ["a", "b"], "sampling_params": [{}, {"top_p": 0}]})
    assert message == "top_p must be in (0, 1], got 0."


def test_shared_sampling_object_for_broadcast_dict():
    out = generate({"text": ["a", "b"], "sampling_params": {"temperature": 0.5}})
    assert out.items[0].sampling is out.items[1].sampling


# --- simpler bodies -----------------------------------------------------------------------------


def test_abort_request():
    assert parse_abort_request({"rid": "abc"}) == ("abc", False)
    assert parse_abort_request({"abort_all": True}) == ("", True)
    assert parse_abort_request({}) == ("", False)
    assert parse_abort_request(None) == ("", False)
    with pytest.raises(SchemaError, match="Field 'rid' must be a string"):
        parse_abort_request({"rid": 5})
    with pytest.raises(SchemaError, match="Field 'abort_all' must be a boolean"):
        parse_abort_request({"abort_all": "yes"})
    with pytest.raises(SchemaError, match="Request body must be a JSON object."):
        parse_abort_request([1])


def test_update_weights_request():
    req = parse_update_weights_request({"model_path": "qwen/qwen2.5-0.5b-instruct"})
    assert req == UpdateWeightsRequest(model_path="qwen/qwen2.5-0.5b-instruct")
    assert req.load_format is None and req.flush_cache is True and req.abort_all_requests is False
    assert req.token_step == 0 and req.weight_version is None
    req = parse_update_weights_request({"model_path": "/m", "weight_version": "v2", "abort_all_requests": True,
                                        "load_format": None, "flush_cache": False, "ignored": 1})
    assert (req.weight_version, req.abort_all_requests, req.flush_cache) == ("v2", True, False)
    with pytest.raises(SchemaError, match="Field 'model_path' is required."):
        parse_update_weights_request({})
    with pytest.raises(SchemaError, match="Field 'model_path' must be a string"):
        parse_update_weights_request({"model_path": None})
    with pytest.raises(SchemaError, match="Field 'token_step' must be an integer"):
        parse_update_weights_request({"model_path": "/m", "token_step": "1"})
    with pytest.raises(RequestError, match="model_path cannot be empty."):
        parse_update_weights_request({"model_path": ""})
    with pytest.raises(SchemaError):
        parse_update_weights_request(None)


def test_tokenize_request():
    req = parse_tokenize_request({"prompt": "hello"})
    assert req == TokenizeRequest(prompt="hello") and not req.is_batch
    assert req.model == "default" and req.add_special_tokens is True
    req = parse_tokenize_request({"model": "m", "prompt": ["a", ""], "add_special_tokens": False})
    assert req.is_batch and req.prompt == ["a", ""] and req.add_special_tokens is False
    for body in ({}, {"prompt": 5}, {"prompt": [1, 2]}, {"prompt": "a", "add_special_tokens": 1}, "x"):
        with pytest.raises(SchemaError):
            parse_tokenize_request(body)


def test_detokenize_request():
    req = parse_detokenize_request({"tokens": [1, 2]})
    assert req == DetokenizeRequest(tokens=[1, 2]) and not req.is_batch and req.skip_special_tokens is True
    assert parse_detokenize_request({"tokens": []}).tokens == []
    req = parse_detokenize_request({"tokens": [[1], []], "skip_special_tokens": False})
    assert req.is_batch and req.tokens == [[1], []]
    for body in ({}, {"tokens": ["a"]}, {"tokens": [1.5]}, {"tokens": [[1], 2]}, {"tokens": 3}):
        with pytest.raises(SchemaError):
            parse_detokenize_request(body)
    with pytest.raises(RequestError, match=r"Token id -1 in tokens is out of vocabulary\."):
        parse_detokenize_request({"tokens": [-1]})
    with pytest.raises(RequestError, match=r"Token id 50 in tokens is out of vocabulary \(vocab size 50\)\."):
        parse_detokenize_request({"tokens": [[1], [50]]}, vocab_size=50)


# --- finish_reason ------------------------------------------------------------------------------


def test_finish_reason_shapes():
    assert FinishReason.stop_token(151643).to_dict() == {"type": "stop", "matched": 151643}
    assert FinishReason.stop_string("\n\n").to_dict() == {"type": "stop", "matched": "\n\n"}
    assert FinishReason.max_length(0).to_dict() == {"type": "length", "length": 0}
    assert FinishReason.abort("Aborted").to_dict() == {
        "type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
    assert FinishReason.abort("The request queue is full.", 503, "ServiceUnavailable").to_dict() == {
        "type": "abort", "message": "The request queue is full.", "status_code": 503, "err_type": "ServiceUnavailable"}
    assert FinishReason.abort_waiting().to_dict() == {"type": "abort", "message": "Abort in waiting queue"}


def output(index, ids, reason=None, text="t"):
    return Output(rid=f"r{index}", index=index, text=text, output_ids=list(ids), finish_reason=reason,
                  prompt_tokens=3, completion_tokens=len(ids), cached_tokens=0, retractions=0)


def test_formatter_stream_chunks():
    fmt = GenerateFormatter(weight_version="v1", with_text=True, stream=True, is_batch=True)
    first, last = fmt.chunk(output(1, [5])), fmt.chunk(output(1, [5, 6], FinishReason.max_length(2)))
    assert first["index"] == 1 and first["output_ids"] == [5] and first["text"] == "t"
    assert first["meta_info"]["finish_reason"] is None and "e2e_latency" not in first["meta_info"]
    assert "response_sent_to_client_ts" in first["meta_info"]
    assert "response_sent_to_client_ts" not in last["meta_info"] and "e2e_latency" in last["meta_info"]
    assert last["output_ids"] == [5, 6] and last["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
    assert last["meta_info"]["weight_version"] == "v1" and last["meta_info"]["completion_tokens"] == 2


def test_formatter_stream_output_sends_new_ids_per_item():
    fmt = GenerateFormatter(weight_version="default", with_text=False, stream=True, stream_output=True)
    chunks = [fmt.chunk(output(0, [5])), fmt.chunk(output(1, [7, 8])), fmt.chunk(output(0, [5, 6, 9]))]
    assert [c["output_ids"] for c in chunks] == [[5], [7, 8], [6, 9]]
    assert all("text" not in c and "index" not in c for c in chunks)


def test_formatter_non_stream_response_and_http_error():
    fmt = GenerateFormatter(weight_version="default", with_text=True, is_batch=True, stream_output=True)
    fmt.collect(output(1, [3, 4], FinishReason.stop_token(4)))
    fmt.collect(output(0, [1], None))  # not finished: not part of the response
    fmt.collect(output(0, [1, 2], FinishReason.abort("Aborted")))
    body = fmt.response()
    assert [item["meta_info"]["id"] for item in body] == ["r0", "r1"]
    assert body[0]["output_ids"] == [1, 2] and "e2e_latency" in body[0]["meta_info"]  # whole ids
    assert fmt.http_error() is None  # a user abort is a 200 with the partial output
    fmt.collect(output(2, [], FinishReason.abort("The KV cache cannot hold this request.", 400, "BadRequest")))
    assert fmt.http_error().status_code == 400
