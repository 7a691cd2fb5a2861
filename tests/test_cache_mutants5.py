"""Behaviour of the streaming KV cache (streaming_llm/cache.py) that no other test pinned down, found by the fifth
mutation round, which ran the cache's mutants the earlier rounds' sample had left out.

Each test here fails on at least one small change to cache.py (a changed number, a flipped comparison) that the rest
of the suite let through.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_llama, random_ids

from streaming_llm import FastStreamingWrapper, StreamingKVCache, StreamingLLMWrapper


def test_a_stream_held_in_bfloat16_refuses_the_model_cast_to_float32_after_it_began():
    """A model cast to a wider dtype after its stream began is refused ("another shape, dtype or device"), as the
    narrower cast is: the held keys are not silently widened outside autocast. Both where the layers took their
    buffers from the stream's first keys (StreamingLLMWrapper) and where a FastStreamingWrapper gave them."""
    ids = random_ids(12, seed=11)[None]
    for make in (StreamingLLMWrapper, FastStreamingWrapper):
        model = build_llama().to(torch.bfloat16)
        wrapper = make(model, 2, 6)
        wrapper(ids[:, :8])
        cache = wrapper.cache
        model.float()
        with pytest.raises(ValueError, match="holds keys of another shape, dtype or device"):
            model(ids[:, 8:], past_key_values=cache, use_cache=True)
        assert all(layer.values.dtype == torch.bfloat16 for layer in cache.layers)


def test_under_autocast_a_steps_keys_are_held_in_the_layers_dtype_whichever_of_keys_and_values_differs():
    """Under torch.autocast a step's keys and values are both cast to the dtype the layer holds, also where only the
    keys come in autocast's dtype (the values already in the layer's): what update hands on is one dtype."""
    from streaming_llm.cache import RingLayer
    from streaming_llm.positions import PositionPolicy

    layer = RingLayer(PositionPolicy("pos_shift", 2, 4), {})
    keys, values = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    layer.update(keys, values)  # begun outside autocast: held in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        held_keys, held_values = layer.update(keys[:, :, :1].bfloat16(), values[:, :, :1])
    assert (held_keys.dtype, held_values.dtype) == (torch.float32, torch.float32)
    assert layer.pending["keys"].dtype == torch.float32


def test_a_streaming_cache_has_no_maximum_length_as_transformers_dynamic_caches():
    """get_max_cache_shape() is -1, transformers' value for a cache without a maximum sequence length (the stream
    goes on for ever; `max_cache_len` is what it holds), also once every layer holds tokens."""
    from tiny_models import make_wrapper

    wrapper = make_wrapper(build_llama(), 2, 4)
    wrapper(random_ids(9, seed=3)[None])
    cache = wrapper.cache
    assert [cache.get_max_cache_shape(index) for index in range(len(cache.layers))] == [-1] * len(cache.layers)
    assert cache.max_cache_len == 6


def test_each_layer_holds_the_batchs_streams_not_its_heads():
    """A layer's max_batch_size (transformers' layer attribute) is the number of streams it holds: 3 here, on a model
    of 2 kv heads."""
    from tiny_models import make_wrapper

    wrapper = make_wrapper(build_llama(), 2, 4)
    wrapper(random_ids(5, seed=2, batch=3))
    assert [layer.max_batch_size for layer in wrapper.cache.layers] == [3] * len(wrapper.cache.layers)
    assert wrapper.cache.layers[0].keys.shape[1] != 3 and wrapper.cache.max_batch_size == 3


def test_a_long_block_is_attended_in_pieces_of_capacity_plus_one_tokens(monkeypatch):
    """docs/semantics.md §7: a block of more than C + 1 tokens is attended by each layer in pieces of C + 1 (each
    stored and the frame moved before the next), the last piece what is left; a block of at most C + 1 in one piece."""
    from tiny_models import make_wrapper

    from streaming_llm.cache import StreamingLayer

    pieces = []
    attend_block = StreamingLayer.attend_block

    def record(self, query_raw, *args, **kwargs):
        if self is wrapper.cache.layers[0]:
            pieces.append(query_raw.shape[-2])
        return attend_block(self, query_raw, *args, **kwargs)

    monkeypatch.setattr(StreamingLayer, "attend_block", record)
    wrapper = make_wrapper(build_llama(), 2, 4)  # C + 1 = 7
    ids = random_ids(27, seed=5)[None]
    wrapper(ids[:, :7])
    wrapper(ids[:, 7:])
    assert pieces == [7, 7, 7, 6]


def test_mits_pos_shift_rotates_every_key_and_query_at_its_cache_index(monkeypatch):
    """streaming_mode="mit" with pos_shift is MIT's scheme (docs/semantics.md §2, §7): keys kept un-rotated and rotated
    at their cache index each step, so no position exceeds C, the newest token's slot (its key and query are rotated
    there), however long the stream and whether it is fed token by token or in blocks."""
    from tiny_models import make_wrapper

    from streaming_llm.rope import RotaryParams

    highest = []
    rotate = RotaryParams.rotate

    def record(self, x, positions):
        if positions.numel():
            highest.append(int(positions.max()))
        return rotate(self, x, positions)

    monkeypatch.setattr(RotaryParams, "rotate", record)
    wrapper = make_wrapper(build_llama(), 2, 4, streaming_mode="mit", position_mode="pos_shift")  # C = 6
    ids = random_ids(40, seed=9)[None]
    for start, stop in ((0, 3), (3, 4), (4, 12), (12, 13), (13, 30), *((t, t + 1) for t in range(30, 39))):
        wrapper(ids[:, start:stop])
    assert max(highest) == 6
    highest.clear()
    wrapper(ids[:, 39:])
    assert highest.count(6) == 3 * 2 and max(highest) == 6  # its key and its queries to the window and the sinks, per layer


def test_a_sliding_layer_masks_a_step_only_from_the_token_its_window_first_hides_a_key_from():
    """Absolute positions, every layer sliding with a window of 8 (wider than the ring): the decode step of tokens 0..7
    is computed as for a layer without a window (its farthest key, sink 0, is at most 7 away: no mask), and from token
    8 on sink 0 is hidden, so the step is masked (`hiding_window`)."""
    from tiny_models import build_llama_family, make_wrapper

    from streaming_llm.cache import RingLayer

    masked_at = []
    window_mask = RingLayer._window_mask

    def record(self, sliding_window, filled):
        masked_at.append(self.seen)
        return window_mask(self, sliding_window, filled)

    wrapper = make_wrapper(build_llama_family("mistral", sliding_window=8), 2, 4, position_mode="absolute")
    ids = random_ids(11, seed=4)[None]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RingLayer, "_window_mask", record)
        for t in range(11):
            wrapper(ids[:, t : t + 1])
    assert sorted(set(masked_at)) == [8, 9, 10]


def test_a_block_writes_each_ring_slot_at_most_once(monkeypatch):
    """A block that evicts some of its own tokens stores only those it keeps: no two of its tokens go to one slot, so
    what a slot holds never rests on which of two writes lands last (index_copy_ leaves that undefined, and a GPU
    need not write in order). Here token n_sink (2) and token C + 1 (7) would share slot 2."""
    from tiny_models import make_wrapper

    from streaming_llm.cache import RingLayer

    written = []
    slots_of = RingLayer._slots

    def record(self, positions):
        slots = slots_of(self, positions)
        written.append(slots.tolist())
        return slots

    monkeypatch.setattr(RingLayer, "_slots", record)
    wrapper = make_wrapper(build_llama(), 2, 4)  # C + 1 = 7: a block's pieces are at most that long
    ids = random_ids(20, seed=6)[None]
    wrapper(ids[:, :1])
    wrapper(ids[:, 1:8])
    wrapper(ids[:, 8:9])
    wrapper(ids[:, 9:20])
    assert written and all(len(set(slots)) == len(slots) for slots in written)
    assert wrapper.cache.kept_positions().tolist() == [0, 1, 16, 17, 18, 19]


def test_a_cache_made_without_arguments_has_the_wrappers_defaults():
    """StreamingKVCache() is the paper's configuration, as the wrappers' defaults: 4 sinks and a window of 1,020
    (capacity 1,024), pos-shift positions, the ring storage."""
    cache = StreamingKVCache()
    assert (cache.n_sink, cache.window_size, cache.cache_capacity) == (4, 1020, 1024)
    assert (cache.position_mode, cache.streaming_mode) == ("pos_shift", "ours")
    wrapper = StreamingLLMWrapper(build_llama())
    assert (wrapper.cache.n_sink, wrapper.cache.window_size) == (cache.n_sink, cache.window_size)


def test_a_later_pass_stopped_after_the_first_layer_is_named_with_each_layers_count(llama_model):
    """After a whole pass, a pass stopped after the first layer leaves it ahead of the deepest: the refusal at the
    next call gives the first layer's count (10 + 3) and the deepest one's (10), the numbers a user compares."""
    wrapper = StreamingLLMWrapper(copy.deepcopy(llama_model), 2, 6)
    ids = random_ids(16, seed=8)[None]
    wrapper(ids[:, :10])

    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = wrapper.model.model.layers[0].register_forward_hook(stop)
    with pytest.raises(KeyboardInterrupt):
        wrapper(ids[:, 10:13])
    handle.remove()
    with pytest.raises(RuntimeError, match="its first layer has taken 13 tokens of the stream, a later one 10, "):
        wrapper(ids[:, 13:])


def test_compress_and_the_mask_sizes_default_to_the_first_layer():
    """`compress()` without a layer is layer 0's kept keys and values (as its signature says), not another layer's;
    `get_mask_sizes` without a layer is layer 0's too: its held tokens plus the step's, on a one-layer model also."""
    from tiny_models import build_llama_family, make_wrapper

    wrapper = make_wrapper(build_llama(), 2, 4)
    wrapper(random_ids(9, seed=12)[None])
    cache = wrapper.cache
    for default, first in zip(cache.compress(), cache.compress(0)):
        assert torch.equal(default, first)
    one_layer = make_wrapper(build_llama_family("llama", num_hidden_layers=1), 2, 4)
    one_layer(random_ids(9, seed=12)[None])
    assert one_layer.cache.get_mask_sizes(torch.arange(9, 10)) == (6 + 1, 0)


def test_the_fused_cpu_kernel_takes_every_block_without_new_sink_tokens_and_nothing_else():
    """The fused CPU flash path (a speed path: its numbers equal the general path's, so only this predicate shows
    whether it is taken) is for float32 and bfloat16 on the CPU outside autocast, for any block whose first token
    is at or after the sinks, the block that begins right after them included."""
    from streaming_llm.cache import _can_use_fused_cpu_attention
    from streaming_llm.positions import PositionPolicy

    policy = PositionPolicy("pos_shift", 4, 8)
    query = torch.zeros(1, 2, 3, 8)
    assert _can_use_fused_cpu_attention(query, torch.tensor([4, 5, 6]), policy)
    assert _can_use_fused_cpu_attention(query.bfloat16(), torch.tensor([20, 21, 22]), policy)
    assert not _can_use_fused_cpu_attention(query, torch.tensor([3, 4, 5]), policy)  # a new sink token
    assert not _can_use_fused_cpu_attention(query.half(), torch.tensor([4, 5, 6]), policy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _can_use_fused_cpu_attention(query, torch.tensor([4, 5, 6]), policy)


def test_grouped_attention_is_each_query_heads_attention_in_its_place():
    """grouped_attention (the written-out path for soft-capped and sink-logit models) gives [batch, heads, n, dv],
    query head h attending kv head h // groups, for a batch, head count and block length that all differ."""
    from test_fast_mutants5 import naive_attention

    from streaming_llm.cache import grouped_attention

    generator = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, n, m, dim = 3, 4, 2, 5, 7, 8
    query = torch.randn(batch, heads, n, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, m, dim, generator=generator)
    values = torch.randn(batch, kv_heads, m, dim, generator=generator)
    got = grouped_attention(query, keys, values, 0.5)
    assert got.shape == (batch, heads, n, dim)
    assert torch.allclose(got, naive_attention(query, keys, values, None, 0.5), atol=1e-5)
