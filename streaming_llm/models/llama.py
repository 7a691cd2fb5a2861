"""Llama-structured adapter: Llama (SmolLM2), Mistral, Qwen2/3, Phi (partial rotary), Phi-3, OLMo, OLMo-2, OLMo-3,
StarCoder2, Granite, Gemma, Gemma 2 (logit soft-capping), Gemma 3 text (a RoPE per layer type), SmolLM3 (every
fourth layer without RoPE), Apertus, Arcee, Seed-OSS, and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE — `model.model.rotary_emb`,
`model.model.layers[i].self_attn`. What differs between them (norms, fused or biased projections, parallel
residuals, multipliers, partial rotary) happens inside the model's own modules."""

from __future__ import annotations

from torch import nn

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "olmo", "olmo2", "olmo3", "starcoder2", "granite",
               "gemma", "gemma2", "gemma3_text", "smollm3", "apertus", "arcee", "seed_oss", "mixtral", "qwen2_moe", "qwen3_moe")


def rotary_embedding(model: nn.Module) -> nn.Module:
    return model.model.rotary_emb


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]
