"""Layers with their own sliding window inside a larger cache (docs/semantics.md, "Layers with their own sliding
window"): a hybrid model's sliding layers (Gemma 2 and 3, Cohere 2, EXAONE 4, OLMo 3, ...) see, of the keys
SEMANTICS.md §1 gives every layer, those nearer than their window in the mode's positions; its full-attention layers
see the whole cache. Held against the model itself (no eviction: its own sliding-window masks) and the naive
reference (eviction), on the general path, the static step, MIT mode and the compiled step."""

import copy
from unittest import mock

import pytest
import torch
from reference import naive_streaming_logits
from tiny_models import (block_sizes_covering, build_gemma3_multimodal, build_llama_family, check_compiled_step_graphs,
                         dense_logits, feed_stream, make_wrapper, max_abs_diff, random_ids)

from streaming_llm import StreamingKVCache, prepare_model
from streaming_llm.cache import kv_cache_bytes
from streaming_llm import cache as cache_module
from streaming_llm.fast import FastStreamingWrapper
from streaming_llm.models import check_capacity, sliding_windows
from streaming_llm.positions import PositionPolicy, visible, visible_in_layer

TOLERANCE = 1e-4
WINDOW, LENGTH = 8, 48
# Every supported type whose layers mix sliding and full attention, with a window of 8 tokens.
HYBRID = {**{model_type: dict(sliding_window=WINDOW) for model_type in (
    "gemma2", "gemma3_text", "vaultgemma", "cohere2", "exaone4", "exaone_moe", "cwm", "afmoe", "gpt_oss")},
    "olmo3": dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
    # Qwen2-MoE slides through its mask only: it does not pass its window on to the attention function.
    **{model_type: dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=1)
       for model_type in ("qwen2", "qwen2_moe", "qwen3")},
    "smollm3": dict(sliding_window=WINDOW, use_sliding_window=True)}  # its layer without RoPE slides
# Every layer slides where the config sets a window (PhiMoE, Mixtral: through the mask only).
EVERY_LAYER = {model_type: dict(sliding_window=WINDOW) for model_type in ("mistral", "ministral", "phimoe", "mixtral")}


def build(model_type):
    if model_type == "gemma3":
        return build_gemma3_multimodal(sliding_window=WINDOW)
    return build_llama_family(model_type, **{**HYBRID, **EVERY_LAYER}[model_type])


@pytest.fixture(scope="module", params=[*sorted(HYBRID), "gemma3"])
def hybrid_model(request):
    model = build(request.param)
    windows = sliding_windows(model.config)
    assert WINDOW in windows and None in windows, windows  # both kinds of layer
    return model


def stream(model, input_ids, n_sink, window_size, position_mode="pos_shift", blocks=(5, 1, 13)):
    """Logits of the general path in blocks, of the static step token by token and of MIT mode (pos_shift only)."""
    results = {"general": feed_stream(make_wrapper(model, n_sink, window_size, position_mode=position_mode), input_ids,
                                      block_sizes_covering(input_ids.shape[0], list(blocks))),
               "static": feed_stream(FastStreamingWrapper(copy.deepcopy(model), n_sink, window_size,
                                                          position_mode=position_mode, compile="never"), input_ids)}
    if position_mode == "pos_shift":
        results["mit"] = feed_stream(make_wrapper(model, n_sink, window_size, streaming_mode="mit"), input_ids,
                                     block_sizes_covering(input_ids.shape[0], list(blocks)))
    return results


def test_a_cache_larger_than_the_sliding_window_without_eviction_is_the_model(hybrid_model):
    """Capacity 50 > window 8 and nothing evicted: the sliding layers keep the model's own window (before, such a
    cache was refused: every layer saw the whole cache, which the model's sliding layers never do)."""
    input_ids = random_ids(LENGTH, seed=31)
    dense = dense_logits(hybrid_model, input_ids)
    for path, logits in stream(hybrid_model, input_ids, 2, LENGTH, blocks=(1, 9, 1, 20)).items():
        assert max_abs_diff(logits, dense) <= TOLERANCE, path


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
@pytest.mark.parametrize("n_sink, window_size", [(2, 14), (0, 14), (2, 4)])
def test_sliding_layers_within_an_evicting_cache_match_the_reference(hybrid_model, position_mode, n_sink, window_size):
    """Capacity 16 (>= the window: the sinks leave the sliding layers' view once min(t, C) >= 8, the window's oldest
    keys too) and capacity 6 (< the window: nothing hidden under pos_shift; in absolute mode the sinks, at distance
    t, leave the sliding layers' view from t = 8 on, as the model's own mask would hide them)."""
    input_ids = random_ids(LENGTH, seed=32)
    expected = naive_streaming_logits(hybrid_model, input_ids, n_sink, window_size, position_mode)
    for path, logits in stream(hybrid_model, input_ids, n_sink, window_size, position_mode).items():
        assert max_abs_diff(logits, expected) <= TOLERANCE, path


@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss"])
@pytest.mark.parametrize("position_mode", ["pos_shift", "absolute"])
def test_long_blocks_attended_in_pieces_keep_the_sliding_window_soft_cap_and_sink_logits(model_type, position_mode):
    """Blocks of up to 30 tokens attended 3 at a time (BLOCK_PIECE): each piece sees what a sliding layer, Gemma 2's
    soft-capped scores and GPT-OSS's sink logits need."""
    model, input_ids = build(model_type), random_ids(LENGTH, seed=33)
    expected = naive_streaming_logits(model, input_ids, 2, 14, position_mode)
    with mock.patch.object(cache_module, "BLOCK_PIECE", 3):
        logits = feed_stream(make_wrapper(model, 2, 14, position_mode=position_mode), input_ids,
                             block_sizes_covering(LENGTH, [30, 1, 17]))
    assert max_abs_diff(logits, expected) <= TOLERANCE


@pytest.mark.parametrize("model_type", sorted(EVERY_LAYER))
def test_a_model_whose_every_layer_slides_keeps_its_capacity_below_the_window(model_type):
    """Mistral v0.1 / Ministral: no layer would ever see more than the window, sinks included, so a larger cache is
    refused, saying why; below the window, absolute mode's sinks still leave the view at distance 8."""
    model = build(model_type)
    with pytest.raises(ValueError, match=f"sliding_window={WINDOW}: .* every layer of this model sees only its last "
                                         f"{WINDOW}; use at most {WINDOW - 1}"):
        check_capacity(model.config, WINDOW)
    input_ids = random_ids(30, seed=33)
    expected = naive_streaming_logits(model, input_ids, 2, 4, "absolute")
    for path, logits in stream(model, input_ids, 2, 4, "absolute").items():
        assert max_abs_diff(logits, expected) <= TOLERANCE, path


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_oss"])
@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
@pytest.mark.parametrize("window_size", [WINDOW - 1, WINDOW - 2])
def test_a_sliding_layer_within_its_window_stores_only_that_window(model_type, position_mode, window_size):
    """A sliding layer whose window W is at most window_size + 1 (here W = 8 = 7 + 1, the largest such) keeps a ring
    of W slots and no sinks, on the general path and in the static step's buffers, and streams as the reference
    (Gemma 3's two RoPEs, GPT-OSS's sink logits); one more slot would be of no use to it. With window_size 6 it
    keeps its sink + a ring of window_size + 1 = 8 slots, as every layer did before."""
    model, input_ids = build(model_type), random_ids(LENGTH, seed=35)
    expected = naive_streaming_logits(model, input_ids, 1, window_size, position_mode)
    ring = WINDOW <= window_size + 1
    general = make_wrapper(model, 1, window_size, position_mode=position_mode)
    static = FastStreamingWrapper(copy.deepcopy(model), 1, window_size, position_mode=position_mode, compile="never")
    for wrapper, blocks in ((general, [5, 1, 13]), (static, [1])):
        assert max_abs_diff(feed_stream(wrapper, input_ids, block_sizes_covering(LENGTH, blocks)), expected) <= TOLERANCE
        layers = wrapper.cache.layers
        expected_slots = [WINDOW if ring and window else window_size + 2 for window in sliding_windows(model.config)]
        assert [layer.keys.shape[-2] for layer in layers] == expected_slots
        assert [layer.sink_keys.shape[-2] for layer in layers] == [0 if ring and window else 1
                                                                   for window in sliding_windows(model.config)]
        assert wrapper.cache.kept_positions().tolist() == [0, *range(LENGTH - window_size, LENGTH)]  # sinks + window
        first_sliding = sliding_windows(model.config).index(WINDOW)
        assert wrapper.cache.kept_positions(first_sliding).tolist() == (
            list(range(LENGTH - WINDOW + 1, LENGTH)) if ring else [0, *range(LENGTH - window_size, LENGTH)])
    assert [keys.shape[-2] for keys in static.keys] == expected_slots  # the buffers the compiled step writes


def held_bytes(tensors) -> int:
    """Bytes of these tensors' elements: what a cache's buffers take."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


@pytest.mark.parametrize("model_type, window_size, streaming_mode", [
    ("llama", 14, "ours"), ("llama", 14, "mit"), ("gemma3_text", 7, "ours"), ("gemma3_text", 6, "ours"),
    ("gpt_oss", 14, "ours"), ("gpt_oss", 14, "mit")])
def test_kv_cache_bytes_is_what_a_full_cache_holds(model_type, window_size, streaming_mode):
    """`kv_cache_bytes` (streaming-llm info's kv_cache_mib) equals the bytes of the keys and values a cache holds once
    full, counted from its tensors: the general path's layers and FastStreamingWrapper's buffers; sliding rings
    included (gemma3_text and gpt_oss with W = 8 <= window_size + 1), and not (window_size 6)."""
    model = build_llama_family(model_type) if model_type == "llama" else build(model_type)
    input_ids = random_ids(LENGTH, seed=36)
    expected = kv_cache_bytes(model.config, 2, window_size, streaming_mode)
    general = make_wrapper(model, 2, window_size, streaming_mode=streaming_mode)
    general(input_ids[None])
    names = ("keys", "values") if streaming_mode == "mit" else ("keys", "values", "sink_keys")
    assert held_bytes(getattr(layer, name) for layer in general.cache.layers for name in names) == expected
    if streaming_mode == "ours":
        fast = FastStreamingWrapper(copy.deepcopy(model), 2, window_size, compile="never")
        assert held_bytes((*fast.keys, *fast.values, *fast.sink_keys)) == expected


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_oss"])
@pytest.mark.parametrize("position_mode, n_sink, window_size", [
    ("pos_shift", 2, 6), ("rerotate", 4, 5), ("absolute", 2, 4)])
def test_one_token_steps_hide_exactly_the_keys_at_the_window_or_beyond(model_type, position_mode, n_sink, window_size):
    """Sliding layers without a sliding ring (W = 8 > window_size + 1), every token fed alone (the general path's
    decode step, and the static step): a held key at distance exactly W is hidden, one at W - 1 is seen. Capacity
    8 = W under pos_shift (from t = 8 on sink 0 sits at distance min(t, C) = 8, sink 1 at 7); 4 sinks and capacity 9
    under rerotate (sinks 2 and 3 stay at distances 7 and 6 however long the stream: a sink's distance is taken from
    the query's sink position min(t, C), not from t); absolute mode's sinks at distance t, hidden from t = 8 and 9."""
    model, input_ids = build(model_type), random_ids(24, seed=37)
    expected = naive_streaming_logits(model, input_ids, n_sink, window_size, position_mode)
    general = make_wrapper(model, n_sink, window_size, position_mode=position_mode)
    static = FastStreamingWrapper(copy.deepcopy(model), n_sink, window_size, position_mode=position_mode,
                                  compile="never")
    for path, wrapper in (("general", general), ("static", static)):
        assert max_abs_diff(feed_stream(wrapper, input_ids), expected) <= TOLERANCE, path


@pytest.mark.parametrize("window_size", [WINDOW - 1, WINDOW + 3])
def test_a_stream_begun_in_the_general_wrapper_goes_on_in_the_fast_one(window_size):
    """`fast.cache = general.cache` on Gemma 3's text model: its sliding layers' rings (W slots, no sinks, where
    W <= window_size + 1) and full layers' buffers are copied into the static step's, and the stream goes on as the
    reference does, past the point where every ring has wrapped."""
    model, input_ids = build("gemma3_text"), random_ids(LENGTH, seed=36)
    expected = naive_streaming_logits(model, input_ids, 1, window_size)
    general = make_wrapper(model, 1, window_size)
    general(input_ids[None, :19])
    fast = FastStreamingWrapper(copy.deepcopy(model), 1, window_size, compile="never")
    fast.cache = general.cache
    streamed = torch.cat([fast.step(input_ids[None, t : t + 1])[0] for t in range(19, LENGTH)])
    assert max_abs_diff(streamed, expected[19:]) <= TOLERANCE


def test_kv_cache_bytes_counts_every_stream_of_a_batch_in_the_models_dtype():
    """`kv_cache_bytes(dtype=, batch_size=)` is what FastStreamingWrapper allocates for 3 streams of a bfloat16 model
    (sliding rings included), not the bytes of one float32 stream."""
    import torch

    model = build("gemma3_text").to(torch.bfloat16)
    fast = FastStreamingWrapper(model, 2, 7, compile="never")
    fast.reset(batch_size=3)
    held = held_bytes((*fast.keys, *fast.values, *fast.sink_keys))
    assert held == kv_cache_bytes(model.config, 2, 7, dtype=torch.bfloat16, batch_size=3)
    assert held == 3 * kv_cache_bytes(model.config, 2, 7) // 2  # float32 -> bfloat16 halves each slot


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
@pytest.mark.parametrize("n_sink", [0, 2])
def test_distances_are_the_closed_form_of_semantics(position_mode, n_sink):
    """The distance a sliding layer's window is measured in (PositionPolicy.distances, SEMANTICS.md §2): t - p, but
    min(t, C) - j from query t to sink j under pos_shift and rerotate; for every query and key of a stream."""
    policy, t = PositionPolicy(position_mode, n_sink, 6), torch.arange(20)
    expected = t[:, None] - t[None, :]
    if position_mode != "absolute":
        expected[:, :n_sink] = t.clamp(max=n_sink + 6)[:, None] - t[None, :n_sink]
    assert torch.equal(policy.distances(t, t), expected)


@pytest.mark.parametrize("position_mode, n_sink, last_position, farthest", [
    ("pos_shift", 2, 100, 8), ("rerotate", 2, 100, 8), ("pos_shift", 2, 5, 5), ("absolute", 0, 100, 8),
    ("absolute", 2, 100, 100), ("absolute", 2, 5, 5)])
def test_a_window_hides_a_key_from_the_farthest_distance_on(position_mode, n_sink, last_position, farthest):
    """window_hides (whether a layer's window needs a mask at all, on the fast path a graph of its own): a key is at
    distance min(t, C) at most (sink 0, or the window's oldest key without sinks), t for a sink in absolute mode; a
    window of exactly that distance hides it, a wider one nothing; a layer without a window hides nothing."""
    policy = PositionPolicy(position_mode, n_sink, 8 - n_sink)  # capacity 8
    assert policy.window_hides(farthest, last_position)
    assert not policy.window_hides(farthest + 1, last_position)
    assert not policy.window_hides(None, last_position)


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
def test_a_layers_window_hides_the_keys_at_its_width_or_beyond(position_mode):
    """visible_in_layer (the general path's mask for a block of queries): of the keys SEMANTICS.md §1 gives query t,
    those at a distance below the layer's window of 4, the distance taken in the mode's positions; every query and
    key of a stream of 20 tokens, 2 sinks and a window of 6 (capacity 8)."""
    t = torch.arange(20)

    def seen(query, key):
        kept = key <= query and (key < 2 or key >= max(2, query - 6))
        distance = (min(query, 8) if key < 2 and position_mode != "absolute" else query) - key
        return kept and distance < 4

    expected = torch.tensor([[seen(query, key) for key in range(20)] for query in range(20)])
    assert torch.equal(visible_in_layer(PositionPolicy(position_mode, 2, 6), t, t, 4), expected)
    assert torch.equal(visible_in_layer(PositionPolicy(position_mode, 2, 6), t, t), visible(t, t, 2, 6))


def test_the_window_changes_what_a_sliding_layer_sees():
    """The tests above can fail: the same stream with the sliding layers' window left out (every layer sees the whole
    cache, as SEMANTICS.md §1 alone would say) is far from the reference."""
    model = build("gemma3_text")
    input_ids = random_ids(LENGTH, seed=32)
    expected = naive_streaming_logits(model, input_ids, 2, 14)
    ignoring_window = make_wrapper(model, 2, 14)
    for layer in ignoring_window.model.model.layers:
        layer.self_attn.streaming_window = None
    assert max_abs_diff(feed_stream(ignoring_window, input_ids), expected) > 0.1


@pytest.mark.parametrize("model_type", ["gemma3_text", "cohere2"])
def test_the_compiled_step_masks_the_sliding_layers_in_its_graph(model_type):
    """The static step computes the sliding layers' mask from t on the device, inside the one compiled graph."""
    check_compiled_step_graphs(build(model_type), 2, 14)


def test_generate_streams_a_hybrid_model_past_its_window():
    """model.generate with a StreamingKVCache larger than the sliding window: greedy tokens as the dense model's while
    nothing is evicted, and the stream goes on past the capacity."""
    import torch

    model = build("gemma3_text")
    prompt = random_ids(6, seed=34)[None]
    options = dict(do_sample=False, max_new_tokens=30, attention_mask=torch.ones_like(prompt))
    dense = model.generate(prompt, **options)
    streamed_model = prepare_model(copy.deepcopy(model))
    streamed = streamed_model.generate(prompt, past_key_values=StreamingKVCache(2, 40), **options)
    assert torch.equal(streamed, dense)
    cache = StreamingKVCache(2, 14)
    longer = streamed_model.generate(prompt, past_key_values=cache, **{**options, "max_new_tokens": 40})
    assert longer.shape[1] == 46 and cache.get_seq_length() == 45 and cache.get_cache_length() == 16
