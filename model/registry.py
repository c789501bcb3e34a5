"""HF `architectures` name -> model class. Adding a decoder family: its file in model/ and one line here."""

from __future__ import annotations

from model.config import ConfigError, ModelConfig
from model.llama import LlamaForCausalLM
from model.qwen2_moe import Qwen2MoeForCausalLM

MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen2MoeForCausalLM,
}


def model_class_for(config: ModelConfig):
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_CLASSES))
        raise ConfigError(
            f"Unsupported architecture {config.architecture!r}; supported architectures: {supported}"
        ) from None


def model_task(config: ModelConfig) -> str:
    """What the served model does with a request (`model.interface.MODEL_TASKS`)."""
    return model_class_for(config).task
