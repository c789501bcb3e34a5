"""Shared fixtures: tiny random checkpoints generated with transformers, and a server launcher.

Nothing is downloaded: tokenizers are trained here on a few sentences, weights are random.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Once upon a time there was a small model that answered questions about the world.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; unicode: café, naïve, 東京, emoji 🙂.",
    "Hello world! How are you today? I am fine, thank you.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The tiny checkpoints' weights: fresh each run, shown in pytest's header; set CHECKPOINT_SEED to replay.
CHECKPOINT_SEED = int(os.environ.get("CHECKPOINT_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"CHECKPOINT_SEED={CHECKPOINT_SEED} (tiny checkpoints' random weights; set it to replay a run)"


def pytest_terminal_summary(terminalreporter):
    # Again at the end: `pytest -q` (what `make test` runs) shows no header, and a failure needs the seed.
    terminalreporter.write_line(f"CHECKPOINT_SEED={CHECKPOINT_SEED} (set it to replay this run's checkpoints)")


def write_tokenizer(out: Path, vocab_size: int = 384) -> None:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 256,
    }))


def write_pair_tokenizer(out: Path, vocab_size: int = 384) -> None:
    """An XLM-R-style tokenizer: <s>=0, <pad>=1, </s>=2, and RoBERTa's pair template `<s> a </s></s> b </s>`."""
    from tokenizers import ByteLevelBPETokenizer, processors

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": 256,
    }))


def make_tiny_checkpoint(out: Path, arch: str = "llama", **overrides) -> Path:
    """A random-weight HF checkpoint (float32) of `arch` with the test tokenizer, in `out`. Besides the
    causal LMs: "llama-reward" / "qwen2-reward" (sequence classification, one label) and "xlm-roberta"
    (a cross-encoder, one label, with a pair tokenizer)."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    common = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=0, bos_token_id=None, pad_token_id=None)
    if arch == "xlm-roberta":
        write_pair_tokenizer(out)
        common.update(max_position_embeddings=130, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                      type_vocab_size=1, num_labels=1)
        del common["num_key_value_heads"]
    else:
        write_tokenizer(out)
    if arch.endswith("-reward"):
        common.update(num_labels=1)
    common.update(overrides)
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "llama-reward": (transformers.LlamaConfig, transformers.LlamaForSequenceClassification),
        "qwen2-reward": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification),
        "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaForSequenceClassification),
    }
    if arch.endswith("_moe"):  # 8 experts, 2 per token; Qwen2-MoE adds its shared expert
        common = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 48, **common}
    config_cls, model_cls = classes[arch]
    # Fresh weights each run, replayable: CHECKPOINT_SEED (printed) mixed with the architecture and the
    # overrides, so two checkpoints of one run differ.
    torch.manual_seed((CHECKPOINT_SEED + zlib.crc32(repr((arch, sorted(overrides.items()))).encode())) % 2**31)
    model = model_cls(config_cls(**common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers zero-inits biases; make them matter
                param.normal_(0, 0.5)
            elif "norm" in name.lower():
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.3)  # large enough that greedy decoding is not a constant loop
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a busy 2-core machine two torch threads stall on each other: greedy generation measured
    1.6-3.7 s with one thread and 19-22 s with two."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir, one_torch_thread):
    """transformers' model of `tiny_llama_dir` (float32, eval): the reference the server tests compare with."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def replayable_seed(env_var: str) -> int:
    """A fresh random seed each run, or `$env_var` to replay one; printed so a failure shows it."""
    seed = int(os.environ.get(env_var, int.from_bytes(os.urandom(4), "little")))
    print(f"{env_var}={seed}")
    return seed


def sse_lines(response):
    """The lines of a streamed response, decoded. Not `iter_lines(decode_unicode=True)`: that splits with
    `str.splitlines`, which also breaks at U+0085, U+2028 and U+2029, and random-weight models emit those
    inside the JSON text (which leaves them unescaped, as SGLang's does). SSE lines end only at CR/LF."""
    for line in response.iter_lines():
        yield line.decode("utf-8")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m serving.main` on 127.0.0.1, waited on until /health_generate answers 200."""

    def __init__(self, model_path: Path | str | None, *extra: str, timeout: float = 600.0,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "serving.main", "--port", str(self.port), "--log-level", "warning"]
        if model_path is not None:
            cmd += ["--model-path", str(model_path)]
        cmd += list(extra)
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pallas-serve-test-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.read_log()}")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout} s:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-5000:]

    def post(self, path: str, **kwargs):
        return requests.post(self.url + path, timeout=kwargs.pop("timeout", 300), **kwargs)

    def get(self, path: str, **kwargs):
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 60), **kwargs)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def tpu_abstract_mesh():
    """Mosaic's lowering asks the device kind: name a TPU v5e (there is none here). This goes through
    private jax API (0.10); a jax that moved it skips the TPU half of the lowering tests."""
    try:
        import jax
        from jax._src import mesh as mesh_lib

        device = mesh_lib.AbstractDevice("TPU v5 lite", 1, "tpu")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device))
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.skip(f"cannot name an abstract TPU device in this jax: {exc}")
