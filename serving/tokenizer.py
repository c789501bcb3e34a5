"""Tokenization, incremental detokenization and chat templates, on `tokenizers` + jinja2 (no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from serving.chat_template import ChatTemplate, select_template

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what a chat template may read as a variable.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialized by transformers
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise ValueError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        self.path = path
        self._tok = HFTokenizer.from_file(str(file))
        config_file = path / "tokenizer_config.json"
        self.config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.model_max_length = int(self.config.get("model_max_length") or 0) or None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.chat_template = select_template(self.config.get("chat_template"))
        self.special_tokens_map = {name: _token_text(self.config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        self._template: ChatTemplate | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, first: str, second: str) -> list[int]:
        """A cross-encoder's input: the tokenizer's own pair template (`<s> q </s></s> d </s>` for XLM-R)."""
        return self._tok.encode(first, second, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def set_chat_template(self, source: str) -> None:
        """Replace the tokenizer's template (`--chat-template`); compiled now, so a bad one fails at startup."""
        self.chat_template = source
        self._template = ChatTemplate(source, self.special_tokens_map)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The rendered prompt text, as transformers renders it (serving/chat_template.py). ValueError
        when there is no template or it refuses the messages."""
        if not self.chat_template:
            raise ValueError("This model's tokenizer has no chat template; start the server with --chat-template.")
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, self.special_tokens_map)
        return self._template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)


class IncrementalDetokenizer:
    """Turns a growing list of ids into text without ever emitting half a character.

    Keeps two offsets into the ids: text before `prefix_offset` is settled; the window from
    `prefix_offset` is re-decoded each time so tokenizers that merge across token boundaries (byte-level
    BPE pieces of one UTF-8 character, SentencePiece leading spaces) come out right. A window that ends
    in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one id; returns the newly settled text (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        window = decode(self.ids[self._prefix_offset :], self.skip_special_tokens)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        delta = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Settle everything, including a trailing partial character, and return the full text."""
        self.text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        self._prefix_offset = self._read_offset = len(self.ids)
        return self.text
