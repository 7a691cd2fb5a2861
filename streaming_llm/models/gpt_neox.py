"""GPTNeoX adapter (Pythia): partial rotary (`rotary_pct`), `model.gpt_neox.rotary_emb`."""

from __future__ import annotations

from torch import nn

MODEL_TYPES = ("gpt_neox",)


def rotary_embedding(model: nn.Module) -> nn.Module:
    return model.gpt_neox.rotary_emb


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.attention for layer in model.gpt_neox.layers]


def rope_layout(config) -> tuple[bool, bool]:
    return False, False


def applies_rope(attention: nn.Module) -> bool:
    return True
