"""Behaviour of streaming_llm/models/ that no other test pinned down (found by mutation testing)."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_models import build_llama

from streaming_llm.models import attention_shape, describe


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

