"""--model-path resolution: local directories, Orbax checkpoints, the local hub cache, GGUF files.

The GGUF case writes the tiny random Llama from conftest as a GGUF the way llama.cpp's converter
does (q / k rows permuted, F32 tensors, vocabulary and merges as metadata), resolves it, and checks
the round trip: the converted weights equal the originals, and transformers reading the GGUF itself
gives the same logits and token ids as the converted directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from checkpoints.gguf import GGUFConversionError, convert_gguf_to_hf_dir
from checkpoints.gguf_tokenizer import build_tokenizer
from checkpoints.resolve import ModelNotFoundError, ResolvedModel, resolve_model_path

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
TEXTS = [
    "The capital of France is",
    "Numbers: 10 100 1000",
    "café  東京 🙂\n\nbye",
    "<|im_start|>hi<|im_end|>",
]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Conversions and hub lookups go to this test's own directories, never the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return tmp_path


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(
    hf_dir: Path,
    path: Path,
    *,
    architecture: str = "llama",
    int8_tensor: str | None = None,
    linear_rope_factor: float | None = None,
) -> Path:
    """A GGUF of the Hugging Face Llama in `hf_dir`, laid out as llama.cpp's converter writes one."""
    config = json.loads((hf_dir / "config.json").read_text())
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    rope_theta = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    if linear_rope_factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(linear_rope_factor)
    vocab = tokenizer["model"]["vocab"]
    special = {added["content"] for added in tokenizer["added_tokens"] if added["special"]}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for hf_name, weight in sorted(load_file(hf_dir / "model.safetensors").items()):
        module = hf_name.removesuffix(".weight")
        if module.startswith("model.layers."):
            layer, part = module.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{GGUF_LAYER_NAMES[part]}"
        else:
            name = GGUF_GLOBAL_NAMES[module]
        role = name.rsplit(".", 1)[-1]
        if role in heads:
            weight = llama_cpp_permute(weight, heads[role])
        if name == int8_tensor:
            weight = weight.astype(np.int8)
        writer.add_tensor(f"{name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def make_hub_snapshot(hub: Path, folder: str, revision: str = "0123abcd", with_ref: bool = True) -> Path:
    snapshot = hub / folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    if with_ref:
        (hub / folder / "refs").mkdir()
        (hub / folder / "refs" / "main").write_text(revision)
    return snapshot


def test_local_directory_with_config(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "model")) == ResolvedModel(tmp_path / "model", "hf")


def test_orbax_checkpoint_is_reported_as_orbax(tmp_path):
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "params", {"w": jnp.ones(3)})
    checkpointer.wait_until_finished()
    (tmp_path / "params" / "config.json").write_text("{}")  # kept beside the params: still Orbax
    assert resolve_model_path(str(tmp_path / "params")).kind == "orbax"
    manager = ocp.CheckpointManager(tmp_path / "runs")
    manager.save(7, args=ocp.args.StandardSave({"w": jnp.ones(3)}))
    manager.wait_until_finished()
    assert resolve_model_path(str(tmp_path / "runs")) == ResolvedModel(tmp_path / "runs", "orbax")


def test_hub_id_found_in_local_cache_any_case(isolated_caches):
    snapshot = make_hub_snapshot(isolated_caches / "hub", "models--Qwen--Qwen2.5-0.5B-Instruct")
    for repo_id in ("Qwen/Qwen2.5-0.5B-Instruct", "qwen/qwen2.5-0.5b-instruct", "QWEN/QWEN2.5-0.5B-INSTRUCT"):
        assert resolve_model_path(repo_id) == ResolvedModel(snapshot, "hf")


def test_hub_cache_under_hf_home_without_refs(isolated_caches, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(isolated_caches / "hf-home"))
    snapshot = make_hub_snapshot(isolated_caches / "hf-home" / "hub", "models--org--tiny", with_ref=False)
    assert resolve_model_path("ORG/Tiny").path == snapshot


@pytest.mark.parametrize("model_path", ["nobody/no-such-model", "/no/such/directory", "not a hub id!"])
def test_not_found_message_is_exact(model_path, isolated_caches):
    make_hub_snapshot(isolated_caches / "hub", "models--somebody--else")
    with pytest.raises(ModelNotFoundError) as raised:
        resolve_model_path(model_path)
    assert str(raised.value) == f"{model_path} (repository not found)"
    assert isinstance(raised.value, ValueError)


def test_directory_without_config_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"^.* \(repository not found\)$"):
        resolve_model_path(str(tmp_path))


def test_gguf_round_trip_restores_the_original_weights(tiny_gguf, tiny_llama_dir, isolated_caches):
    resolved = resolve_model_path(str(tiny_gguf))
    assert resolved.kind == "hf"
    assert resolved.path.parent == isolated_caches / "xdg-cache" / "pallas-serve" / "gguf"
    assert resolved.path.name.startswith("tiny-llama-")
    original, converted = (
        load_file(tiny_llama_dir / "model.safetensors"),
        load_file(resolved.path / "model.safetensors"),
    )
    assert set(converted) == set(original)
    for name, weight in original.items():
        np.testing.assert_array_equal(converted[name], weight, err_msg=name)
    ours, theirs = AutoConfig.from_pretrained(resolved.path), AutoConfig.from_pretrained(tiny_llama_dir)
    for name in (
        "hidden_size",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "rms_norm_eps",
        "eos_token_id",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_parameters["rope_theta"] == theirs.rope_parameters["rope_theta"]

    before = (resolved.path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(tiny_gguf)) == resolved  # reused, not converted again
    assert (resolved.path / "model.safetensors").stat().st_mtime_ns == before


def test_gguf_conversion_matches_transformers_reading_the_gguf(tiny_gguf, tmp_path):
    converted = convert_gguf_to_hf_dir(tiny_gguf, tmp_path / "converted")
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    )
    parsed = load_gguf_checkpoint(str(tiny_gguf), return_tensors=True, model_to_load=theirs)
    outcome = theirs.load_state_dict(parsed["tensors"], strict=False)
    assert not outcome.missing_keys and not outcome.unexpected_keys
    theirs.eval()

    gguf_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    our_tokenizer = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for text in TEXTS:
        assert our_tokenizer.encode(text).ids == gguf_tokenizer(text).input_ids, text
    prompt = torch.tensor([our_tokenizer.encode(TEXTS[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt).logits, theirs(prompt).logits, rtol=1e-5, atol=1e-5)
        greedy = [m.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist() for m in (ours, theirs)]
    assert greedy[0] == greedy[1]
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"].startswith(
        "{% for m"
    )


def test_conversion_refuses_an_existing_directory(tiny_gguf, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf_dir(tiny_gguf, tmp_path / "taken")


def test_conversion_clears_staging_left_by_a_killed_run(tiny_gguf, tmp_path):
    stale, fresh = tmp_path / ".model.partial-killed", tmp_path / ".model.partial-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    convert_gguf_to_hf_dir(tiny_gguf, tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial-running", "model"]


def test_linear_rope_scaling_carries_over(tiny_llama_dir, tmp_path):
    path = write_gguf(tiny_llama_dir, tmp_path / "scaled.gguf", linear_rope_factor=4.0)
    config = json.loads((convert_gguf_to_hf_dir(path, tmp_path / "out") / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_unsupported_architecture_is_a_clear_error(tiny_llama_dir, tmp_path):
    path = write_gguf(tiny_llama_dir, tmp_path / "other.gguf", architecture="qwen3")
    with pytest.raises(GGUFConversionError, match="architecture 'qwen3' is not supported"):
        resolve_model_path(str(path))


def test_unsupported_tensor_type_is_a_clear_error_and_leaves_nothing(tiny_llama_dir, tmp_path):
    path = write_gguf(tiny_llama_dir, tmp_path / "int8.gguf", int8_tensor="blk.1.ffn_up")
    with pytest.raises(GGUFConversionError, match="blk.1.ffn_up.weight uses quantization I8"):
        convert_gguf_to_hf_dir(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.gguf"]  # staging directory removed


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported"),
        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "exotic"}, "pre-tokenizer 'exotic'"),
    ],
)
def test_unsupported_tokenizers_are_clear_errors(metadata, message):
    with pytest.raises(GGUFConversionError, match=message):
        build_tokenizer({"tokenizer.ggml.tokens": ["a"], **metadata})


def test_llama3_style_vocabulary_splits_digit_triples_and_adds_bos():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|begin_of_text|>", *alphabet, "12", "123"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["1 2", "12 3"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }
    tokenizer, tokenizer_config = build_tokenizer(metadata)
    assert tokenizer.encode("12345").tokens == ["<|begin_of_text|>", "123", "4", "5"]
    assert tokenizer.encode("12345", add_special_tokens=False).ids[0] == tokens.index("123")
    assert tokenizer_config["add_bos_token"] and tokenizer_config["bos_token"] == "<|begin_of_text|>"
