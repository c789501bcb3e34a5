"""HF `architectures` name -> model class. Adding a decoder family: its file in model/ and one line here."""

from __future__ import annotations

from model.config import ConfigError, ModelConfig
from model.decoder_pooling import LlamaEmbeddingModel, LlamaForSequenceClassification
from model.llama import LlamaForCausalLM
from model.qwen2_moe import Qwen2MoeForCausalLM
from model.xlm_roberta import XLMRobertaForSequenceClassification

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen2MoeForCausalLM,
}

# Pooled models: whatever the flags, they return vectors (embeddings, reward and rerank scores).
POOLED_CLASSES = {
    # Checkpoints without an LM head (gte-Qwen2 style embeddings).
    "LlamaModel": LlamaEmbeddingModel,
    "Qwen2Model": LlamaEmbeddingModel,
    "Qwen3Model": LlamaEmbeddingModel,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": LlamaForSequenceClassification,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
}
MODEL_CLASSES.update(POOLED_CLASSES)
# `--is-embedding` on a causal LM checkpoint: the same decoder, pooled instead of sampled.
EMBEDDING_CLASSES = {
    "LlamaForCausalLM": LlamaEmbeddingModel,
    "MistralForCausalLM": LlamaEmbeddingModel,
    "Qwen2ForCausalLM": LlamaEmbeddingModel,
    "Qwen3ForCausalLM": LlamaEmbeddingModel,
}


def model_class_for(config: ModelConfig, is_embedding: bool = False):
    if is_embedding and config.architecture in EMBEDDING_CLASSES:
        return EMBEDDING_CLASSES[config.architecture]
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ConfigError(
            f"Unsupported architecture {config.architecture!r}; supported architectures: {supported}"
        ) from None


def model_task(config: ModelConfig, is_embedding: bool = False) -> str:
    """What the served model does with a request (`model.interface.MODEL_TASKS`)."""
    return model_class_for(config, is_embedding).task
