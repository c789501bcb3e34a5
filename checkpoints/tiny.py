"""Tiny random-weight Hugging Face checkpoints, built locally with transformers (nothing downloaded).

The tests compare our models with transformers on these, and the notebooks serve them where the
walk-through needs a kind of model (embedding, reward, reranker, MoE) that would otherwise mean a
multi-gigabyte download. Tokenizers are trained here on a few sentences; weights are random, drawn
from `seed`. Needs torch and transformers (the `dev` extra); the serving runtime never imports this.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path

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


def write_tokenizer(out: Path, vocab_size: int = 384) -> None:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL,
                        show_progress=False)
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
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": 256,
    }))


def make_tiny_checkpoint(out: Path, arch: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """A random-weight HF checkpoint (float32) of `arch` with the test tokenizer, in `out`. Besides the
    causal LMs: "llama-reward" / "qwen2-reward" (sequence classification, one label) and "xlm-roberta"
    (a cross-encoder, one label, with a pair tokenizer). `seed` is mixed with the architecture and the
    overrides, so two checkpoints built with one seed differ."""
    with warnings.catch_warnings():  # tqdm.auto, in a notebook without ipywidgets: text bars instead
        warnings.filterwarnings("ignore", message="IProgress not found")
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
    torch.manual_seed((seed + zlib.crc32(repr((arch, sorted(overrides.items()))).encode())) % 2**31)
    model = model_cls(config_cls(**common)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # transformers zero-inits biases; make them matter
                param.normal_(0, 0.5)
            elif "norm" in name.lower():
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.3)  # large enough that greedy decoding is not a constant loop
    # Quietly: a one-shard progress bar says nothing, and in a notebook it warns about missing widgets.
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.save_pretrained(out, safe_serialization=True)
    finally:
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
    return out
