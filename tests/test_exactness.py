"""Acceptance: the package's logits against dense, against each other, and against the naive reference.

"Equal" is max |Δlogit| <= 1e-4 in fp32 (SEMANTICS §6). Streams are fed token by token and in irregular
blocks, including a first block larger than the cache capacity: feeding n tokens at once must be exactly
feeding them one at a time.
"""

import copy

import pytest
import torch
from reference import naive_streaming_logits
from tiny_models import (block_sizes_covering, build_llama_family, dense_logits, feed_stream, make_wrapper, max_abs_diff,
                         random_ids)

TOLERANCE = 1e-4
POSITION_MODES = ["pos_shift", "rerotate", "absolute"]
STREAMING_MODES = ["ours", "mit"]

N_SINK, WINDOW_SIZE = 4, 16  # capacity 20
LONG_STREAM = 96  # > 3x capacity
IRREGULAR_BLOCKS = [1, 7, 30, 2, 13, 1, 1, 25]
FEEDINGS = {
    "tokens": lambda length: [1] * length,
    "blocks": lambda length: block_sizes_covering(length, IRREGULAR_BLOCKS),
    "first_block_over_capacity": lambda length: block_sizes_covering(length, [30, 1, 7, 2, 25]),
}


@pytest.mark.parametrize("feeding", ["tokens", "blocks"])
@pytest.mark.parametrize("streaming_mode", STREAMING_MODES)
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_no_eviction_equals_dense(model, position_mode, streaming_mode, feeding):
    """a. window_size >= T: nothing is evicted and every mode is the dense model."""
    length = 48
    input_ids = random_ids(length, seed=20)
    wrapper = make_wrapper(model, N_SINK, length, position_mode=position_mode, streaming_mode=streaming_mode)
    streamed = feed_stream(wrapper, input_ids, FEEDINGS[feeding](length))
    assert max_abs_diff(streamed, dense_logits(model, input_ids)) <= TOLERANCE


@pytest.mark.parametrize("feeding", ["tokens", "blocks"])
@pytest.mark.parametrize("streaming_mode", STREAMING_MODES)
def test_pos_shift_equals_rerotate(model, streaming_mode, feeding):
    """b. Rotating stored keys back as they move is the same as rotating at cache indices."""
    input_ids = random_ids(LONG_STREAM, seed=21)
    sizes = FEEDINGS[feeding](LONG_STREAM)
    logits = {
        mode: feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=mode, streaming_mode=streaming_mode),
                          input_ids, sizes)
        for mode in ("pos_shift", "rerotate")
    }
    assert max_abs_diff(logits["pos_shift"], logits["rerotate"]) <= TOLERANCE


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_mit_equals_ours(model, position_mode):
    """b. MIT's StartRecentKVCache convention is the package's for the same n_sink and window_size."""
    input_ids = random_ids(LONG_STREAM, seed=22)
    logits = {
        mode: feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode, streaming_mode=mode),
                          input_ids)
        for mode in STREAMING_MODES
    }
    assert max_abs_diff(logits["ours"], logits["mit"]) <= TOLERANCE


@pytest.mark.parametrize("feeding", list(FEEDINGS))
@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_matches_reference(model, position_mode, feeding):
    """c. The package streams exactly as the naive reference, in every position mode."""
    input_ids = random_ids(LONG_STREAM, seed=23)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode)
    streamed = feed_stream(wrapper, input_ids, FEEDINGS[feeding](LONG_STREAM))
    expected = naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE, position_mode)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_mit_matches_reference_in_blocks(model, position_mode):
    """c. The MIT-style cache also follows the reference when fed in blocks."""
    input_ids = random_ids(LONG_STREAM, seed=24)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode, streaming_mode="mit")
    streamed = feed_stream(wrapper, input_ids, FEEDINGS["first_block_over_capacity"](LONG_STREAM))
    expected = naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE, position_mode)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


@pytest.mark.parametrize("n_sink, window_size", [(0, 8), (1, 1), (8, 3)])
def test_edge_configurations_match_reference(llama_model, n_sink, window_size):
    """Window attention (no sinks), a one-token window, more sinks than window."""
    input_ids = random_ids(50, seed=25)
    wrapper = make_wrapper(llama_model, n_sink, window_size)
    streamed = feed_stream(wrapper, input_ids, block_sizes_covering(50, [1, 11, 2, 5]))
    expected = naive_streaming_logits(llama_model, input_ids, n_sink, window_size)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


def test_a_model_with_one_attention_head_streams_exactly():
    """One query head (and one kv head): a block of several tokens is still told from a single token by its length,
    not by some other axis of the query that is 1 here."""
    model = build_llama_family("llama", num_attention_heads=1, num_key_value_heads=1)
    input_ids = random_ids(50, seed=38)
    streamed = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids, FEEDINGS["blocks"](50))
    assert max_abs_diff(streamed, naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE)) <= TOLERANCE


def test_batch_rows_are_independent_streams(model):
    """Each batch row is its own stream: a batch of two equals each stream on its own."""
    input_ids = random_ids(LONG_STREAM, seed=26, batch=2)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE)
    streamed = feed_stream(wrapper, input_ids, FEEDINGS["blocks"](LONG_STREAM))
    for row in range(2):
        expected = naive_streaming_logits(model, input_ids[row], N_SINK, WINDOW_SIZE)
        assert max_abs_diff(streamed[row], expected) <= TOLERANCE


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_compress_gives_the_kept_tokens_in_stream_order_in_both_storages(model, position_mode):
    """compress(layer): the sinks and the last window_size tokens, keys at their cache slots 0..C-1, in stream order.
    The ring (stream position p in slot n_sink + (p - n_sink) % (window_size + 1): out of stream order once it wraps,
    one slot holding an evicted token) gives what MIT mode's tensor, kept in stream order, gives."""
    length = 75  # the ring has wrapped four times: its oldest slot is at neither end
    input_ids = random_ids(length, seed=39)
    kept = list(range(N_SINK)) + list(range(length - WINDOW_SIZE, length))
    compressed = {}
    for streaming_mode in STREAMING_MODES:
        wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode, streaming_mode=streaming_mode)
        feed_stream(wrapper, input_ids, FEEDINGS["blocks"](length))
        assert wrapper.cache.kept_positions().tolist() == kept
        compressed[streaming_mode] = [wrapper.cache.compress(layer) for layer in range(len(wrapper.cache.layers))]
    for ours, mit in zip(compressed["ours"], compressed["mit"]):
        assert ours[0].shape[-2] == N_SINK + WINDOW_SIZE
        assert max_abs_diff(ours[0], mit[0]) <= TOLERANCE and max_abs_diff(ours[1], mit[1]) <= TOLERANCE


@pytest.mark.parametrize("position_mode", POSITION_MODES)
def test_reset_starts_a_new_stream(model, position_mode):
    first, second = random_ids(70, seed=27), random_ids(60, seed=28)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode)
    feed_stream(wrapper, first, FEEDINGS["blocks"](70))
    wrapper.reset()
    assert wrapper.cache.get_seq_length() == 0 and wrapper.cache.get_cache_length() == 0
    streamed = feed_stream(wrapper, second, FEEDINGS["blocks"](60))
    expected = naive_streaming_logits(model, second, N_SINK, WINDOW_SIZE, position_mode)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


def test_wrong_configuration_is_detected(model):
    """d. The comparisons above can fail: an off-by-one window, a missing sink, or other positions differ by far
    more than the tolerance, and a long stream is not the dense model."""
    input_ids = random_ids(LONG_STREAM, seed=23)
    streamed = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids)
    assert max_abs_diff(streamed, naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE)) <= TOLERANCE
    wrong = {
        "window + 1": naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE + 1),
        "window - 1": naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE - 1),
        "one sink fewer": naive_streaming_logits(model, input_ids, N_SINK - 1, WINDOW_SIZE + 1),
        "absolute positions": naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE, "absolute"),
        "dense": dense_logits(model, input_ids),
    }
    for name, logits in wrong.items():
        assert max_abs_diff(streamed, logits) > 1e-3, name


def test_logits_are_float_and_shaped(llama_model):
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    logits = wrapper(random_ids(5, seed=29, batch=3))
    assert logits.shape == (3, 5, llama_model.config.vocab_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_long_inputs_are_split_into_exact_blocks(llama_model):
    """A call longer than max_block is fed in blocks of max_block: same logits as the naive reference."""
    input_ids = random_ids(LONG_STREAM, seed=29)
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE, max_block=7)
    streamed = wrapper(input_ids[None])
    assert streamed.shape[1] == LONG_STREAM
    expected = naive_streaming_logits(llama_model, input_ids, N_SINK, WINDOW_SIZE, "pos_shift")
    assert max_abs_diff(streamed[0], expected) <= TOLERANCE


@pytest.mark.parametrize("length", [2, 3, 4, 5])
def test_a_call_is_every_block_it_is_fed_in(llama_model, length):
    """max_block=2: a call of one, two (one cut short or not) or three blocks of 3 streams returns the logits of every
    token of every row, as feeding them one at a time does (a block is cut along the stream, never across rows)."""
    input_ids = torch.stack([random_ids(length, seed=30 + row) for row in range(3)])
    expected = feed_stream(make_wrapper(llama_model, 2, 3), input_ids)
    streamed = make_wrapper(llama_model, 2, 3, max_block=2)(input_ids)
    assert streamed.shape == (3, length, llama_model.config.vocab_size)
    assert max_abs_diff(streamed, expected) <= TOLERANCE


@pytest.mark.parametrize("position_mode, streaming_mode", [("pos_shift", "ours"), ("rerotate", "ours"),
                                                           ("pos_shift", "mit")])
def test_one_long_call_keeps_the_positions_small(llama_model, position_mode, streaming_mode):
    """1,600 tokens in one forward pass (max_block past them, as generate() gives a whole prompt): each layer attends
    them in pieces of capacity + 1, the frame moving between pieces, so RoPE sees positions below ~3C. Attended as
    one piece, they were rotated at up to C + 1,600 and drifted from the reference (5e-4 here, 1e-2 at 20,000)."""
    input_ids = random_ids(1600, seed=30)
    wrapper = make_wrapper(llama_model, 4, 50, position_mode=position_mode, streaming_mode=streaming_mode,
                           max_block=100_000)
    if position_mode not in _LONG_REFERENCES:  # ~1.4 s of Python per mode: both pos_shift cases hold to one
        _LONG_REFERENCES[position_mode] = naive_streaming_logits(llama_model, input_ids, 4, 50, position_mode)
    assert max_abs_diff(wrapper(input_ids[None])[0], _LONG_REFERENCES[position_mode]) <= TOLERANCE


_LONG_REFERENCES: dict = {}  # position mode -> the reference logits of test_one_long_call_keeps_the_positions_small



def test_train_mode_applies_no_attention_dropout():
    """README (Limitations): the streaming attention applies no dropout, so a model in train() mode with attention
    dropout 0.5 streams as in eval() mode, through the general path (blocks) and the static step (one token at a
    time), with and without eviction; the dense model in train() mode does drop weights (the setting reaches the
    attention)."""
    from streaming_llm.fast import FastStreamingWrapper
    from tiny_models import build_llama

    model = build_llama()
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    ids = random_ids(LONG_STREAM, seed=5)
    with torch.no_grad():
        assert max_abs_diff(dense_logits(model.train(), ids[:20]), dense_logits(model.eval(), ids[:20])) > 1e-2
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE)
    fast = FastStreamingWrapper(copy.deepcopy(model), N_SINK, WINDOW_SIZE, compile="never")
    streamed = {}
    for training in (False, True):
        for stepper in (wrapper, fast):
            stepper.model.train(training)
            stepper.reset()
        streamed[training] = (feed_stream(wrapper, ids, block_sizes_covering(LONG_STREAM, IRREGULAR_BLOCKS)),
                              feed_stream(fast, ids, [1] * LONG_STREAM))
    assert wrapper.model.training and fast.model.training
    assert torch.equal(streamed[True][0], streamed[False][0]) and torch.equal(streamed[True][1], streamed[False][1])
    assert max_abs_diff(streamed[False][0], naive_streaming_logits(model.eval(), ids, N_SINK, WINDOW_SIZE)) <= TOLERANCE


@pytest.mark.parametrize("position_mode, streaming_mode, fast", [("pos_shift", "ours", False), ("rerotate", "ours", False),
                                                                 ("pos_shift", "mit", False), ("rerotate", "mit", False),
                                                                 ("pos_shift", "ours", True), ("rerotate", "ours", True)])
def test_a_stream_past_2_to_the_53_tokens_attends_as_a_short_one(llama_model, position_mode, streaming_mode, fast):
    """An endless stream at constant cost: after N tokens the logits are those of a short stream holding the same sinks
    and window (pos_shift and rerotate attend by distances inside the cache only). The stream is fast-forwarded by K
    tokens, K a multiple of the ring's window_size + 1 slots and of pos_shift's re-basing period capacity + 1: every
    counter (each layer's `seen`, frame offset `base`, the window slots' stream positions; the fast step's t and frame
    offset, taken up from the layers) moves by K and the stored keys, kept in the frame p - base, stay as they are,
    which is the state K more tokens of the same window leave. K is past 2**53, where float64 and float32 no longer
    hold every integer: a position converted to a float before it is made relative would show here. Checked bit for
    bit at 2**24, 2**31, 2**53 and 2**62 on both tiny models, token by token and in blocks."""
    from streaming_llm.fast import FastStreamingWrapper

    n_sink, window_size = 2, 9
    period = (window_size + 1) * (n_sink + window_size + 1)
    fast_forward = period * (2**53 // period + 1)
    input_ids = random_ids(70, seed=31)[None]
    if fast:
        wrapper = FastStreamingWrapper(copy.deepcopy(llama_model), n_sink, window_size, position_mode, compile="never")
    else:
        wrapper = make_wrapper(llama_model, n_sink, window_size, position_mode=position_mode,
                               streaming_mode=streaming_mode)
    wrapper(input_ids[:, :40])
    long = copy.deepcopy(wrapper)
    for layer in long.cache.layers:
        layer.seen += fast_forward
        layer.base += 0 if layer.stores_raw_keys else fast_forward
        layer.positions = torch.where(layer.positions >= n_sink, layer.positions + fast_forward, layer.positions)
    for start, size in [(40, 1), (41, 1), (42, 13), (55, 1), (56, 1), (57, 5), *((i, 1) for i in range(62, 70))]:
        block = input_ids[:, start : start + size]
        assert max_abs_diff(long(block), wrapper(block)) <= TOLERANCE, f"tokens {start}..{start + size - 1}"
    assert long.tokens_seen == wrapper.tokens_seen + fast_forward
    assert torch.equal(long.cache.kept_positions(), torch.where(wrapper.cache.kept_positions() >= n_sink,
                                                                wrapper.cache.kept_positions() + fast_forward,
                                                                wrapper.cache.kept_positions()))
