"""The OpenAI-compatible routes through the real server on a tiny random Llama, driven by the official
`openai` client as a user would: completions and chat against /generate and transformers, streaming,
usage, n, stop, the error envelopes, and /tokenize, /detokenize against the Hugging Face tokenizer.

The server runs with `--chat-template` (SmolLM2's template, from a file), `--enable-cache-report`, and a
generation_config.json whose `top_k` is 1, so a chat request that leaves the sampling fields null
decodes greedily under `--sampling-defaults model` (the default).
"""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
import requests
import torch
import transformers

from tests.conftest import CORPUS, ServerProcess, make_tiny_checkpoint, replayable_seed
from tests.hf_reference import assert_greedy
from tests.test_openai_protocol import SMOLLM_TEMPLATE

FLAGS = ("--page-size", "4", "--max-total-tokens", "4096", "--max-running-requests", "8",
         "--chunked-prefill-size", "32", "--random-seed", "0", "--enable-cache-report")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("openai-llama"), "llama")
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**config, "top_k": 1}))
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(SMOLLM_TEMPLATE)
    proc = ServerProcess(checkpoint, *FLAGS, "--chat-template", str(template))
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return transformers.AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(replayable_seed("OPENAI_TEST_SEED"))


def random_text(rng, words=6) -> str:
    vocab = " ".join(CORPUS).split()
    return " ".join(rng.choice(vocab, size=words))


def generate(server, **body) -> dict:
    response = server.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_list(client, server, checkpoint):
    assert [m.id for m in client.models.list().data] == [str(checkpoint)]


def test_completion_greedy_equals_generate_and_transformers(client, server, hf_model, rng):
    for prompt in (random_text(rng), rng.integers(3, 384, size=9).tolist()):
        completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        key = "text" if isinstance(prompt, str) else "input_ids"
        reference = generate(server, **{key: prompt}, sampling_params={"max_new_tokens": 8, "temperature": 0})
        choice = completion.choices[0]
        assert choice.text == reference["text"]
        assert choice.finish_reason == reference["meta_info"]["finish_reason"]["type"]
        assert completion.model == "tiny" and completion.object == "text_completion"
        usage = completion.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            reference["meta_info"]["prompt_tokens"], len(reference["output_ids"]))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        prompt_ids = prompt if key == "input_ids" else server.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
        assert_greedy(hf_model, prompt_ids, reference["output_ids"], label="completion")


def test_completion_batch_n_seed_and_echo(client, server, rng):
    prompts = [random_text(rng), random_text(rng, 3)]
    params = {"max_tokens": 6, "temperature": 0.8, "seed": int(rng.integers(0, 2**31)), "n": 2}
    completion = client.completions.create(model="tiny", prompt=prompts, echo=True, **params)
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for choice in completion.choices:  # prompt-major; the same seed gives each sample the same tokens
        prompt = prompts[choice.index // 2]
        reference = generate(server, text=prompt, sampling_params={
            "max_new_tokens": 6, "temperature": 0.8, "sampling_seed": params["seed"]})
        assert choice.text == prompt + reference["text"]
    token_prompts = [rng.integers(3, 384, size=5).tolist(), rng.integers(3, 384, size=7).tolist()]
    completion = client.completions.create(model="tiny", prompt=token_prompts, max_tokens=4, temperature=0)
    references = [generate(server, input_ids=ids, sampling_params={"max_new_tokens": 4, "temperature": 0})
                  for ids in token_prompts]
    assert [c.text for c in completion.choices] == [r["text"] for r in references]
    assert completion.usage.prompt_tokens == 12
    assert completion.usage.completion_tokens == sum(len(r["output_ids"]) for r in references)


def test_stop_string_and_stop_token_ids(client, server, rng):
    for _ in range(10):  # a prompt whose greedy output has a token that does not occur before it
        prompt = rng.integers(3, 384, size=8).tolist()
        full = generate(server, input_ids=prompt, sampling_params={"max_new_tokens": 12, "temperature": 0})
        ids, text = full["output_ids"], full["text"]
        cut = next((i for i in range(1, len(ids)) if ids[i] not in ids[:i]), None)
        if cut is not None:
            break
    completion = client.completions.create(model="t", prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"stop_token_ids": [ids[cut]]})
    choice = completion.choices[0]
    assert (choice.finish_reason, choice.matched_stop) == ("stop", ids[cut])
    assert completion.usage.completion_tokens == cut + 1
    starts = [i for i in range(1, len(text) - 1) if "\ufffd" not in text[:i + 2]]
    if starts:
        stop = text[starts[-1]:starts[-1] + 2]
        completion = client.completions.create(model="t", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        choice = completion.choices[0]
        reference = generate(server, input_ids=prompt, sampling_params={"max_new_tokens": 12, "temperature": 0,
                                                                         "stop": [stop]})
        assert (choice.text, choice.finish_reason, choice.matched_stop) == (reference["text"], "stop", stop)
        assert choice.text == text[:text.find(stop)]


def test_completion_stream_matches_non_stream(client, server, rng):
    prompt = random_text(rng)
    whole = client.completions.create(model="t", prompt=prompt, max_tokens=10, temperature=0, n=2)
    chunks = list(client.completions.create(model="t", prompt=prompt, max_tokens=10, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        assert chunk.usage is None and len(chunk.choices) == 1
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    finals = [c.choices[0] for c in chunks[:-1] if c.choices[0].finish_reason is not None]
    assert sorted(c.index for c in finals) == [0, 1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_prompt_is_transformers_template_and_defaults_apply(client, server, hf_model, hf_tokenizer, rng):
    messages = [{"role": "system", "content": random_text(rng, 3)}, {"role": "user", "content": random_text(rng)},
                {"role": "assistant", "content": random_text(rng, 2)},
                {"role": "user", "content": [{"type": "text", "text": random_text(rng, 2)}]}]
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in messages]
    prompt_ids = hf_tokenizer.apply_chat_template(flat, chat_template=SMOLLM_TEMPLATE, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    # No temperature: generation_config's top_k 1 (--sampling-defaults model) makes this greedy.
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
    assert chat.usage.prompt_tokens == len(prompt_ids)
    reference = generate(server, input_ids=prompt_ids, sampling_params={"max_new_tokens": 8, "temperature": 0})
    choice = chat.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", reference["text"])
    assert choice.finish_reason == reference["meta_info"]["finish_reason"]["type"]
    assert chat.object == "chat.completion" and chat.usage.completion_tokens == len(reference["output_ids"])
    assert_greedy(hf_model, prompt_ids, reference["output_ids"], label="chat")


def test_chat_stream_n_and_usage(client, rng):
    messages = [{"role": "user", "content": random_text(rng)}]
    whole = client.chat.completions.create(model="t", messages=messages, max_completion_tokens=9, temperature=0, n=2)
    chunks = list(client.chat.completions.create(model="t", messages=messages, max_completion_tokens=9,
                                                 temperature=0, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    per_choice: dict[int, list] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        per_choice[chunk.choices[0].index].append(chunk.choices[0])
    for index, parts in per_choice.items():
        assert (parts[0].delta.role, parts[0].delta.content) == ("assistant", "")
        assert parts[-1].finish_reason == whole.choices[index].finish_reason and parts[-1].delta.content is None
        assert all(p.finish_reason is None for p in parts[:-1])
        assert "".join(p.delta.content for p in parts[1:-1]) == whole.choices[index].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert len({c.id for c in chunks}) == 1


def test_cache_report(client, rng):
    prompt = rng.integers(3, 384, size=40).tolist()
    first = client.completions.create(model="t", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details is None  # a fresh random prompt: nothing cached
    again = client.completions.create(model="t", prompt=prompt, max_tokens=2, temperature=0)
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < 40


def test_tokenize_detokenize_round_trip(server, hf_tokenizer, rng):
    texts = [random_text(rng, int(k)) for k in rng.integers(1, 12, size=4)] + ["東京 🙂 café", ""]
    for prefix in ("", "/v1"):
        for text in texts:
            body = server.post(prefix + "/tokenize", json={"model": "x", "prompt": text}).json()
            assert body == {"tokens": hf_tokenizer.encode(text), "count": len(hf_tokenizer.encode(text)),
                            "max_model_len": 256}
            back = server.post(prefix + "/detokenize", json={"tokens": body["tokens"]}).json()
            assert back == {"text": hf_tokenizer.decode(body["tokens"], skip_special_tokens=True)} == {"text": text}
        batch = server.post(prefix + "/tokenize", json={"prompt": texts, "add_special_tokens": False}).json()
        assert batch["tokens"] == [hf_tokenizer.encode(t, add_special_tokens=False) for t in texts]
        assert batch["count"] == [len(t) for t in batch["tokens"]]
        special = hf_tokenizer.encode("<|im_start|>hi")
        assert server.post(prefix + "/detokenize", json={"tokens": [special, []], "skip_special_tokens": False}
                           ).json() == {"text": ["<|im_start|>hi", ""]}


@pytest.mark.parametrize(("path", "body", "kind", "message"), [
    ("/v1/completions", {"model": "t", "prompt": ""}, "BadRequestError", "Prompt cannot be empty"),
    ("/v1/completions", {"model": "t", "prompt": "a", "max_tokens": 0}, "BadRequestError",
     "max_tokens must be positive"),
    ("/v1/completions", {"model": "t", "prompt": 5}, "Bad Request", "Field 'prompt' must be a string"),
    ("/v1/completions", {"model": "t", "prompt": "a", "top_k": 0}, "BadRequestError",
     "top_k must be -1 (disable) or at least 1, got 0."),
    ("/v1/completions", {"model": "t", "prompt": [999999]}, "BadRequestError", "Token id 999999 in input_ids"),
    ("/v1/chat/completions", {"model": "t", "messages": []}, "BadRequestError", "Messages cannot be empty."),
    ("/v1/chat/completions", {"model": "t", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, "BadRequestError",
     "Tool calling (tools with tool_choice other than none) is not supported yet"),
    ("/v1/chat/completions", {"model": "t", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "BadRequestError",
     "Multimodal input (image_url content parts) is not supported yet"),
    ("/v1/tokenize", {"prompt": 3}, "Bad Request", "Field 'prompt' must be a string or a list of strings"),
    ("/detokenize", {"tokens": [-1]}, "BadRequestError", "Token id -1 in tokens is out of vocabulary"),
])
def test_error_envelopes(server, client, path, body, kind, message):
    response = server.post(path, json=body)
    assert response.status_code == 400
    error = response.json()
    assert error == {"object": "error", "message": error["message"], "type": kind, "param": None, "code": 400}
    assert error["message"].startswith(message), error["message"]


def test_client_errors_and_stream_errors(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="t", prompt="a", temperature=-1)
    assert info.value.status_code == 400 and "temperature must be non-negative" in info.value.message
    not_json = requests.post(server.url + "/v1/chat/completions", data='{"messages": []}',
                             headers={"content-type": "text/plain"}, timeout=30)
    assert not_json.status_code == 400 and not_json.json()["message"] == (
        "Unsupported Media Type: Only 'application/json' is allowed")
    # Past the context once the stream has started: 200, an error event, then [DONE] (contract 1.1 case E).
    response = server.post("/v1/completions", json={"model": "t", "prompt": list(range(3, 303)), "stream": True})
    lines = [line for line in response.text.split("\n") if line]
    assert response.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) == 2
    error = json.loads(lines[0][len("data: "):])["error"]
    assert (error["type"], error["code"]) == ("BadRequestError", 400) and "context length" in error["message"]
    with pytest.raises(openai.APIError, match="context length"):
        list(client.completions.create(model="t", prompt=list(range(3, 303)), stream=True))


def test_still_serves_and_no_pages_leak(server, client):
    assert client.completions.create(model="t", prompt="Hello", max_tokens=2).usage.completion_tokens == 2
    info = server.get("/get_server_info").json()["internal_states"][0]["kv_pages"]
    assert info["locked"] == 0 and info["free"] + info["evictable"] == info["total"]
