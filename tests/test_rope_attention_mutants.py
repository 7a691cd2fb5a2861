"""Behaviour of the position code (streaming_llm/rope.py, streaming_llm/attention.py) that no other test pinned down,
found by the fourth mutation round.

Each test here fails on at least one small change to those files (a changed index, a flipped comparison) that the
rest of the suite let through.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from reference import rope
from test_rope import inv_freq, raw_keys
from tiny_models import build_llama_family, max_abs_diff, random_ids

from streaming_llm import StreamingKVCache, prepare_model, rerotate_keys
from streaming_llm.models import describe
from streaming_llm.rope import RotaryParams

TOLERANCE = 1e-5


def test_a_batch_as_large_as_the_rotated_features_rotates_each_stream_as_alone():
    """A partly rotary model (4 of 16 features rotated) with a batch of 4 streams: every stream's keys move as they
    would alone, the features past the rotated ones untouched (the batch axis is not the feature axis)."""
    frequencies = inv_freq(4)
    keys = torch.randn(4, 3, 6, 16, generator=torch.Generator().manual_seed(21))
    positions = torch.arange(10, 16)
    moved = rerotate_keys(rope(keys, positions, frequencies), 7, frequencies, rotary_ndims=4)
    assert max_abs_diff(moved, rope(keys, positions + 7, frequencies)) <= TOLERANCE
    assert torch.equal(moved[..., 4:], keys[..., 4:])


def test_a_delta_per_stream_moves_every_key_of_that_stream():
    """A LongTensor delta [batch, 1, 1] (one number per stream, broadcast over the heads and the keys, as the
    docstring's 'broadcastable to [..., seq]' allows) moves each stream's keys by its own amount."""
    keys = raw_keys(9, seed=22)
    frequencies = inv_freq(16)
    positions = torch.arange(30, 39)
    rotated = rope(keys, positions, frequencies)
    moved = rerotate_keys(rotated, torch.tensor([-5, 12])[:, None, None], frequencies)
    assert max_abs_diff(moved[0], rope(keys[0], positions - 5, frequencies)) <= TOLERANCE
    assert max_abs_diff(moved[1], rope(keys[1], positions + 12, frequencies)) <= TOLERANCE


@pytest.mark.parametrize("shape", [(7, 16), (3, 7, 16)], ids=["one_head", "heads"])
def test_per_token_deltas_for_keys_without_a_batch_axis(shape):
    """Keys [seq, head_dim] (one head) or [heads, seq, head_dim] with a delta per key: the sequence axis is the one
    before the features, wherever the tensor starts; a delta of the wrong length is still refused."""
    keys = torch.randn(*shape, generator=torch.Generator().manual_seed(23))
    frequencies = inv_freq(16)
    positions = torch.arange(7) * 3
    delta = torch.arange(7) - 2
    moved = rerotate_keys(rope(keys, positions, frequencies), delta, frequencies)
    assert max_abs_diff(moved, rope(keys, positions + delta, frequencies)) <= TOLERANCE
    with pytest.raises(ValueError, match="last dimension must be 1 or the keys' sequence length 7"):
        rerotate_keys(keys, torch.arange(shape[-1]), frequencies)


def test_a_models_rope_parameters_cannot_be_changed_through_one_layer():
    """The layers of a model share one RotaryParams (docs: `layer_rotaries`, the same object for layers that share
    it): it is immutable, so no layer can change another's frequencies, and it can key a dict (hashable)."""
    model = build_llama_family("glm")
    layer_rotaries = describe(model).layer_rotaries
    assert layer_rotaries[0] is layer_rotaries[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer_rotaries[0].rotary_ndims = 16
    assert {layer_rotaries[0]: "shared"}[layer_rotaries[1]] == "shared"


def test_rope_parameters_given_frequencies_alone_are_the_rotate_half_layout():
    """RotaryParams(inv_freq, rotary_ndims) is Llama's layout: queries, keys and the model's angles are taken as they
    are (the interleaved layouts are asked for by name)."""
    rotary = RotaryParams(inv_freq(8), 8)
    assert not rotary.interleaved and not rotary.interleaved_angles
    x = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(24))
    assert torch.equal(rotary.to_half_layout(x), x) and torch.equal(rotary.to_model_layout(x), x)
    angles = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(25))
    assert torch.equal(rotary.model_angles(angles), angles)


def test_an_interleaved_partly_rotary_layout_keeps_the_unrotated_features_whatever_the_other_axes():
    """GLM rotates pairs (2i, 2i + 1) in 8 of its 16 features per head: brought to rotate-half order, the 8 rotated
    features are reordered and the other 8 kept, also when the batch, the heads or the sequence is 8 long (the
    feature axis is the last one), and the model's layout is recovered exactly."""
    rotary = describe(build_llama_family("glm")).rotary
    assert rotary.interleaved and rotary.rotary_ndims == 8
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    for shape in [(8, 2, 3, 16), (1, 8, 3, 16), (1, 2, 8, 16)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(26))
        half = rotary.to_half_layout(x)
        assert torch.equal(half[..., :8], x[..., order]) and torch.equal(half[..., 8:], x[..., 8:]), shape
        assert torch.equal(rotary.to_model_layout(half), x), shape


@pytest.mark.parametrize("model_type", ["glm", "cohere"])
def test_an_interleaved_model_with_as_many_heads_streams_and_rows_as_rotated_features_streams_exactly(model_type):
    """GLM (rotary pairs (2i, 2i + 1), half of each 16-feature head rotated: 8 features) and Cohere (the same pairs,
    its angles interleaved too; 8 heads of 8 features, all rotated) with 8 heads and 8 key/value heads, a batch of 8
    streams, a first block of 8 tokens and single-token steps after it, fed to the model with a StreamingKVCache (the
    model rotates q and k at their stream positions, which the cache undoes with the model's angles): with no eviction
    the logits are the dense model's (each axis that is 8 long is one the rotation must not take for the features)."""
    model = build_llama_family(model_type, num_attention_heads=8, num_key_value_heads=8)
    assert describe(model).rotary.rotary_ndims == 8
    ids = random_ids(12, seed=27, batch=8)
    expected = model(ids, attention_mask=torch.ones_like(ids)).logits
    prepared = prepare_model(copy.deepcopy(model))
    cache = StreamingKVCache(2, 16)
    logits = [prepared(ids[:, :8], past_key_values=cache, use_cache=True).logits]
    logits += [prepared(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(8, 12)]
    assert max_abs_diff(torch.cat(logits, dim=1), expected) <= 1e-4


@pytest.mark.parametrize("model_dtype, autocast_dtype, autocast_in_attention", [
    (torch.float32, torch.bfloat16, True), (torch.bfloat16, torch.bfloat16, True), (torch.bfloat16, torch.float16, False),
    (torch.float16, torch.bfloat16, False)])
def test_the_streaming_attention_turns_autocast_off_only_under_the_other_half_dtype(
        llama_model, monkeypatch, model_dtype, autocast_dtype, autocast_in_attention):
    """Under torch.autocast the streaming attention runs as the model's own does (autocast on: a float32 model's
    matmuls in bfloat16, as the user asked), except for a half model under autocast of the other half dtype, whose
    torch.cat refuses the mix: only there is autocast off inside it, with the query in the model's dtype. (The stream
    is begun outside autocast, so that the cache holds the model's dtype.)"""
    from streaming_llm.cache import RingLayer
    from tiny_models import make_wrapper

    seen = []
    attend = RingLayer.attend

    def spy(self, query, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), query.dtype))
        return attend(self, query, *args, **kwargs)

    monkeypatch.setattr(RingLayer, "attend", spy)
    wrapper = make_wrapper(copy.deepcopy(llama_model).to(model_dtype), 2, 6)
    ids = random_ids(12, seed=28)[None]
    wrapper(ids[:, :4])
    del seen[:]
    with torch.autocast("cpu", dtype=autocast_dtype):
        wrapper(ids[:, 4:11])
        wrapper(ids[:, 11:12])
    assert len(seen) == 4 and {enabled for enabled, _ in seen} == {autocast_in_attention}
    if not autocast_in_attention:
        assert {dtype for _, dtype in seen} == {model_dtype}


def test_a_soft_capped_model_loaded_with_sdpa_runs_a_padded_batch_and_a_continued_block_densely_as_its_eager_one():
    """A prepared Gemma 2 loaded with SDPA, run without a StreamingKVCache (the written-out soft-capped softmax): a
    batch of two rows, the second left-padded, gives the eager model's logits for every real token (each row's output
    in its own row, the padding hidden), and a block of 4 tokens after an 8-token prefix in a DynamicCache sees the
    prefix and the block's earlier tokens, as the eager model's does."""
    from transformers import DynamicCache

    model = build_llama_family("gemma2")
    ids = random_ids(12, seed=29, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = model(ids, attention_mask=mask).logits
    prepared = copy.deepcopy(model)
    prepared.set_attn_implementation("sdpa")
    prepare_model(prepared)
    assert prepared.model.layers[0].self_attn.streaming_dense_attention == "sdpa"
    logits = prepared(ids, attention_mask=mask).logits
    assert not logits.isnan().any()
    assert max_abs_diff(logits[0], expected[0]) <= 1e-4 and max_abs_diff(logits[1, 3:], expected[1, 3:]) <= 1e-4

    def prefix_then_block(m):
        cache = DynamicCache(config=m.config)
        m(ids[:, :8], past_key_values=cache, use_cache=True)
        return m(ids[:, 8:], past_key_values=cache, use_cache=True).logits

    assert max_abs_diff(prefix_then_block(prepared), prefix_then_block(model)) <= 1e-4


@pytest.mark.parametrize("dtype, other", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_half_model_with_a_layer_without_rope_under_autocast_of_the_other_half_dtype(dtype, other):
    """SmolLM3 (its second layer rotates nothing, and no layer passes cos/sin to the cache) in one half dtype, its
    stream continued under autocast of the other: every layer attends with autocast off in the model's dtype, the
    layer without RoPE included (it has no angles to cast), within the half dtypes' tolerance of the stream without
    autocast (as test_fast_path's Llama)."""
    from tiny_models import make_wrapper

    model = build_llama_family("smollm3").to(dtype)
    ids = random_ids(16, seed=30)[None]

    def stream(autocast_dtype):
        wrapper = make_wrapper(model, 2, 6)
        logits = [wrapper(ids[:, :5]).float()]
        with torch.autocast("cpu", dtype=autocast_dtype or other, enabled=autocast_dtype is not None):
            logits += [wrapper(ids[:, 5:9]).float()] + [wrapper(ids[:, t : t + 1]).float() for t in range(9, 16)]
        return torch.cat(logits, dim=1)

    assert max_abs_diff(stream(other), stream(None)) < 0.3


def test_a_one_token_step_with_a_mask_of_that_token_only_is_named_as_such(llama_model):
    """A decode step of one token whose 2-D attention_mask covers that token only (not the stream before it) is named
    as such, as a block's is (test_validation), and the same step with a mask of the whole stream runs."""
    model = prepare_model(copy.deepcopy(llama_model))
    ids, cache = random_ids(8, seed=31)[None], StreamingKVCache(2, 4)
    model(ids[:, :6], past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask covers 1 tokens; as with any transformers cache it must cover"):
        model(ids[:, 6:7], attention_mask=torch.ones(1, 1, dtype=torch.long), past_key_values=cache)
    assert model(ids[:, 6:7], attention_mask=torch.ones(1, 7, dtype=torch.long), past_key_values=cache).logits.shape \
        == (1, 1, 128)
