"""The bundled default model converts faithfully: checked against transformers' own GGUF reader.

transformers dequantizes the same GGUF with its own code and its own q/k un-permutation, so equal
weights, equal greedy tokens and equal token ids mean the converted directory says what the GGUF
says. The conversion itself runs once and is cached in the user's cache directory across runs.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import gguf
import jinja2.sandbox
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from checkpoints.default import default_model_dir, fetch_default_gguf

TEXTS = [
    "The capital of France is",
    "Call 555-0123 or 1234567890; pi is 3.14159 and 2024 was a year.",
    "naïve café, Ærøskøbing, 東京タワー, emoji 🚀🤖 and Ω≈ç√",
    "  leading, multiple    inner   and trailing spaces   ",
    "line one\nline two\n\n\ttabbed\r\nwindows line",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "It's 12:30pm, isn't it? We'll see; they've left.",
]
MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Answer in 2 words."},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def converted_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return fetch_default_gguf(tmp_path_factory.mktemp("default-gguf"))


@pytest.fixture(scope="module")
def gguf_reading(gguf_path, converted_dir):
    """transformers' reading of the GGUF: its config and its dequantized tensors under Hugging Face
    names (one pass, since parsing the 49k-token metadata is the slow part)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(converted_dir))
    # transformers rebuilds gguf's (pure) name table once per submodule, 397 times, 15 s in all.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
    return AutoConfig.for_model(**parsed["config"]), parsed["tensors"]


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def test_config_matches_transformers_reading_of_the_gguf(converted_dir, gguf_reading):
    ours = AutoConfig.from_pretrained(converted_dir)
    theirs, _ = gguf_reading
    for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ):  # fmt: skip
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)
    raw = json.loads((converted_dir / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["torch_dtype"] == "float32"
    assert raw["rms_norm_eps"] == 1e-5


def test_weights_equal_transformers_dequantization(converted_dir, gguf_reading):
    ours = load_file(converted_dir / "model.safetensors")
    _, gguf_tensors = gguf_reading
    # Tied embeddings: neither side stores lm_head.
    assert set(ours) == set(gguf_tensors) - {"lm_head.weight"}
    for name, weight in ours.items():
        assert weight.dtype.name == "float32", name
        assert (weight == gguf_tensors[name].numpy()).all(), name


def test_greedy_continuation_matches_gguf_model(converted_dir, gguf_reading, gguf_tokenizer):
    ours = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    # The same architecture configured by transformers' GGUF reader and filled with its tensors.
    gguf_config, gguf_tensors = gguf_reading
    theirs = AutoModelForCausalLM.from_pretrained(converted_dir, config=gguf_config, dtype=torch.float32)
    outcome = theirs.load_state_dict(gguf_tensors, strict=False)
    assert not outcome.unexpected_keys and set(outcome.missing_keys) <= {"lm_head.weight"}
    theirs.tie_weights()
    prompt = gguf_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        ours_ids = ours.generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
        theirs_ids = theirs.eval().generate(prompt, max_new_tokens=24, do_sample=False)[0].tolist()
    assert ours_ids == theirs_ids
    assert "Paris" in gguf_tokenizer.decode(ours_ids)


def test_tokenizer_ids_match_transformers(converted_dir, gguf_tokenizer):
    ours = Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(converted_dir)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == gguf_tokenizer(text).input_ids, text
        assert ids == auto(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_special_tokens_stay_whole(converted_dir):
    ours = Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
    encoding = ours.encode("<|im_start|>assistant<|im_end|>")
    assert encoding.tokens[0] == "<|im_start|>" and encoding.ids[0] == 1
    assert encoding.tokens[-1] == "<|im_end|>" and encoding.ids[-1] == 2
    # SmolLM's pre-tokenizer splits every digit, as llama.cpp's "smollm" regex does.
    assert ours.encode("2024").tokens == ["2", "0", "2", "4"]


def test_chat_template_renders_to_transformers_ids(converted_dir, gguf_tokenizer):
    tokenizer_config = json.loads((converted_dir / "tokenizer_config.json").read_text())
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = environment.from_string(tokenizer_config["chat_template"]).render(
        messages=MESSAGES, add_generation_prompt=True
    )
    ours = (
        Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
        .encode(rendered, add_special_tokens=False)
        .ids
    )
    for tokenizer in (gguf_tokenizer, AutoTokenizer.from_pretrained(converted_dir)):
        expected = tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ours == list(expected)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_default_model_dir_is_reused(converted_dir):
    before = (converted_dir / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == converted_dir
    assert (converted_dir / "model.safetensors").stat().st_mtime_ns == before


def test_module_prints_only_the_directory(converted_dir):
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints.default"], capture_output=True, text=True, check=True
    )
    assert result.stdout == f"{converted_dir}\n"


def test_a_directory_from_another_wheel_is_not_reused(tmp_path):
    from checkpoints.default import WHEEL_REQUIREMENT, _is_current
    from checkpoints.gguf import CONVERTED_FILES, SOURCE_MARKER

    for name in CONVERTED_FILES:
        (tmp_path / name).write_text("{}")
    assert not _is_current(tmp_path)
    (tmp_path / SOURCE_MARKER).write_text(json.dumps({"requirement": WHEEL_REQUIREMENT}))
    assert _is_current(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert not _is_current(tmp_path)
