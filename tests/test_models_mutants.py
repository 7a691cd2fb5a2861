"""Behaviour of streaming_llm/models/ that no other test pinned down (found by mutation testing)."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import build_llama

from streaming_llm.models import adapter_for, attention_shape, describe


def test_what_describe_and_attention_shape_report_cannot_be_changed_afterwards():
    """A model's Architecture is read once and shared by its caches and wrappers; an AttentionShape is a value (a
    cache size is computed from it, and equal shapes hash alike): assigning to either is refused."""
    model = build_llama()
    architecture, shape = describe(model), attention_shape(model.config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        architecture.max_positions = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        shape.layers = 1  # type: ignore[misc]
    assert hash(shape) == hash(attention_shape(model.config))


def test_the_hint_to_pass_the_held_model_is_given_only_where_it_holds_a_language_model():
    """DataParallel around a causal LM: "pass the model it holds (.module)"; around a module without a config (no
    language model in it), the hint would send the user to another refusal, so it is not given."""
    import torch

    with pytest.raises(TypeError, match=r"got DataParallel; pass the model it holds \(.module\)$"):
        describe(torch.nn.DataParallel(build_llama()))
    with pytest.raises(TypeError, match=r"got DataParallel$"):
        describe(torch.nn.DataParallel(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("model_type", ["cohere", "cohere2", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe",
                                        "llama", "gpt_neox", "gemma3"])
def test_every_model_type_s_own_angles_are_read_in_their_own_order(model_type):
    """Each model type's rotary embedding gives its cos/sin pair by pair (Cohere, Cohere 2) or as [angles, angles]
    (the other interleaved types, and every rotate-half model: Llama, GPT-NeoX, Gemma 3's language model, ...): keys its own RoPE rotated are
    undone exactly with those angles, read in that order. (test_rope.py checks Cohere and GLM; a wrong entry for any
    other type, or for the rotate-half default, went unnoticed.)"""
    import importlib

    import torch
    from tiny_models import build_gemma3_multimodal, build_gpt_neox, build_llama_family

    builders = {"gpt_neox": build_gpt_neox, "gemma3": build_gemma3_multimodal}
    model = builders[model_type]() if model_type in builders else build_llama_family(model_type)
    architecture = describe(model)
    rotary = architecture.rotary
    apply = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    raw = torch.randn(1, 2, 5, attention_shape(model.config).head_dim, generator=torch.Generator().manual_seed(3))
    per_type = {"layer_type": architecture.attention_modules[0].layer_type} if model_type == "gemma3" else {}
    cos, sin = adapter_for(model.config).rotary_embedding(model)(raw, torch.tensor([[0, 3, 7, 20, 41]]), **per_type)
    rotated = apply(raw, raw, cos, sin)[0]
    undone = rotary.unrotate(rotary.to_half_layout(rotated), rotary.model_angles(cos), rotary.model_angles(sin))
    assert rotary.interleaved == (model_type not in ("llama", "gpt_neox", "gemma3"))
    assert (undone - rotary.to_half_layout(raw)).abs().max() <= 1e-5
