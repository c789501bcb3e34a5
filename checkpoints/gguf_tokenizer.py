"""The Hugging Face tokenizer (tokenizer.json and tokenizer_config.json) of a GGUF vocabulary.

A GGUF carries its vocabulary as `tokenizer.ggml.*` metadata: tokens, their types, BPE merges and the
name of the pre-tokenizer regex llama.cpp splits text with. `build_tokenizer` rebuilds the same
byte-level BPE with the `tokenizers` library, so the converted directory tokenizes as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4

class GGUFConversionError(ValueError):
    """The GGUF file describes something this converter cannot turn into a Llama directory."""


# llama.cpp's `tokenizer.ggml.pre` names the regex its vocabulary was trained with; each maps to the
# Hugging Face pre-tokenizer that splits text the same way, and whether whole words found in the
# vocabulary skip the merges (Llama 3's `ignore_merges`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits every digit off first ("\p{N}"), then applies the GPT-2 regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


def _llama3_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


_PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool]] = {
    **{name: (_gpt2_split, False) for name in ("default", "gpt-2", "gpt2", "mpt", "olmo")},
    **{name: (_digits_then_gpt2_split, False) for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: (_llama3_split, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
}


def build_tokenizer(
    metadata: dict[str, Any], gguf_path: Path | str = "GGUF"
) -> tuple[Tokenizer, dict[str, Any]]:
    """The `tokenizers` tokenizer and tokenizer_config.json for a byte-level BPE GGUF vocabulary."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"{gguf_path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFConversionError(
            f"{gguf_path}: pre-tokenizer {pre!r} is not supported (supported: {sorted(_PRE_TOKENIZERS)})"
        )
    split, ignore_merges = _PRE_TOKENIZERS[pre]
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(token_types) != len(tokens):
        raise GGUFConversionError(f"{gguf_path}: {len(token_types)} token types for {len(tokens)} tokens")
    if "tokenizer.ggml.merges" not in metadata:
        raise GGUFConversionError(f"{gguf_path}: byte-level vocabulary without tokenizer.ggml.merges")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]
    # Vocabulary strings are kept exactly as the GGUF spells them: ordinary tokens are already in the
    # byte-level alphabet, and special ones must keep their text so added tokens find their ids.
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = split()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and skipped when decoding with
    # skip_special_tokens; user-defined ones (<think>) are matched whole but are ordinary text.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, token_types, strict=True)
            if k == _CONTROL_TOKEN
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, token_types, strict=True)
            if k == _USER_DEFINED_TOKEN
        ]
    )

    def token(name: str) -> str | None:
        token_id = metadata.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[token_id] if token_id is not None and token_id < len(tokens) else None

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    tokenizer.post_processor = _post_processor(
        tokenizer, token("bos") if add_bos else None, token("eos") if add_eos else None
    )
    tokenizer_config: dict[str, Any] = {
        # The generic class loads tokenizer.json as written; model-specific classes may rebuild parts.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    return tokenizer, tokenizer_config


def _post_processor(tokenizer: Tokenizer, bos: str | None, eos: str | None) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        return byte_level
    prefix, suffix = ([bos] if bos else []), ([eos] if eos else [])
    single = [*prefix, "$A:0", *suffix]
    pair = [*single, *[f"{t}:1" for t in prefix], "$B:1", *[f"{t}:1" for t in suffix]]
    special = [(t, tokenizer.token_to_id(t)) for t in {*prefix, *suffix}]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    return processors.Sequence([byte_level, template])
