"""rerotate_keys: turning keys already rotated at p into keys rotated at q = p + delta.

Property (SEMANTICS §2, rerotate mode): rerotate_keys(rope(k, p), q - p) == rope(k, q), with rope() from the
naive reference. fp32, max |Δ| <= 1e-5 at the positions a cache meets (a few hundred at most).
"""

import importlib

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


def test_deltas_per_stream_of_a_batch():
    """A LongTensor delta [batch, 1, seq] (broadcast over the heads, as [..., seq] allows) moves each stream's keys by
    its own amounts: streams of a batch at different positions."""
    generator = torch.Generator().manual_seed(6)
    keys = raw_keys(10, seed=6)
    frequencies = inv_freq(HEAD_DIM)
    old_positions = torch.randint(0, 200, (2, 10), generator=generator)
    new_positions = torch.randint(0, 200, (2, 10), generator=generator)
    rotated = torch.stack([rope(keys[row], old_positions[row], frequencies) for row in range(2)])
    moved = rerotate_keys(rotated, (new_positions - old_positions)[:, None], frequencies)
    expected = torch.stack([rope(keys[row], new_positions[row], frequencies) for row in range(2)])
    assert max_abs_diff(moved, expected) <= TOLERANCE


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


@pytest.mark.parametrize("model_type", ["cohere", "cohere2", "glm", "glm4", "helium", "ernie4_5", "ernie4_5_moe",
                                        "llama", "gpt_neox", "gemma3"])
def test_a_models_keys_as_its_own_rope_rotates_them_are_rerotated_and_undone_in_its_layout(model_type):
    """A model's keys, as its own RoPE rotates them (Cohere and Cohere 2: interleaved, angles interleaved; GLM, GLM-4,
    Helium, ERNIE 4.5: interleaved, angles as [a, a], GLM's on half of each head; Llama, GPT-NeoX, Gemma 3's language
    model: rotate-half): re-rotated in the model's order they land where the model puts them; in rotate-half order
    with the model's angles brought to that order they are undone exactly; queries and keys permuted alike keep every
    score. (Only Cohere and GLM were checked once: a wrong layout entry for any other type went unnoticed.)"""
    from tiny_models import build_gemma3_multimodal, build_gpt_neox, build_llama_family

    from streaming_llm.models import adapter_for, attention_shape, describe

    builders = {"gpt_neox": build_gpt_neox, "gemma3": build_gemma3_multimodal}
    model = builders[model_type]() if model_type in builders else build_llama_family(model_type)
    architecture = describe(model)
    rotary = architecture.rotary
    assert rotary.interleaved == (model_type not in ("llama", "gpt_neox", "gemma3"))
    assert rotary.interleaved_angles == (model_type in ("cohere", "cohere2"))
    apply = importlib.import_module(type(model).__module__).apply_rotary_pos_emb  # the model's own RoPE
    head_dim = attention_shape(model.config).head_dim
    raw = torch.randn(1, 2, 5, head_dim, generator=torch.Generator().manual_seed(3))  # [batch, heads, seq, head_dim]
    positions = torch.tensor([[0, 3, 7, 20, 41]])
    rotary_emb = adapter_for(model.config).rotary_embedding(model)
    per_type = {"layer_type": architecture.attention_modules[0].layer_type} if model_type == "gemma3" else {}

    def model_rope(x, shift=0):
        cos, sin = rotary_emb(x, positions + shift, **per_type)
        return apply(x, x, cos, sin)[0], cos, sin

    rotated, cos, sin = model_rope(raw)
    assert max_abs_diff(rotary.rerotate(rotated, 9), model_rope(raw, 9)[0]) <= 1e-5
    undone = rotary.unrotate(rotary.to_half_layout(rotated), rotary.model_angles(cos), rotary.model_angles(sin))
    assert max_abs_diff(undone, rotary.to_half_layout(raw)) <= 1e-5
    assert torch.equal(rotary.to_model_layout(rotary.to_half_layout(raw)), raw)
    query = torch.randn(1, 2, 1, head_dim, generator=torch.Generator().manual_seed(4))
    scores = query @ rotated.transpose(-1, -2)
    assert max_abs_diff(rotary.to_half_layout(query) @ rotary.to_half_layout(rotated).transpose(-1, -2), scores) <= 1e-5
