"""Scaled RoPE types (linear, llama3, YaRN): the streaming cache must give their exact positions too.

YaRN is the case that bites: its RoPE multiplies cos and sin by an attention factor, so the model's rotation at
position 0 (where the wrapper has the model rotate) is a scale, not the identity, and must be undone like any other.
"""

import copy
import sys

import pytest
import torch
from reference import naive_streaming_logits, rope, rope_of
from tiny_models import (SCALED_ROPES, block_sizes_covering, build_llama, dense_logits, feed_stream, make_wrapper,
                         max_abs_diff, random_ids)

from streaming_llm.fast import FastStreamingWrapper

TOLERANCE = 1e-4
POSITION_MODES = ["pos_shift", "rerotate", "absolute"]
N_SINK, WINDOW_SIZE, LENGTH = 3, 13, 60
FEEDINGS = {"tokens": [1], "blocks": [1, 7, 20, 2, 1, 9]}


@pytest.fixture(scope="module", params=sorted(SCALED_ROPES))
def scaled_model(request) -> torch.nn.Module:
    return build_llama(rope=request.param)


def test_reference_rope_is_the_models(scaled_model):
    """The reference's frequencies and attention factor rotate as the model's own RoPE does, YaRN's factor > 1."""
    inv_freq, scaling = rope_of(scaled_model.config)
    rotary = scaled_model.model.rotary_emb
    assert torch.equal(inv_freq, rotary.inv_freq) and scaling == rotary.attention_scaling
    assert (scaling > 1.05) == (scaled_model.config.rope_parameters["rope_type"] == "yarn")
    positions = torch.tensor([0, 1, 9, 70, 255])
    x = torch.randn(1, 2, len(positions), 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rotary(x, positions[None])
    expected, _ = sys.modules[type(scaled_model).__module__].apply_rotary_pos_emb(x, x, cos, sin)
    assert max_abs_diff(rope(x, positions, inv_freq, scaling), expected) <= 1e-6


@pytest.mark.parametrize("feeding", sorted(FEEDINGS))
@pytest.mark.parametrize("streaming_mode", ["ours", "mit"])
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_no_eviction_equals_dense(scaled_model, position_mode, streaming_mode, feeding):
    input_ids = random_ids(LENGTH, seed=4)
    wrapper = make_wrapper(scaled_model, N_SINK, LENGTH, position_mode=position_mode, streaming_mode=streaming_mode)
    streamed = feed_stream(wrapper, input_ids, block_sizes_covering(LENGTH, FEEDINGS[feeding]))
    assert max_abs_diff(streamed, dense_logits(scaled_model, input_ids)) <= TOLERANCE


@pytest.mark.parametrize("feeding", sorted(FEEDINGS))
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_eviction_matches_reference(scaled_model, position_mode, feeding):
    input_ids = random_ids(LENGTH, seed=5)
    expected = naive_streaming_logits(scaled_model, input_ids, N_SINK, WINDOW_SIZE, position_mode)
    for streaming_mode in ("ours", "mit"):
        wrapper = make_wrapper(scaled_model, N_SINK, WINDOW_SIZE, position_mode=position_mode, streaming_mode=streaming_mode)
        streamed = feed_stream(wrapper, input_ids, block_sizes_covering(LENGTH, FEEDINGS[feeding]))
        assert max_abs_diff(streamed, expected) <= TOLERANCE, streaming_mode


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_static_step_matches_reference(scaled_model, position_mode):
    """The fast path's step lets the model's RoPE rotate at the window frame (YaRN's factor included) and moves
    the sinks by a relative rotation: it must land on the same logits."""
    input_ids = random_ids(LENGTH, seed=6)
    fast = FastStreamingWrapper(copy.deepcopy(scaled_model), N_SINK, WINDOW_SIZE, position_mode=position_mode,
                                compile="never")
    streamed = feed_stream(fast, input_ids, block_sizes_covering(LENGTH, [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 12]))
    expected = naive_streaming_logits(scaled_model, input_ids, N_SINK, WINDOW_SIZE, position_mode)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


def test_rope_types_that_change_with_the_sequence_length_are_refused(monkeypatch):
    """Dynamic NTK recomputes its frequencies once a sequence passes the trained context, so the positions a stream
    gives would rotate differently at different times: refused, by name, before any token is fed."""
    monkeypatch.setitem(SCALED_ROPES, "dynamic", dict(rope_type="dynamic", factor=2.0))
    model = build_llama(rope="dynamic")
    with pytest.raises(ValueError, match="RoPE type 'dynamic' changes its frequencies with the sequence length"):
        make_wrapper(model, N_SINK, WINDOW_SIZE)


def test_a_rope_per_layer_type_keeps_each_types_attention_factor():
    """Gemma 3's rotary embedding keeps an attention factor per layer type (`{layer_type}_attention_scaling`): with YaRN
    on its full-attention layer (factor ~1.14) and the default RoPE on its sliding one, fed at its stream positions
    (as generate() feeds it: the model's rotation is no mere scale there), each layer's q and k are undone and rotated
    with its own factor, so the stream equals the naive reference. (transformers 5.2 validates a per-type YaRN's
    original_max_position_embeddings at the config's top level, where it cannot be, so the YaRN parameters are set
    once the config is built.)"""
    from tiny_models import build_llama_family

    from streaming_llm import StreamingKVCache, prepare_model

    built = build_llama_family("gemma3_text", max_position_embeddings=256)
    config = copy.deepcopy(built.config)
    config.rope_parameters["full_attention"] = dict(SCALED_ROPES["yarn"], rope_theta=10000.0)
    model = type(built)(config).eval()
    model.load_state_dict(built.state_dict())
    rotary = model.model.rotary_emb
    assert rotary.full_attention_attention_scaling > 1.05 and rotary.sliding_attention_attention_scaling == 1.0
    input_ids = random_ids(LENGTH, seed=6)
    prepared, cache, logits = prepare_model(copy.deepcopy(model)), StreamingKVCache(N_SINK, WINDOW_SIZE), []
    for start, end in [(0, 20), *((t, t + 1) for t in range(20, LENGTH))]:
        logits.append(prepared(input_ids[None, start:end], position_ids=torch.arange(start, end)[None],
                               past_key_values=cache).logits[0])
    expected = naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE)
    assert max_abs_diff(torch.cat(logits), expected) <= TOLERANCE
