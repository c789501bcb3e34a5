"""Decoders that return a vector instead of sampling: embedding models and sequence classifiers.

- `LlamaEmbeddingModel` (`task = "embed"`): a Llama / Qwen2 / Qwen3 causal checkpoint served with
  `--is-embedding`, or a bare `LlamaModel` / `Qwen2Model` one: the final-norm hidden states pooled per
  sequence (last token and L2-normalised unless the checkpoint's sentence-transformers config says
  otherwise, see `pooling_for`). The LM head is not built and its tensor, when present, is skipped.
- `LlamaForSequenceClassification` (`task = "score"`, reward models such as Skywork-Reward, and
  `Qwen2ForSequenceClassification`): the `score` head `[hidden, num_labels]` (no bias) applied to the
  last token's final hidden state; the score is the raw logit.

Both run through the same decoder forward and paged cache as the causal LM; only the head differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from checkpoints.name_maps import DEFAULT_DECODER_MAP
from model.config import ModelConfig
from model.heads import POOLING_METHODS, pool
from model.interface import StepInputs
from model.layers import Dense
from model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# A causal checkpoint read as an embedding model carries an LM head it does not use.
EMBEDDING_MAP = dataclasses.replace(DEFAULT_DECODER_MAP, ignored=(*DEFAULT_DECODER_MAP.ignored, r"lm_head\..*"))


class LlamaEmbeddingModel(LlamaForCausalLM):
    task = "embed"
    default_pooling = ("last", True)  # gte-Qwen2's sentence-transformers config; SGLang's default too
    weight_name_map = EMBEDDING_MAP

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.lm_head = None

    def logits(self, hidden_rows):
        raise TypeError("an embedding model has no LM head")


def num_labels(config: ModelConfig) -> int:
    """transformers' rule: the length of `id2label` when the config has one, else `num_labels`, else 2."""
    id2label = config.raw.get("id2label")
    if id2label:
        return len(id2label)
    return int(config.raw.get("num_labels") or 2)


class LlamaForSequenceClassification(LlamaEmbeddingModel):
    task = "score"
    default_pooling = ("last", False)
    weight_name_map = DEFAULT_DECODER_MAP  # `score.weight` lands in `score.kernel`; there is no LM head

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.score = Dense(config.hidden_size, num_labels(config), bias=False, dtype=dtype, rngs=rngs)

    def pool(self, hidden, inputs: StepInputs, *, method: str = "last", normalize: bool = False):
        """float32 `[S, num_labels]`: the score head at each sequence's last token (transformers takes the
        last non-padding token; a served sequence has no padding)."""
        last = pool(hidden, inputs.meta.cu_q_lens, inputs.meta.num_seqs, method="last")
        return last @ self.score.kernel[...].astype(jnp.float32)


_ST_MODES = (("pooling_mode_lasttoken", "last"), ("pooling_mode_mean_tokens", "mean"),
             ("pooling_mode_cls_token", "cls"))


def pooling_for(model_class, model_dir: Path) -> tuple[str, bool]:
    """(method, normalize) of a pooled model. An embedding model follows its checkpoint's
    sentence-transformers files when there are any: `modules.json` naming a Pooling module (its
    `config.json` picks last / mean / cls) and, for normalisation, a Normalize module. A pooling mode
    we do not implement (max, weighted mean) is an error rather than a silently different vector."""
    method, normalize = model_class.default_pooling
    modules_file = Path(model_dir) / "modules.json"
    if model_class.task != "embed" or not modules_file.exists():
        return method, normalize
    modules = json.loads(modules_file.read_text())
    types = [str(m.get("type", "")) for m in modules]
    pooling = [m for m in modules if str(m.get("type", "")).endswith(".Pooling")]
    if pooling:
        config_file = Path(model_dir) / pooling[0].get("path", "1_Pooling") / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        chosen = [name for key, name in _ST_MODES if config.get(key)]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and
                  k not in dict(_ST_MODES)]
        if others or len(chosen) > 1:
            raise ValueError(f"{config_file}: pooling {others or chosen} is not supported (one of "
                             f"{', '.join(POOLING_METHODS)})")
        method = chosen[0] if chosen else method
    normalize = any(t.endswith(".Normalize") for t in types)
    logger.info("Pooling from %s: %s%s", modules_file, method, ", L2-normalised" if normalize else "")
    return method, normalize
