"""Behaviour of the core cache (streaming_llm/cache.py, streaming_llm/fast.py) that no other test pinned down, found by
a mutation-testing audit.

Each test here fails on at least one small change to those files (a changed number, a flipped comparison) that the
rest of the suite let through.
"""

from __future__ import annotations

import copy

import pytest
import torch

from streaming_llm import StreamingKVCache, StreamingLLMWrapper, prepare_model

from tiny_models import random_ids


def test_a_first_pass_stopped_after_the_first_layer_is_named_with_each_layers_count(llama_model):
    """The error says how many tokens each layer took: the first layer the stopped pass's 10, the layer it never
    reached none (the numbers a user compares to see which pass was cut)."""
    model = copy.deepcopy(llama_model)
    wrapper = StreamingLLMWrapper(model, 2, 6)
    ids = random_ids(10, seed=7)[None]

    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[0].register_forward_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        wrapper(ids)
    handle.remove()
    with pytest.raises(RuntimeError, match="its first layer has taken 10 tokens of the stream, a later one 0, "):
        wrapper(ids)


@pytest.mark.parametrize("hooked", [False, True], ids=["plain", "accelerate_hook"])
def test_the_autograd_warning_points_at_the_users_call_of_the_model(llama_model, hooked):
    """Attributed to the user's line that ran the model, not to the model's attention that called `cache.update`
    (where a fixed stacklevel pointed) nor to a frame of torch's module machinery above it. A model under an
    accelerate hook (device_map, offloading) runs its forward through accelerate's wrapper, whose line in
    accelerate/hooks.py it named."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    model = prepare_model(copy.deepcopy(llama_model))
    if hooked:
        add_hook_to_module(model, ModelHook())
    with torch.enable_grad(), pytest.warns(UserWarning, match="autograd on") as caught:
        model(random_ids(4, seed=3)[None], past_key_values=StreamingKVCache(2, 4))
    (warning,) = [warning for warning in caught if "autograd on" in str(warning.message)]
    assert warning.filename == __file__


def test_generate_never_compiles_the_model_around_a_streaming_cache(llama_model, monkeypatch):
    """`is_compileable` is False: transformers compiles generate()'s decode steps for a static-shaped cache (on a GPU,
    or anywhere with `_compile_all_devices`), and this cache's layers change shape as the stream grows."""
    from transformers import CompileConfig

    def refuse(*args, **kwargs):
        raise AssertionError("torch.compile called")

    monkeypatch.setattr(torch, "compile", refuse)
    compile_everywhere = CompileConfig()
    compile_everywhere._compile_all_devices = True  # (transformers' own switch: compile on a CPU too)
    model = prepare_model(copy.deepcopy(llama_model))
    ids = random_ids(5, seed=4)[None]
    output = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=StreamingKVCache(2, 4),
                            max_new_tokens=3, do_sample=False, compile_config=compile_everywhere)
    assert output.shape == (1, 8)


def test_freeze_weights_freezes_the_full_buffers_step_not_the_filling_one(llama_model, monkeypatch):
    """The step a long stream runs (every slot filled) is the frozen one; the filling step serves only the first
    window_size tokens. Here torch.compile is the identity and freezing a marker, so the steps run eagerly."""
    from streaming_llm import FastStreamingWrapper, fast

    frozen_steps = []

    def mark_frozen(step):
        frozen_steps.append(step)
        return step

    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    monkeypatch.setattr(fast, "frozen", mark_frozen)
    wrapper = FastStreamingWrapper(copy.deepcopy(llama_model), 2, 4, compile="always", freeze_weights=True)
    ids = random_ids(10, seed=5)[None]
    for t in range(ids.shape[1]):
        wrapper(ids[:, t : t + 1])
    assert set(wrapper._compiled) == {False, True}
    assert frozen_steps == [wrapper._compiled[False]]
