"""Llama-family adapter: Llama, Mistral, Qwen2/3, SmolLM2 — full rotary, `model.model.rotary_emb`."""

from __future__ import annotations

from torch import nn

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def rotary_embedding(model: nn.Module) -> nn.Module:
    return model.model.rotary_emb


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]
