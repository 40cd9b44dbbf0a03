"""Llama-family Flax models, their configs, presets and weight loading. Never imports jaxserve.

config.json | preset name -> ModelConfig -> abstract model (shapes only)
    -> weights: safetensors, tensor by tensor onto the device(s) | dummy: random, made on device
    -> LlamaForCausalLM(tokens, kv_cache, RaggedBatch) -> hidden -> logits(rows)
"""

from models.attention import LayerKVCache, RaggedBatch, allocate_kv_cache, kv_cache_shardings, paged_attention
from models.config import ModelConfig, ModelConfigError, preset_names
from models.llama import LlamaForCausalLM, abstract_model, create_model

__all__ = [
    "LayerKVCache",
    "LlamaForCausalLM",
    "ModelConfig",
    "ModelConfigError",
    "RaggedBatch",
    "abstract_model",
    "allocate_kv_cache",
    "create_model",
    "kv_cache_shardings",
    "paged_attention",
    "preset_names",
]
