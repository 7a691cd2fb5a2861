"""rerotate_keys: turning keys already rotated at p into keys rotated at q = p + delta.

Property (SEMANTICS §2, rerotate mode): rerotate_keys(rope(k, p), q - p) == rope(k, q), with rope() from the
naive reference. fp32, max |Δ| <= 1e-5 at the positions a cache meets (a few hundred at most).
"""

import pytest
import torch
from reference import rope
from streaming_llm import rerotate_keys
from tiny_models import max_abs_diff

TOLERANCE = 1e-5
HEAD_DIM = 16
THETA = 10000.0


def inv_freq(rotary_ndims: int) -> torch.Tensor:
    return 1.0 / (THETA ** (torch.arange(0, rotary_ndims, 2, dtype=torch.int64).float() / rotary_ndims))


def raw_keys(seq: int, seed: int = 0) -> torch.Tensor:
    """[batch=2, kv_heads=3, seq, HEAD_DIM] pre-RoPE keys."""
    return torch.randn(2, 3, seq, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rotary_ndims", [HEAD_DIM, 4], ids=["full", "partial"])
@pytest.mark.parametrize("delta", [1, 7, 64, -1, -5, -40, 0])
def test_scalar_delta_moves_keys_to_the_new_position(rotary_ndims, delta):
    keys = raw_keys(12)
    frequencies = inv_freq(rotary_ndims)
    old_positions = torch.arange(40, 52)
    rotated = rope(keys, old_positions, frequencies)
    moved = rerotate_keys(rotated, delta, frequencies, rotary_ndims=rotary_ndims)
    assert moved.shape == keys.shape and moved.dtype == keys.dtype
    assert max_abs_diff(moved, rope(keys, old_positions + delta, frequencies)) <= TOLERANCE
    # Features past rotary_ndims are never touched.
    assert torch.equal(moved[..., rotary_ndims:], rotated[..., rotary_ndims:])


@pytest.mark.parametrize("rotary_ndims", [HEAD_DIM, 4], ids=["full", "partial"])
def test_per_token_deltas(rotary_ndims):
    """A LongTensor delta [seq] moves each key by its own amount (as when a cache compacts around sinks)."""
    generator = torch.Generator().manual_seed(1)
    keys = raw_keys(20, seed=2)
    frequencies = inv_freq(rotary_ndims)
    old_positions = torch.randint(0, 200, (20,), generator=generator)
    new_positions = torch.randint(0, 200, (20,), generator=generator)
    rotated = rope(keys, old_positions, frequencies)
    moved = rerotate_keys(rotated, new_positions - old_positions, frequencies, rotary_ndims=rotary_ndims)
    assert max_abs_diff(moved, rope(keys, new_positions, frequencies)) <= TOLERANCE
    assert torch.equal(moved[..., rotary_ndims:], rotated[..., rotary_ndims:])


def test_full_rotary_is_the_default():
    keys = raw_keys(8, seed=3)
    frequencies = inv_freq(HEAD_DIM)
    rotated = rope(keys, torch.arange(8), frequencies)
    moved = rerotate_keys(rotated, 5, frequencies)
    assert max_abs_diff(moved, rope(keys, torch.arange(8) + 5, frequencies)) <= TOLERANCE
    # keys of one head, [seq, head_dim], as the docstring's [..., seq, head_dim] allows
    assert torch.equal(rerotate_keys(rotated[0, 0], 5, frequencies), moved[0, 0])


def test_zero_dim_tensor_delta_and_round_trip():
    keys = raw_keys(8, seed=4)
    frequencies = inv_freq(HEAD_DIM)
    rotated = rope(keys, torch.arange(30, 38), frequencies)
    there = rerotate_keys(rotated, torch.tensor(-30), frequencies)
    assert max_abs_diff(there, rope(keys, torch.arange(8), frequencies)) <= TOLERANCE
    back = rerotate_keys(there, torch.tensor(30), frequencies)
    assert max_abs_diff(back, rotated) <= TOLERANCE


def test_rerotation_composes():
    """Many small moves (as a cache makes one eviction at a time) add up to one big one."""
    keys = raw_keys(6, seed=5)
    frequencies = inv_freq(4)
    positions = torch.arange(100, 106)
    moved = rope(keys, positions, frequencies)
    for _ in range(50):
        moved = rerotate_keys(moved, -1, frequencies, rotary_ndims=4)
    assert max_abs_diff(moved, rope(keys, positions - 50, frequencies)) <= TOLERANCE
