"""Adapter for a text decoder inside a multimodal checkpoint: Gemma 3 (4B, 12B, 27B: `gemma3`, whose language model is
Gemma 3 text) — `model.model.language_model.rotary_emb`, `model.model.language_model.layers[i].self_attn`. Streaming
covers the text stream (token ids in, as for any causal LM); images are not streamed."""

from __future__ import annotations

from torch import nn

MODEL_TYPES = ("gemma3",)


def rotary_embedding(model: nn.Module) -> nn.Module:
    return model.model.language_model.rotary_emb


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.language_model.layers]


def rope_layout(config) -> tuple[bool, bool]:
    return False, False


def applies_rope(attention: nn.Module) -> bool:
    return True
