"""The naive reference itself: it must equal the dense model when nothing is evicted, follow SEMANTICS.md's
closed form for positions, and see eviction when there is some."""

import sys

import pytest
import torch
from reference import inv_freq_of, naive_streaming_logits, positions_for, rope, rotary_ndims_of, visible_keys
from tiny_models import dense_logits, max_abs_diff, random_ids

TOLERANCE = 1e-4


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
def test_reference_matches_dense(model, position_mode):
    input_ids = random_ids(96, seed=10)
    dense = dense_logits(model, input_ids)
    assert max_abs_diff(naive_streaming_logits(model, input_ids, n_sink=4, window_size=None), dense) <= TOLERANCE
    # A window as long as the stream evicts nothing either.
    streamed = naive_streaming_logits(model, input_ids, n_sink=4, window_size=96, position_mode=position_mode)
    assert max_abs_diff(streamed, dense) <= TOLERANCE


def test_reference_rope_matches_transformers(model):
    """rope() here rotates exactly as the model's own rotary embedding does (full and partial rotary)."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_ndims = rotary_ndims_of(config)
    assert rotary_ndims == (head_dim if config.model_type == "llama" else head_dim // 4)
    positions = torch.tensor([0, 1, 5, 17, 63, 200, 1000])
    x = torch.randn(2, 3, len(positions), head_dim, generator=torch.Generator().manual_seed(0))
    body = model.model if config.model_type == "llama" else model.gpt_neox
    cos, sin = body.rotary_emb(x, positions[None])  # [1, seq, rotary_ndims]
    expected, _ = sys.modules[type(model).__module__].apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(inv_freq_of(config), body.rotary_emb.inv_freq)
    assert max_abs_diff(rope(x, positions, inv_freq_of(config)), expected) <= 1e-6


@pytest.mark.parametrize("n_sink", [0, 1, 4])
@pytest.mark.parametrize("window_size", [1, 3, 16])
def test_visible_keys_follow_the_closed_form(n_sink, window_size):
    """SEMANTICS §1-2: at most C+1 keys; pos-shift distances are t-p to window keys, min(t, C)-j to sinks."""
    capacity = n_sink + window_size
    for t in range(3 * capacity + 5):
        keys = visible_keys(t, n_sink, window_size)
        assert keys == sorted(set(keys)) and keys[-1] == t
        assert len(keys) == min(t + 1, capacity + 1)
        key_positions, query_position = positions_for(t, keys, "pos_shift")
        for key, key_position in zip(keys, key_positions.tolist()):
            expected_distance = min(t, capacity) - key if key < n_sink else t - key
            assert query_position - key_position == expected_distance
        key_positions, query_position = positions_for(t, keys, "absolute")
        assert key_positions.tolist() == keys and query_position == t


def test_reference_sees_eviction(model):
    """Tokens t <= C see the whole prefix (dense); later ones do not, and that shows in the logits."""
    n_sink, window_size = 4, 16
    capacity = n_sink + window_size
    input_ids = random_ids(64, seed=11)
    dense = dense_logits(model, input_ids)
    streamed = naive_streaming_logits(model, input_ids, n_sink, window_size)
    assert max_abs_diff(streamed[: capacity + 1], dense[: capacity + 1]) <= TOLERANCE
    assert max_abs_diff(streamed[capacity + 1 :], dense[capacity + 1 :]) > 1e-2
