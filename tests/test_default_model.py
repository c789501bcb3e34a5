"""The bundled default model (SmolLM2-135M-Instruct) through our runtime: the same greedy tokens as
transformers, and a real answer to a real question from the real server.

The conversion itself (GGUF -> Hugging Face directory) is checked in test_default_model_conversion.py;
here the converted directory is the reference both sides read.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints.default import default_model_dir
from serving.engine import Engine
from serving.tokenizer import Tokenizer
from tests.conftest import ServerProcess

PROMPT = "The capital of France is"
NEW_TOKENS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def default_dir():
    return default_model_dir()


def transformers_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_tokens_match_transformers(default_dir):
    prompt_ids = AutoTokenizer.from_pretrained(default_dir)(PROMPT).input_ids
    expected = transformers_greedy(default_dir, prompt_ids, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS, "transformers stopped early: eos was not ignored"

    engine = Engine(model_path=str(default_dir), precompile=False, disable_compilation_cache=False,
                    max_running_requests=4, chunked_prefill_size=64, max_total_tokens=4096)
    try:
        result = engine.generate(text=PROMPT, sampling_params={
            "temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True})
    finally:
        engine.shutdown()
    assert result["meta_info"]["prompt_tokens"] == len(prompt_ids)
    assert result["output_ids"] == expected
    assert "Paris" in result["text"]


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess(None, "--max-total-tokens", "8192", "--max-running-requests", "8",
                         "--chunked-prefill-size", "128")
    yield proc
    assert proc.stop() == 0, "SIGTERM must end the server with exit code 0"


def test_server_answers_the_chat_question(server, default_dir):
    prompt = Tokenizer(default_dir).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    assert prompt.endswith("<|im_start|>assistant\n")
    response = server.post("/generate", json={
        "text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert "Paris" in body["text"], body
    assert 0 < body["meta_info"]["completion_tokens"] <= NEW_TOKENS


def test_openai_chat_answers_the_question(server):
    """The same question through /v1/chat/completions with the official client: the GGUF's own chat
    template (tokenizer.chat_template) renders it, greedy, the answer names Paris."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="default", temperature=0, max_tokens=NEW_TOKENS,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in chat.choices[0].message.content, chat
    assert chat.usage.completion_tokens <= NEW_TOKENS


def test_model_info_names_the_default_model(server, default_dir):
    info = server.get("/get_model_info").json()
    assert info["model_path"] == str(default_dir)
    assert info["tokenizer_path"] == str(default_dir)
    assert info["is_generation"] is True
