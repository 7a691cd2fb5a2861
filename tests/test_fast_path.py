"""The static decode step (streaming_llm/fast.py): exactly the general path's logits, kept tokens and bookkeeping,
in every position mode, for both architectures, token by token and mixed with blocks; and, compiled, a single graph
whose only in-place writes are to static buffers (what a CUDA-graph capture needs), checked on CPU for every model
type in test_model_types.py.
"""

import copy
import os
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import (block_sizes_covering, count_frozen_matmuls, feed_stream, make_wrapper, max_abs_diff,
                         random_ids)

from streaming_llm import fast as fast_module
from streaming_llm import prepare_model
from streaming_llm.fast import DECODE_ATTENTION, FastStreamingWrapper, GraphedStep

TOLERANCE = 1e-4
N_SINK, WINDOW_SIZE = 4, 16
LENGTH = 120  # > 5x capacity: the buffer fills, then pos_shift moves its frame several times


def make_fast(model, n_sink=N_SINK, window_size=WINDOW_SIZE, **options):
    return FastStreamingWrapper(copy.deepcopy(model), n_sink=n_sink, window_size=window_size, **options)


class CountingSteps:
    """Counts calls of the static step functions (so a test knows the fast path, not the general one, ran): the
    wrapper becomes an instance of a subclass whose steps count (the wrapper looks its steps up on its class)."""

    def __init__(self, wrapper):
        self.calls = {"filling": 0, "full": 0}
        base = type(wrapper)

        def counting(name):
            original = getattr(base, f"_static_step_{name}")

            def counted(wrapper, *args):
                self.calls[name] += 1
                return original(wrapper, *args)

            return counted

        wrapper.__class__ = type(f"Counting{base.__name__}", (base,),
                                 {f"_static_step_{name}": counting(name) for name in self.calls})


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
@pytest.mark.parametrize("n_sink, window_size", [(N_SINK, WINDOW_SIZE), (0, 9), (1, 5)])
def test_token_by_token_equals_general_path(model, position_mode, n_sink, window_size):
    input_ids = random_ids(LENGTH, seed=40)
    general = feed_stream(make_wrapper(model, n_sink, window_size, position_mode=position_mode), input_ids)
    fast = make_fast(model, n_sink, window_size, position_mode=position_mode)
    counter = CountingSteps(fast)
    assert max_abs_diff(feed_stream(fast, input_ids), general) <= TOLERANCE
    capacity = n_sink + window_size
    # Every token from n_sink on went through the static step: masked while the buffer filled, then unmasked.
    assert counter.calls == {"filling": capacity - n_sink, "full": LENGTH - capacity}


class ReplayedGraph(GraphedStep):
    """GraphedStep's protocol on CPU: the "capture" runs the step (so before the first replay the step has run
    three times for the same token), a replay runs it again into the same output tensor."""

    def _warm_up(self, function):
        for _ in range(2):
            function(self.token_ids)

    def _capture(self, function):
        logits = function(self.token_ids)
        return SimpleNamespace(replay=lambda: logits.copy_(function(self.token_ids))), logits


def test_captured_step_protocol(model, monkeypatch):
    """What a CUDA graph of the step relies on: running the step again for the same token is harmless (warm-up and
    capture), every input but the token ids is read from a fixed place, the token ids go through the graph's own
    buffer and each call's logits are a copy (the next replay overwrites the graph's output). Through filling,
    frame moves, blocks, a reset and a new batch size."""
    monkeypatch.setattr(fast_module, "GraphedStep", ReplayedGraph)
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    fast = make_fast(model)
    fast.step_kind = "cuda_graph"
    input_ids = random_ids(LENGTH, seed=44)
    sizes = block_sizes_covering(LENGTH, [1] * 50 + [7])
    general = make_wrapper(model, N_SINK, WINDOW_SIZE)
    assert max_abs_diff(feed_stream(fast, input_ids, sizes), feed_stream(general, input_ids, sizes)) <= TOLERANCE
    assert {type(step) for step in fast._compiled.values()} == {ReplayedGraph} and len(fast._compiled) == 2
    fast.reset()
    general.reset()
    assert max_abs_diff(feed_stream(fast, input_ids), feed_stream(general, input_ids)) <= TOLERANCE
    batch = torch.stack([random_ids(40, seed=45), random_ids(40, seed=46)])
    fast.reset(2)
    assert max_abs_diff(feed_stream(fast, batch), feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), batch)) <= TOLERANCE


def test_failed_capture_falls_back_to_reduce_overhead(model, monkeypatch):
    class RefusedCapture(ReplayedGraph):
        def _capture(self, function):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast_module, "GraphedStep", RefusedCapture)
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    fast = make_fast(model)
    fast.step_kind = "cuda_graph"
    input_ids = random_ids(30, seed=48)
    with pytest.warns(RuntimeWarning, match="capturing the decode step in a CUDA graph failed") as warned:
        streamed = feed_stream(fast, input_ids)
    assert fast.step_kind == "cuda_graph_trees"
    # at tiny_models.feed_stream's call of the wrapper (the user's code), not in fast.py
    assert [Path(record.filename).name for record in warned if "CUDA graph" in str(record.message)] == ["tiny_models.py"]
    assert max_abs_diff(streamed, feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids)) <= TOLERANCE


def test_wrappers_compiled_one_after_another_each_compile_their_own_step(llama_model):
    """torch.compile counts recompilations per code object (8 by default, then fullgraph=True fails): the 9th
    compiled wrapper of a process failed with FailOnRecompileLimitHit while the step was the class's method. Each
    compiled step runs its own code now; here the limit is 1, so the second wrapper failed before (a third, ~1.5 s
    more, adds nothing to that)."""
    torch._dynamo.reset()
    input_ids = random_ids(12, seed=58)
    expected = feed_stream(make_wrapper(llama_model, 2, 5), input_ids)
    with torch._dynamo.config.patch(recompile_limit=1):
        for _ in range(2):
            fast = make_fast(llama_model, 2, 5, compile="always")
            assert max_abs_diff(feed_stream(fast, input_ids), expected) <= TOLERANCE
            assert fast.step_kind == "compiled" and len(fast._compiled) == 2


def test_frozen_step_sees_the_stream_change_and_runs_one_matmul_per_shared_input(llama_model, monkeypatch):
    """freeze_weights: inductor freezing makes every static tensor the graph only reads a constant of it. The sinks, t
    and the frame offset change between steps, so they must stay inputs: while they were marked static as the buffers
    are, the frozen step's logits were off by up to 9.6 from the second step on. The weights are folded, and each
    layer's q/k/v and gate/up projections run as one matmul each: 4 per layer and the LM head, where unfrozen 7 per
    layer. Through filling, frame moves, blocks and a reset: after it the same stream token by token, through the same
    frozen graph (the first 60 tokens alone, a tensor of other strides, had both steps traced and compiled again,
    ~4 s, and the graph compiled before the reset never saw the new stream)."""
    matmuls = count_frozen_matmuls(monkeypatch)
    torch._dynamo.reset()
    fast = make_fast(llama_model, compile="always", freeze_weights=True)
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    input_ids = random_ids(LENGTH, seed=59)
    sizes = block_sizes_covering(LENGTH, [1] * 40 + [7])
    assert max_abs_diff(feed_stream(fast, input_ids, sizes), feed_stream(general, input_ids, sizes)) <= TOLERANCE
    # The full buffer's step only: each frozen graph holds its own concatenated weights (the filling step, frozen too,
    # held a second set), and the filling step serves the first window_size tokens of a stream only.
    assert matmuls == [4 * llama_model.config.num_hidden_layers + 1]
    fast.reset()
    general.reset()
    assert max_abs_diff(feed_stream(fast, input_ids), feed_stream(general, input_ids)) <= TOLERANCE
    assert len(matmuls) == 1  # no step was compiled again


@pytest.mark.parametrize("position_mode", ["pos_shift", "absolute"])
def test_blocks_and_steps_mixed(model, position_mode):
    """Blocks (general path) after static steps see the kept tokens the steps wrote, and the other way round."""
    input_ids = random_ids(LENGTH, seed=41)
    sizes = block_sizes_covering(LENGTH, [1, 1, 9, 1, 1, 1, 30, 1, 5, 1, 1])
    general = make_wrapper(model, N_SINK, WINDOW_SIZE, position_mode=position_mode)
    fast = make_fast(model, position_mode=position_mode)
    assert max_abs_diff(feed_stream(fast, input_ids, sizes), feed_stream(general, input_ids, sizes)) <= TOLERANCE
    assert torch.equal(fast.cache.kept_positions(), general.cache.kept_positions())
    for layer in range(len(fast.cache.layers)):
        fast_keys, fast_values = fast.cache.compress(layer)
        general_keys, general_values = general.cache.compress(layer)
        assert max_abs_diff(fast_keys, general_keys) <= TOLERANCE
        assert max_abs_diff(fast_values, general_values) <= TOLERANCE


def test_compress_after_static_steps_alone_rotates_each_layer_with_its_own_rope():
    """Without sinks every token fed alone takes the static step, so no general-path attention ever records the
    layers' RoPEs: compress(layer) still puts each layer's keys at their slots with that layer's own RoPE (Gemma 3's
    sliding and full-attention layers rotate with different frequencies), as the general path does."""
    from tiny_models import build_llama_family

    model, input_ids = build_llama_family("gemma3_text"), random_ids(30, seed=49)
    general, fast = make_wrapper(model, 0, 8), make_fast(model, 0, 8, compile="never")
    assert max_abs_diff(feed_stream(fast, input_ids), feed_stream(general, input_ids)) <= TOLERANCE
    for layer in range(len(general.cache.layers)):
        for got, want in zip(fast.cache.compress(layer), general.cache.compress(layer)):
            assert max_abs_diff(got, want) <= TOLERANCE


@pytest.mark.parametrize("variant", DECODE_ATTENTION)
def test_every_decode_attention_formulation(llama_model, variant):
    input_ids = random_ids(70, seed=42)
    general = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    fast = make_fast(llama_model, decode_attention=variant)
    assert max_abs_diff(feed_stream(fast, input_ids), general) <= TOLERANCE


@pytest.mark.parametrize("variant", DECODE_ATTENTION)
@pytest.mark.parametrize("model_type", ["gemma2", "gpt_oss"])
def test_every_decode_attention_formulation_applies_what_sdpa_cannot(variant, model_type):
    """Gemma 2's soft-capped scores and GPT-OSS's sink logits take the matmul formulation whatever variant is asked
    for: "gqa" (the CUDA default) and "expanded_masked" returned plain SDPA before, dropping the soft-capping on GPU."""
    from tiny_models import build_llama_family

    model = build_llama_family(model_type)
    input_ids = random_ids(40, seed=45)
    general = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids)
    fast = make_fast(model, decode_attention=variant)
    assert max_abs_diff(feed_stream(fast, input_ids), general) <= TOLERANCE


def test_batch_of_streams(llama_model):
    input_ids = random_ids(60, seed=43, batch=2)
    general = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    fast = make_fast(llama_model)
    assert max_abs_diff(feed_stream(fast, input_ids), general) <= TOLERANCE
    with pytest.raises(ValueError, match="batch of 2"):
        fast(random_ids(1, seed=44, batch=3))


@pytest.mark.parametrize("n_sink", [0, N_SINK])
def test_step_takes_a_new_streams_batch_size_and_refuses_another_under_way(llama_model, n_sink):
    """step() on a fresh wrapper with a batch of 2 starts a stream of 2, as calling the wrapper does; once it is under
    way, another batch size is refused in one sentence. With n_sink = 0 the first token is a static step, and a
    batch the buffers did not have failed inside torch's index_copy_ (found by differential fuzzing)."""
    input_ids = random_ids(12, seed=47, batch=2)
    general = feed_stream(make_wrapper(llama_model, n_sink, WINDOW_SIZE), input_ids)
    fast = make_fast(llama_model, n_sink=n_sink)
    stepped = torch.cat([fast.step(input_ids[:, t : t + 1]) for t in range(12)], dim=1)
    assert max_abs_diff(stepped, general) <= TOLERANCE
    with pytest.raises(ValueError) as error:
        fast.step(input_ids[:1, :1])
    assert str(error.value) == "this stream holds a batch of 2; got 1 (reset it first)"


def test_a_block_after_a_stream_begun_with_static_steps(llama_model):
    """With n_sink = 0 a stream's first token is a static step, which goes through every layer without the cache's
    update: the first block fed after such steps was refused as a forward pass stopped part-way ("its first layer has
    taken 3 tokens of the stream, a later one 0"), though every layer held the stream."""
    input_ids = random_ids(12, seed=57)
    expected = feed_stream(make_wrapper(llama_model, 0, WINDOW_SIZE), input_ids)
    fast = make_fast(llama_model, n_sink=0)
    assert max_abs_diff(feed_stream(fast, input_ids, block_sizes=[1, 1, 1, 7, 1, 1]), expected) <= TOLERANCE


def test_reset_starts_a_new_stream_on_the_same_buffers(llama_model):
    """reset() zeroes the buffers in place, so the step functions (compiled graphs hold the buffers' addresses)
    are kept; a new batch size allocates new buffers and drops them."""
    input_ids = random_ids(50, seed=45)
    fast = make_fast(llama_model)
    first = feed_stream(fast, input_ids)
    buffers, steps = [t.data_ptr() for t in fast.keys], dict(fast._compiled)
    fast.reset()
    assert fast.tokens_seen == 0 and fast.cache.get_cache_length() == 0
    assert all(t.abs().sum() == 0 for t in (*fast.keys, *fast.values, *fast.sink_keys))
    assert torch.equal(feed_stream(fast, input_ids), first)
    assert [t.data_ptr() for t in fast.keys] == buffers and fast._compiled == steps
    for bad in (0, -1, 2.5):  # a torch error from the allocation, or (0) an empty stream
        with pytest.raises(ValueError, match="batch_size"):
            fast.reset(batch_size=bad)
    fast.reset(batch_size=2)
    assert fast.keys[0].shape[0] == 2 and fast._compiled == {}
    batch = random_ids(50, seed=45, batch=2)
    assert max_abs_diff(feed_stream(fast, batch)[0], first) <= TOLERANCE


def test_step_hot_path_equals_call(llama_model):
    """`step` (no input checks) is the same computation as calling the wrapper with one token."""
    input_ids = random_ids(40, seed=46)
    called, stepped = make_fast(llama_model), make_fast(llama_model)
    called(input_ids[None, :30])
    stepped(input_ids[None, :30])
    for position in range(30, 40):
        token = input_ids[None, position : position + 1]
        assert torch.equal(called(token), stepped.step(token))


def test_the_model_stays_usable_with_a_plain_streaming_cache(llama_model):
    """The static attention is switched on for each static step only: afterwards the same model object runs a
    StreamingKVCache (generate(), another wrapper) as prepare_model left it."""
    from streaming_llm import StreamingLLMWrapper

    input_ids = random_ids(60, seed=48)
    model = copy.deepcopy(llama_model)
    fast = FastStreamingWrapper(model, N_SINK, WINDOW_SIZE)
    fast_logits = feed_stream(fast, input_ids)
    assert model.config._attn_implementation == "streaming_llm"
    plain = feed_stream(StreamingLLMWrapper(model, N_SINK, WINDOW_SIZE), input_ids)
    assert max_abs_diff(plain, fast_logits) <= TOLERANCE


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate"])
def test_the_stream_goes_on_after_generate_fed_the_wrappers_cache(llama_model, position_mode):
    """model.generate(past_key_values=fast.cache) feeds the stream through the general path on the same buffers; the
    next static steps take it up from there (they went on from the wrapper's own count before: the stream rewound)."""
    input_ids = random_ids(30, seed=49)
    fast = make_fast(llama_model, position_mode=position_mode)
    fast(input_ids[None, :6])
    fast(input_ids[None, 6:7])  # a static step: the cache's layers are brought up to date when it is read
    generated = fast.model.generate(input_ids[None, :12], attention_mask=torch.ones(1, 12, dtype=torch.long),
                                    past_key_values=fast.cache, max_new_tokens=14, do_sample=False)
    assert fast.tokens_seen == 25 == fast.cache.get_seq_length()
    stream = torch.cat([generated[0], input_ids[:3]])
    streamed = torch.cat([fast(stream[None, 25 + i : 26 + i])[0] for i in range(4)])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE, position_mode=position_mode), stream)
    assert max_abs_diff(streamed, expected[25:]) <= TOLERANCE
    assert fast.tokens_seen == 29
    fast.cache.reset()
    with pytest.raises(RuntimeError, match="call wrapper.reset"):
        fast(stream[None, :1])


@pytest.mark.parametrize("kept", ["cache", "current_cache"])
def test_a_cache_reference_kept_from_before_static_steps_feeds_the_stream_as_it_is_now(llama_model, kept):
    """`cache = fast.cache` (or `fast.current_cache`) read before some static steps, then handed to the model: its
    layers held the stream as it was when it was read, so model(...) and generate() fed it from there, over the tokens
    since (logits off by ~7, the count 2 short). They take the steps up first now, as `fast.cache` does when read."""
    input_ids, ones = random_ids(40, seed=54), torch.ones(1, 20, dtype=torch.long)
    fast = make_fast(llama_model)
    fast(input_ids[None, :6])
    cache = getattr(fast, kept)
    streamed = [fast.step(input_ids[None, t : t + 1])[0] for t in range(6, 10)]
    # with its cache_position, the model does not ask the cache for its length first
    streamed.append(fast.model(input_ids[None, 10:12], past_key_values=cache, cache_position=torch.arange(10, 12)).logits[0])
    fast.step(input_ids[None, 12:13])  # static again, then generate() is given the whole stream so far
    generated = fast.model.generate(input_ids[None, :20], attention_mask=ones, past_key_values=cache, max_new_tokens=5,
                                    do_sample=False)
    assert fast.tokens_seen == 24 == cache.get_seq_length()
    stream = torch.cat([generated[0], input_ids[25:28]])
    streamed.append(torch.cat([fast.step(stream[None, t : t + 1])[0] for t in range(24, 28)]))
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), stream)
    assert max_abs_diff(torch.cat(streamed[:5]), expected[6:12]) <= TOLERANCE
    assert max_abs_diff(streamed[5], expected[24:]) <= TOLERANCE
    assert torch.equal(generated[0, 20:], expected[19:24].argmax(-1))


def test_calls_after_generate_fed_the_wrappers_cache_take_up_its_stream(llama_model):
    """Whatever is called first after model.generate(past_key_values=fast.cache) takes the stream up where generate
    left it: a direct step() (not from the wrapper's own, older count: the stream rewound), and a call with another
    batch size is refused as for any stream under way (not taken for a fresh start that drops the stream)."""
    input_ids, ones = random_ids(30, seed=51), torch.ones(1, 12, dtype=torch.long)
    fast = make_fast(llama_model)
    fast(input_ids[None, :6])
    generated = fast.model.generate(input_ids[None, :12], attention_mask=ones, past_key_values=fast.cache,
                                    max_new_tokens=8, do_sample=False)
    stream = torch.cat([generated[0], input_ids[:3]])  # 19 tokens fed, then 4 more
    streamed = torch.cat([fast.step(stream[None, 19 + i : 20 + i])[0] for i in range(4)])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), stream)
    assert max_abs_diff(streamed, expected[19:]) <= TOLERANCE
    fresh = make_fast(llama_model)
    fresh.model.generate(input_ids[None, :12], attention_mask=ones, past_key_values=fresh.cache, max_new_tokens=2,
                         do_sample=False)
    with pytest.raises(ValueError, match="this stream holds a batch of 1; got 2"):
        fresh(input_ids[None, :1].expand(2, 1))
    assert fresh.tokens_seen == 13


def test_a_copy_of_the_wrappers_cache_copies_the_stream_not_the_model(llama_model):
    """copy.deepcopy(fast.cache) copied the wrapper and its whole model too, once the cache held the wrapper (to take a
    new batch size); it holds it weakly now: the copy has its own buffers and goes on as the original does."""
    fast = make_fast(llama_model)
    input_ids = random_ids(40, seed=59)
    feed_stream(fast, input_ids[:30])
    memo = {}
    copied = copy.deepcopy(fast.cache, memo)
    assert id(fast.model) not in memo and id(fast) not in memo
    assert copied.layers[0].keys is not fast.keys[0]
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    wrapper.cache = copied
    continued = torch.cat([wrapper(input_ids[None, t : t + 1])[0] for t in range(30, 40)])
    assert max_abs_diff(continued, torch.cat([fast(input_ids[None, t : t + 1])[0] for t in range(30, 40)])) <= TOLERANCE
    assert copied.get_seq_length() == fast.tokens_seen == 40


@pytest.mark.parametrize("kept", ["cache", "current_cache"])
def test_a_copy_of_a_cache_reference_kept_from_before_static_steps_copies_the_stream_as_it_is_now(llama_model, kept):
    """copy.deepcopy of `fast.cache` read before some static steps (or of `fast.current_cache`) copied the buffers as the
    steps left them with the count and slot positions of before: fed on, it gave logits off by ~8 (its count 4 short).
    It takes the steps up first, as the reference itself does when it is fed."""
    input_ids = random_ids(16, seed=60)
    fast = make_fast(llama_model)
    fast(input_ids[None, :6])
    cache = getattr(fast, kept)
    for t in range(6, 10):
        fast.step(input_ids[None, t : t + 1])
    copied = copy.deepcopy(cache)
    assert copied.get_seq_length() == 10
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    wrapper.cache = copied
    assert max_abs_diff(wrapper(input_ids[None, 10:])[0], feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE),
                                                                      input_ids)[10:]) <= TOLERANCE


@pytest.mark.parametrize("kept", ["cache", "current_cache"])
def test_a_cache_reference_kept_from_before_static_steps_reports_the_stream_as_it_is_now(llama_model, kept):
    """get_cache_length(), kept_positions() and compress() of `fast.cache` read before some static steps (or of
    `fast.current_cache`) reported the stream as it was when read (length 6 of 20 held, positions 0-5); they take the
    steps up first now, as feeding it and get_seq_length() did, and agree with a StreamingLLMWrapper fed the same."""
    input_ids = random_ids(24, seed=61)
    fast = make_fast(llama_model, compile="never")
    fast(input_ids[None, :6])
    cache = getattr(fast, kept)
    for t in range(6, 24):
        fast.step(input_ids[None, t : t + 1])
    wrapper = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    wrapper(input_ids[None])
    expected = wrapper.cache
    assert cache.get_cache_length() == expected.get_cache_length() == N_SINK + WINDOW_SIZE
    assert torch.equal(cache.kept_positions(), expected.kept_positions())
    for got, want in zip(cache.compress(1), expected.compress(1)):
        assert max_abs_diff(got, want) <= TOLERANCE


@pytest.mark.parametrize("given", ["a new StreamingKVCache", "a copy taken earlier", "a loaded pickle",
                                   "a StreamingLLMWrapper's cache", "its cache for a batch of 2"])
def test_a_cache_given_to_the_wrapper_goes_on_through_its_static_step(llama_model, given):
    """`fast.cache = kept` (a copy, a saved stream loaded, a StreamingLLMWrapper's cache), as a StreamingLLMWrapper takes
    it: the next call refused it ("cache was reset, replaced (wrapper.cache = ...) ... call wrapper.reset()"), and
    tokens_seen raised, so a saved stream went on only in the general wrapper. The given stream is copied into the
    wrapper's buffers, which the given object then holds: it goes on, through the static step, as a wrapper fed the
    same tokens; it is the wrapper's cache, read through it; the stream it replaced stays as it was (on copies of the
    buffers), and goes on when given back."""
    import pickle

    from streaming_llm import StreamingKVCache

    input_ids = random_ids(40, seed=55)
    fast = make_fast(llama_model)
    counter = CountingSteps(fast)
    fast(input_ids[None, :6])
    snapshot = copy.deepcopy(fast.cache)
    for t in range(6, 12):
        fast.step(input_ids[None, t : t + 1])
    replaced, built = fast.cache, fast._compiled[True]  # (the filling step: 12 tokens do not fill the buffers)
    batch = 2 if given == "its cache for a batch of 2" else 1
    start = {"a new StreamingKVCache": 0, "a StreamingLLMWrapper's cache": 12}.get(given, 6)  # (12: as many as fast's)
    if given == "a new StreamingKVCache":
        cache = StreamingKVCache(N_SINK, WINDOW_SIZE)
    elif given in ("a StreamingLLMWrapper's cache", "its cache for a batch of 2"):
        general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
        general(input_ids[None, :start].expand(batch, start))
        cache = general.cache
    else:
        cache = pickle.loads(pickle.dumps(snapshot)) if given == "a loaded pickle" else snapshot
    fast.cache = cache
    assert fast.cache is cache and fast.tokens_seen == start
    assert (fast._compiled.get(True) is built) is (batch == 1)  # the step is built again for new buffers only
    ids = input_ids[None].expand(batch, 40)
    streamed = torch.cat([fast.step(ids[:, start : start + 1]), fast(ids[:, start + 1 : start + 4])]
                         + [fast.step(ids[:, t : t + 1]) for t in range(start + 4, 40)], dim=1)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    assert max_abs_diff(streamed, expected[start:].expand(batch, -1, -1)) <= TOLERANCE
    assert counter.calls["full"] > 6 and cache.get_seq_length() == 40 and cache.layers[0].keys is fast.keys[0]
    fast.cache = replaced
    assert fast.tokens_seen == 12 and replaced.layers[0].keys is fast.keys[0]
    assert max_abs_diff(fast(input_ids[None, 12:20])[0], expected[12:20]) <= TOLERANCE


def test_a_cache_the_wrapper_cannot_go_on_with_is_refused_when_given(llama_model):
    """What `fast.cache = ...` cannot take is refused at once, the wrapper's stream left as it was: another
    FastStreamingWrapper's live stream (its buffers: two wrappers would write one stream), another model's keys, and a
    stream whose layers hold different numbers of tokens (a pass stopped part-way)."""
    from tiny_models import build_llama_family

    from streaming_llm import StreamingKVCache

    input_ids = random_ids(30, seed=56)
    fast, other = make_fast(llama_model), make_fast(llama_model)
    fast(input_ids[None, :8])
    other(input_ids[None, :5])
    narrow = make_wrapper(build_llama_family("llama", num_key_value_heads=1), N_SINK, WINDOW_SIZE)
    narrow(input_ids[None, :5])
    stopped = copy.deepcopy(other.cache)
    stopped.layers[-1].seen -= 1
    refusals = ((other.cache, ValueError, r"another FastStreamingWrapper's stream .*copy.deepcopy\(other.cache\)"),
                (narrow.cache, ValueError, r"keys of another shape, dtype or device .*make a new one for this model"),
                (stopped, RuntimeError, r"stopped part-way"))
    for cache, error, message in refusals:
        with pytest.raises(error, match=message):
            fast.cache = cache
    assert isinstance(narrow.cache, StreamingKVCache) and type(narrow.cache) is StreamingKVCache
    assert other.tokens_seen == 5 and fast.tokens_seen == 8
    streamed = torch.cat([fast(input_ids[None, 8:12])[0]] + [fast.step(input_ids[None, t : t + 1])[0] for t in range(12, 30)])
    assert max_abs_diff(streamed, feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)[8:]) <= TOLERANCE


def test_a_cache_given_before_its_sinks_are_all_fed_holds_only_the_tokens_fed(llama_model):
    """`fast.cache = general.cache` after 2 of the 4 sinks: the wrapper holds those 2 tokens, no empty sink slot counted
    as a kept token (get_cache_length, kept_positions), and the stream goes on as the general wrapper's."""
    input_ids = random_ids(30, seed=70)
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general(input_ids[None, :2])
    fast = make_fast(llama_model)
    fast.cache = general.cache
    assert fast.cache.get_cache_length() == 2 and fast.cache.kept_positions().tolist() == [0, 1]
    streamed = torch.cat([fast(input_ids[None, t : t + 1])[0] for t in range(2, 30)])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    assert max_abs_diff(streamed, expected[2:]) <= TOLERANCE


@pytest.mark.parametrize("fed", [0, 9])
def test_a_cache_made_for_more_layers_than_the_model_is_taken_up_when_given(llama_model, fed):
    """`StreamingKVCache(num_layers=5)` for a model of 2 layers: a StreamingLLMWrapper streams with it (the layers past
    the model's stay empty). Given to a FastStreamingWrapper, an empty one was taken, the wrapper's stream let go and its
    buffers zeroed, and every call then refused it ("cache was reset (Cache.reset())"); one that held tokens was refused
    as a pass stopped part-way. It goes on as the general wrapper's stream; one whose extra layers hold tokens (another
    model's stream) is refused when given, the wrapper left as it was."""
    from streaming_llm import StreamingKVCache

    input_ids = random_ids(40, seed=57)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general.cache = StreamingKVCache(N_SINK, WINDOW_SIZE, num_layers=5)
    if fed:
        general(input_ids[None, :fed])
    fast = make_fast(llama_model)
    fast(input_ids[None, :3])
    fast.cache = general.cache
    assert fast.tokens_seen == fed
    streamed = torch.cat([fast(input_ids[None, fed : fed + 2])[0]] + [fast.step(input_ids[None, t : t + 1])[0]
                                                                       for t in range(fed + 2, 40)])
    assert max_abs_diff(streamed, expected[fed:]) <= TOLERANCE
    deeper = StreamingKVCache(N_SINK, WINDOW_SIZE, num_layers=5)
    deeper_general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    deeper_general.cache = deeper
    deeper_general(input_ids[None, :4])
    deeper.layers[3].seen = 4  # as a model with more layers would have left it
    with pytest.raises(ValueError, match="a model with more layers"):
        fast.cache = deeper
    assert fast.tokens_seen == 40


def test_a_cache_kept_across_reset_is_refused_not_fed_over_zeroed_buffers(llama_model):
    """reset() zeroes the buffers for the next stream (the compiled steps hold their addresses), and the old cache
    object holds them too: `old = fast.cache; fast.reset(); fast.cache = old` went on with the old count over zeroed
    keys (a "restore" of a stream that was gone), and model(..., past_key_values=old) wrote into the new stream,
    silently. Both are refused now, leaving the new stream as it was; a copy taken before reset() goes on."""
    model = copy.deepcopy(llama_model)
    input_ids = random_ids(40, seed=71)
    fast = make_fast(model, compile="never")
    fast(input_ids[None, :10])
    for t in range(10, 14):
        fast.step(input_ids[None, t : t + 1])
    old, kept, shallow = fast.cache, copy.deepcopy(fast.cache), copy.copy(fast.cache)
    fast.reset()
    fast(input_ids[None, :3])
    prepare_model(model)  # as generate() on the wrapper's cache has it
    for ended in (old, shallow):  # (a shallow copy shares the layers over the buffers: it fed on, logits off by ~5)
        with pytest.raises(RuntimeError, match=r"ended by the FastStreamingWrapper's reset\(\).*copy.deepcopy"):
            model(input_ids[None, 14:15], past_key_values=ended, use_cache=True)
    with pytest.raises(RuntimeError, match="ended by the FastStreamingWrapper's reset"):
        fast.cache = old
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)
    streamed = torch.cat([fast(input_ids[None, 3:20])[0]] + [fast.step(input_ids[None, t : t + 1])[0] for t in range(20, 40)])
    assert max_abs_diff(streamed, expected[3:]) <= TOLERANCE
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general.cache = kept
    assert max_abs_diff(general(input_ids[None, 14:])[0], expected[14:]) <= TOLERANCE


@pytest.mark.parametrize("left", ["replaced", "reset for another batch size"])
def test_a_cache_that_left_the_wrapper_keeps_the_static_steps_taken_before(llama_model, left):
    """A reference to fast.cache kept while static steps ran, then the wrapper given another cache (`fast.cache = ...`)
    or reset for another batch size (new buffers: the old ones, and their stream, stay as they were): the kept cache
    took the steps up only while it was the wrapper's, so fed afterwards (in a StreamingLLMWrapper, or model(...,
    past_key_values=kept)) it went on from before them, over their keys, silently (logits off by ~4)."""
    from streaming_llm import StreamingKVCache

    ids = random_ids(30, seed=74).reshape(1, -1)
    fast = make_fast(llama_model, compile="never")
    fast(ids[:, :6])
    kept = fast.cache
    for t in range(6, 10):
        fast.step(ids[:, t : t + 1])
    if left == "replaced":
        fast.cache = StreamingKVCache(N_SINK, WINDOW_SIZE)
    else:
        fast.reset(batch_size=2)
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general.cache = kept
    assert general.tokens_seen == 10
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids)
    assert max_abs_diff(general(ids[:, 10:20]), expected[:, 10:20]) <= TOLERANCE


def test_a_cache_replaced_and_then_reset_away_keeps_its_stream(llama_model):
    """`kept = fast.cache; fast.cache = other; fast.reset()`: reset() zeroed the buffers for the next stream but ended
    only the cache the wrapper held then (`other`), so the kept one, still over those buffers, fed on (model(...,
    past_key_values=kept)) over zeroed keys and into the new stream, silently. A cache given to the wrapper now leaves
    the one it replaces its stream on copies of the buffers: `kept` goes on as its own stream, as it would after a
    StreamingLLMWrapper was given another cache, and the wrapper's new stream is left as it was."""
    from streaming_llm import StreamingKVCache

    ids, other_ids = random_ids(20, seed=75).reshape(1, -1), random_ids(20, seed=76).reshape(1, -1)
    fast = make_fast(llama_model, compile="never")
    fast(ids[:, :10])
    kept = fast.cache
    fast.cache = StreamingKVCache(N_SINK, WINDOW_SIZE)
    fast.reset()
    fast(other_ids[:, :5])
    assert kept.layers[0].keys is not fast.keys[0]
    logits = fast.model(ids[:, 10:20], past_key_values=kept, use_cache=True).logits
    assert max_abs_diff(logits, feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids)[:, 10:]) <= TOLERANCE
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), other_ids)
    assert max_abs_diff(fast(other_ids[:, 5:]), expected[:, 5:]) <= TOLERANCE


def test_a_cache_reset_through_a_reference_kept_while_static_steps_ran_is_noticed(llama_model):
    """Cache.reset() of a reference to fast.cache read before some static steps (or of a StreamingLLMWrapper's cache
    given it): the wrapper, whose layers it had not taken up, went on with its own count over the buffers, the stream
    the caller had reset, silently, and reading its `cache` or reset() then failed with an AttributeError. It refuses to go
    on, as after fast.cache.reset(), and reset() starts a new stream."""
    ids = random_ids(30, seed=77).reshape(1, -1)
    fast = make_fast(llama_model, compile="never")
    fast(ids[:, :6])
    kept = fast.cache
    for t in range(6, 10):
        fast.step(ids[:, t : t + 1])
    kept.reset()
    assert kept.get_seq_length() == 0
    with pytest.raises(RuntimeError, match=r"call wrapper.reset\(\)"):
        fast.step(ids[:, 10:11])
    fast.reset()
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids)
    assert max_abs_diff(feed_stream(fast, ids, [6] + [1] * 24), expected) <= TOLERANCE


def test_generate_on_a_fresh_wrappers_cache_takes_the_batch_size_it_is_given(llama_model):
    """model.generate(batch of 2, past_key_values=fast.cache) on a fresh wrapper starts a stream of 2, as on a
    StreamingLLMWrapper's cache (it was refused: "this cache holds a batch of 1 streams; got 2 (reset it first)", and
    wrapper.reset() kept the buffers of 1); the wrapper's own steps go on with that stream, and a stream under way still
    refuses another batch size."""
    prompts, ones = random_ids(10, seed=52, batch=2), torch.ones(2, 10, dtype=torch.long)
    fast = make_fast(llama_model)
    generated = fast.model.generate(prompts, attention_mask=ones, past_key_values=fast.cache, max_new_tokens=12,
                                    do_sample=False)
    stream = torch.cat([generated, random_ids(3, seed=53, batch=2)], dim=1)  # 21 tokens fed, then 4 more
    streamed = torch.cat([fast.step(stream[:, 21 + i : 22 + i]) for i in range(4)], dim=1)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), stream)
    assert max_abs_diff(streamed, expected[:, 21:]) <= TOLERANCE
    longer = torch.cat([stream, stream[:, :1]], dim=1)[:1].expand(3, -1)  # 25 tokens fed, one more, 3 rows
    with pytest.raises(ValueError, match="holds a batch of 2 streams; got 3"):
        fast.model.generate(longer, attention_mask=torch.ones_like(longer), past_key_values=fast.cache,
                            max_new_tokens=1, do_sample=False)


def test_a_one_layer_model_streams_as_the_reference():
    """A model of one layer (a wrapper's buffers, a list of one per layer): blocks, static steps, a reset and a stream
    fed through the model itself before the wrapper goes on with it, as the naive reference streams."""
    from reference import naive_streaming_logits
    from tiny_models import build_llama_family

    model = build_llama_family("llama", num_hidden_layers=1)
    input_ids = random_ids(60, seed=71)
    expected = naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE)
    fast = make_fast(model)
    sizes = block_sizes_covering(60, [6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5])
    assert max_abs_diff(feed_stream(fast, input_ids, sizes), expected) <= TOLERANCE
    fast.reset()
    assert max_abs_diff(feed_stream(fast, input_ids), expected) <= TOLERANCE
    fast.reset()
    prefix = input_ids[None, :10]
    fast.model(prefix, position_ids=torch.zeros_like(prefix), past_key_values=fast.cache, use_cache=True)
    streamed = torch.cat([fast(input_ids[None, t : t + 1])[0] for t in range(10, 60)])
    assert fast.tokens_seen == 60 and max_abs_diff(streamed, expected[10:]) <= TOLERANCE


def test_a_copy_goes_on_as_the_original(llama_model):
    """copy.deepcopy of a wrapper mid-stream: its static steps looked the copied rotaries up by the originals' id()
    (KeyError)."""
    input_ids = random_ids(40, seed=50)
    fast = make_fast(llama_model)
    fast(input_ids[None, :20])
    copied = copy.deepcopy(fast)
    steps = [input_ids[None, i : i + 1] for i in range(20, 40)]
    assert torch.equal(torch.cat([copied(token) for token in steps], 1), torch.cat([fast(token) for token in steps], 1))


@pytest.mark.parametrize("freeze_weights", [False, True])
def test_a_copy_of_a_compiled_wrapper_compiles_its_own_steps(llama_model, freeze_weights):
    """copy.deepcopy of a compiled wrapper mid-stream: the copy's compiled steps were the original's, traced on the
    original's buffers, so the copy's logits were off by up to 9.2 and its steps wrote into the original's stream. Now
    each goes on as the general path does, the copy first, then the original."""
    input_ids = random_ids(40, seed=60)
    fast = make_fast(llama_model, compile="always", freeze_weights=freeze_weights)
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    for wrapper in (fast, general):
        for position in range(25):
            wrapper(input_ids[None, position : position + 1])
    copied = copy.deepcopy(fast)
    steps = [input_ids[None, i : i + 1] for i in range(25, 40)]
    expected = torch.cat([general(token) for token in steps], 1)
    assert max_abs_diff(torch.cat([copied(token) for token in steps], 1), expected) <= TOLERANCE
    assert max_abs_diff(torch.cat([fast(token) for token in steps], 1), expected) <= TOLERANCE
    assert copied.step_kind == "compiled" and list(copied._compiled) == [False]  # its own full step, compiled


def test_a_pickled_wrapper_or_cache_goes_on_as_the_original(llama_model):
    """pickle / torch.save of a FastStreamingWrapper mid-stream, or of its cache (a reference read before some static
    steps), failed: "cannot pickle 'weakref.ReferenceType' object" (the cache holds the wrapper weakly). The cache loads
    as the stream as it is now, going on in a StreamingLLMWrapper; the wrapper loads with buffers of its own, its cache
    holding it, and goes on as the original does, whose stream is left as it was."""
    import io
    import pickle

    input_ids = random_ids(40, seed=63)
    fast = make_fast(llama_model, compile="never")
    fast(input_ids[None, :20])
    cache = fast.cache
    for t in range(20, 25):
        fast.step(input_ids[None, t : t + 1])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)[25:]
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general.cache = pickle.loads(pickle.dumps(cache))
    assert max_abs_diff(torch.cat([general(input_ids[None, t : t + 1])[0] for t in range(25, 40)]), expected) <= TOLERANCE
    saved = io.BytesIO()
    torch.save(fast, saved)
    saved.seek(0)
    for wrapper in (torch.load(saved, weights_only=False), pickle.loads(pickle.dumps(fast)), fast):
        assert wrapper.cache._wrapper() is wrapper and wrapper.cache.layers[0].keys is wrapper.keys[0]
        streamed = torch.cat([wrapper.step(input_ids[None, t : t + 1])[0] for t in range(25, 40)])
        assert max_abs_diff(streamed, expected) <= TOLERANCE
        assert wrapper.tokens_seen == 40


def test_a_shallow_copy_leaves_the_original_wrappers_cache_holding_it(llama_model):
    """copy.copy(fast) went through the pickling hooks (__getstate__/__setstate__), whose loading side pointed the cache
    both share at the copy: once the copy was gone, a reference to the original's cache kept from before static steps
    no longer took them up, and fed on by the model it was off by ~7 (as before those hooks, it is left as it was)."""
    import gc

    input_ids = random_ids(30, seed=64)
    fast = make_fast(llama_model, compile="never")
    fast(input_ids[None, :10])
    shallow = copy.copy(fast)
    assert shallow.current_cache is fast.current_cache
    del shallow
    gc.collect()
    kept = fast.current_cache
    for t in range(10, 20):
        fast.step(input_ids[None, t : t + 1])
    block = input_ids[None, 20:]
    logits = fast.model(block, position_ids=torch.zeros_like(block), past_key_values=kept, use_cache=True).logits
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)[20:]
    assert max_abs_diff(logits[0], expected) <= TOLERANCE
    assert kept._wrapper() is fast


class BuiltOnItsParameters:
    """GraphedStep's contract, on CPU: a CUDA graph reads the parameters at the addresses of its capture, so this step
    runs on the parameters' memory as it was when it was built, whatever the model holds later."""

    def __init__(self, function, wrapper, token_ids):
        self.function = function
        self.built_on = [(module, name, parameter.data) for module in wrapper.model.modules()
                         for name, parameter in module._parameters.items() if parameter is not None]

    def __call__(self, wrapper, token_ids):
        held = [module._parameters[name] for module, name, _ in self.built_on]
        for module, name, parameter in self.built_on:
            module._parameters[name] = parameter
        try:
            return self.function(wrapper, token_ids)
        finally:
            for (module, name, _), parameter in zip(self.built_on, held):
                module._parameters[name] = parameter


def test_a_step_built_on_parameters_since_replaced_is_built_again(llama_model, monkeypatch):
    """After load_state_dict(..., assign=True) (new parameter tensors), a step captured in a CUDA graph went on reading
    the old parameters' memory: the old weights, or memory freed since. The step is now built again when the model's
    parameters are other tensors: noticed at the next step when a parameter was registered anywhere (one integer
    compared per step; a module made elsewhere leaves the steps as they are), and at reset() for memory given in
    place (`parameter.data = ...`)."""
    monkeypatch.setattr(fast_module, "GraphedStep", BuiltOnItsParameters)
    input_ids = random_ids(80, seed=62)
    fast = make_fast(llama_model, compile="never")
    fast.step_kind = "cuda_graph"  # built as on CUDA, by the stand-in above, uncompiled:
    monkeypatch.setattr(fast, "_compile", lambda function, filling, **options: function)
    general = make_wrapper(copy.deepcopy(llama_model), N_SINK, WINDOW_SIZE)
    for position in range(30):
        token = input_ids[None, position : position + 1]
        assert max_abs_diff(fast(token), general(token)) <= TOLERANCE
    step = fast._compiled[False]
    torch.nn.Linear(2, 2)  # registers parameters of its own
    fast(input_ids[None, 30:31]), general(input_ids[None, 30:31])
    assert fast._compiled[False] is step
    new_weights = {name: tensor * 0.8 for name, tensor in llama_model.state_dict().items()}
    for wrapper in (fast, general):
        wrapper.model.load_state_dict(new_weights, assign=True)
    for position in range(31, 50):
        token = input_ids[None, position : position + 1]
        assert max_abs_diff(fast(token), general(token)) <= TOLERANCE, position
    assert fast._compiled[False] is not step
    step = fast._compiled[False]
    for wrapper in (fast, general):
        for parameter in wrapper.model.parameters():
            parameter.data = parameter.data * 1.25
        wrapper.reset()
    assert max_abs_diff(feed_stream(fast, input_ids[50:]), feed_stream(general, input_ids[50:])) <= TOLERANCE
    assert fast._compiled[False] is not step


def test_a_copy_of_a_fresh_wrapper_takes_the_batch_size_its_cache_is_given(llama_model):
    """copy.deepcopy of a fresh wrapper: the copy's cache held the original wrapper (deepcopy keeps a weak reference as
    it is), so model.generate(batch of 2, past_key_values=copy.cache) was refused ("this cache holds a batch of 1
    streams"), where the original's cache takes it. The copy's cache holds the copy now."""
    prompts, ones = random_ids(10, seed=61, batch=2), torch.ones(2, 10, dtype=torch.long)
    generated = []
    for wrapper in (copy.deepcopy(make_fast(llama_model)), make_fast(llama_model)):
        generated.append(wrapper.model.generate(prompts, attention_mask=ones, past_key_values=wrapper.cache,
                                                max_new_tokens=4, do_sample=False))
        assert wrapper.keys[0].shape[0] == 2 and wrapper.tokens_seen == 13
    assert torch.equal(*generated)


def test_auto_decode_attention_is_resolved_per_device():
    assert fast_module.resolve_decode_attention("auto", "cuda:0") == "gqa"
    assert fast_module.resolve_decode_attention("auto", "cpu") == "grouped"
    assert fast_module.resolve_decode_attention("matmul", "cuda") == "matmul"


def test_bad_options_are_refused(llama_model):
    with pytest.raises(ValueError, match="compile must be one of"):
        make_fast(llama_model, compile="sometimes")
    with pytest.raises(ValueError, match="decode_attention must be auto or one of"):
        make_fast(llama_model, decode_attention="flash")
    with pytest.raises(ValueError, match="freeze_weights must be True or False"):
        make_fast(llama_model, freeze_weights="yes")
    query, keys = torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 3, 16)
    for softcap in (None, 1.5):  # decode_attention itself refuses a formulation it does not know, soft-capped too
        with pytest.raises(ValueError, match="decode attention must be one of"):
            fast_module.decode_attention(query, keys, keys, None, None, "flash", softcap)
    with pytest.raises(ValueError, match="token ids"):
        make_fast(llama_model)(torch.tensor([[10_000]]))


def test_a_stream_begun_under_inference_mode_goes_on_outside_it(llama_model):
    """A stream started under torch.inference_mode() (a notebook's first cell, or a first generate() turn) and
    continued outside it: the ring buffers were inference tensors, and every wrapper failed on its next in-place
    write with torch's "Inplace update to inference tensor outside InferenceMode". The layers (and the fast
    wrapper's static buffers, shared with them) now go on with normal copies: the same logits as a stream run
    wholly outside inference mode, in every path; reset() outside the mode works too."""
    ids = random_ids(60, seed=11).reshape(1, -1)
    for make in (lambda: make_wrapper(llama_model, N_SINK, WINDOW_SIZE),
                 lambda: make_wrapper(llama_model, N_SINK, WINDOW_SIZE, streaming_mode="mit"),
                 lambda: make_fast(llama_model, compile="never")):
        expected = feed_stream(make(), ids, [30] + [1] * 30)
        with torch.inference_mode():
            wrapper = make()
            first = wrapper(ids[:, :30])
        rest = [wrapper(ids[:, i : i + 1]) for i in range(30, 60)]
        assert max_abs_diff(torch.cat([first, *rest], dim=1), expected) == 0.0
        wrapper.reset()
        assert max_abs_diff(feed_stream(wrapper, ids, [30] + [1] * 30), expected) == 0.0
    with torch.inference_mode():
        fast = make_fast(llama_model, compile="never")
    fast.reset()  # before any token: the buffers are zeroed in place
    assert max_abs_diff(feed_stream(fast, ids, [30] + [1] * 30), expected) == 0.0
    from streaming_llm import StreamingKVCache, prepare_model

    model = prepare_model(copy.deepcopy(llama_model))
    expected = model.generate(ids[:, :20], past_key_values=StreamingKVCache(2, 8), max_new_tokens=12, do_sample=False)
    cache = StreamingKVCache(2, 8)
    with torch.inference_mode():
        model.generate(ids[:, :20], past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(expected[:, :26], past_key_values=cache, max_new_tokens=6, do_sample=False),
                       expected)


def test_step_goes_on_outside_inference_mode_with_buffers_made_in_it(llama_model):
    """fast.step() outside torch.inference_mode() on buffers made inside it (a wrapper made, reset to a new batch size,
    or copied there: a fork of a stream) failed inside torch ("Inplace update to inference tensor outside
    InferenceMode"), where calling the wrapper went on. step() now goes on with normal copies too."""
    ids = random_ids(40, seed=64).reshape(1, -1)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids)
    with torch.inference_mode():
        made_inside = make_fast(llama_model, compile="never")
        resized = make_fast(llama_model, compile="never")
        resized.reset(batch_size=2)
        resized(ids[:, :20])  # a new stream of one: buffers of one allocated again, inside the mode
        made_inside(ids[:, :20])
        for t in range(20, 25):
            made_inside.step(ids[:, t : t + 1])
        fork = copy.deepcopy(made_inside)
    for wrapper, start in ((made_inside, 25), (fork, 25), (resized, 20)):
        streamed = torch.cat([wrapper.step(ids[:, t : t + 1]) for t in range(start, 40)], dim=1)
        assert max_abs_diff(streamed, expected[:, start:]) <= TOLERANCE


@pytest.mark.parametrize("inside", ["reset()", "a read of its cache"])
def test_a_wrapper_made_outside_inference_mode_goes_on_outside_it_after_a_reset_or_read_in_it(llama_model, inside):
    """A FastStreamingWrapper made outside torch.inference_mode(), reset inside it (or its cache read inside it after
    static steps: `fast.cache.kept_positions()` in a notebook cell under the mode), then fed outside it: the cache's
    slot positions, rebuilt under the mode, were an inference tensor beside normal buffers, and the next block failed
    inside torch ("Inplace update to inference tensor outside InferenceMode")."""
    ids = random_ids(24, seed=65)[None]
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids[0])
    fast = make_fast(llama_model, compile="never")
    fast(ids[:, :8])
    for t in range(8, 12):
        fast.step(ids[:, t : t + 1])
    with torch.inference_mode():
        if inside == "reset()":
            fast.reset()
        else:
            fast.cache.kept_positions()
    start = 0 if inside == "reset()" else 12
    streamed = [fast(ids[:, start:20])] + [fast.step(ids[:, t : t + 1]) for t in range(20, 24)]
    assert max_abs_diff(torch.cat(streamed, dim=1)[0], expected[start:]) <= TOLERANCE


def test_generate_outside_inference_mode_on_the_cache_of_a_wrapper_made_inside_it(llama_model):
    """A FastStreamingWrapper made and fed inside torch.inference_mode(), its cache then handed to model.generate()
    outside it (a documented flow): the cache's layers went on with copies of their own, and the wrapper's next call
    refused its cache as "given new buffers outside the wrapper". The wrapper's buffers are copied for both now."""
    ids = random_ids(12, seed=66)[None]
    with torch.inference_mode():
        fast = make_fast(llama_model, compile="never")
        fast(ids[:, :8])
    out = fast.model.generate(ids, past_key_values=fast.cache, max_new_tokens=3, do_sample=False)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), out[0])
    assert fast.tokens_seen == 14
    assert max_abs_diff(fast.step(out[:, 14:])[0], expected[14:]) <= TOLERANCE


def test_a_cache_emptied_and_fed_inside_inference_mode_goes_on_outside_it_with_its_own_keys(llama_model):
    """The cache of a FastStreamingWrapper made inside torch.inference_mode(), emptied by transformers' Cache.reset()
    and fed again inside the mode (its layers then hold buffers of their own), fed outside it: its layers were given
    copies of the wrapper's buffers, which hold the stream from before the reset, in place of their own keys (logits
    off by ~8, silently). They go on with copies of their own, as a StreamingKVCache's layers do."""
    ids = random_ids(40, seed=67)[None]
    with torch.inference_mode():
        fast = make_fast(llama_model, compile="never")
        fast(random_ids(30, seed=68)[None])  # an earlier stream, in the wrapper's buffers
        cache = fast.cache
        cache.reset()
        fast.model(ids[:, :25], past_key_values=cache, use_cache=True)
    with torch.no_grad():
        logits = fast.model(ids[:, 25:], past_key_values=cache, use_cache=True).logits
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids[0])
    assert max_abs_diff(logits[0], expected[25:]) <= TOLERANCE
@pytest.mark.parametrize("n_sink", [0, N_SINK])
def test_a_block_outside_inference_mode_after_static_steps_or_reset_in_it(llama_model, n_sink):
    """Buffers made outside torch.inference_mode(), a static step taken in it (its cache then read, by model(...,
    past_key_values=fast.cache) or `fast.cache`), or reset() in it: the layers' slot positions, rebuilt in the mode, were
    inference tensors, and the next block outside it failed inside torch ("Inplace update to inference tensor outside
    InferenceMode"), its pass stopped after some layers had stored it (every later call refused). They are normal
    tensors, as the buffers are: the stream goes on as one run wholly outside the mode."""
    ids = random_ids(30, seed=72).reshape(1, -1)
    expected = feed_stream(make_wrapper(llama_model, n_sink, WINDOW_SIZE), ids)
    fast, after_reset = make_fast(llama_model, n_sink, compile="never"), make_fast(llama_model, n_sink, compile="never")
    after_reset(ids[:, :3])
    with torch.inference_mode():
        if n_sink:
            fast(ids[:, :n_sink])
        streamed = [fast.step(ids[:, n_sink : n_sink + 1])]
        streamed.append(fast.model(ids[:, n_sink + 1 : 8], past_key_values=fast.cache, use_cache=True).logits)
        after_reset.reset()
    streamed.append(fast(ids[:, 8:20]))
    streamed += [fast.step(ids[:, t : t + 1]) for t in range(20, 30)]
    assert max_abs_diff(torch.cat(streamed, dim=1), expected[:, n_sink:]) <= TOLERANCE
    assert max_abs_diff(after_reset(ids), expected) <= TOLERANCE


@pytest.mark.parametrize("first", ["a call", "step()", "tokens_seen"])
def test_a_stream_begun_by_generate_under_inference_mode_for_a_new_batch_goes_on_outside_it(llama_model, first):
    """model.generate(batch of 2, past_key_values=fast.cache) on a fresh wrapper of one, under torch.inference_mode():
    the stream's buffers, allocated for its batch there, were inference tensors, and the next call, step() or read of
    tokens_seen outside the mode failed inside torch ("Inplace update to inference tensor outside InferenceMode"): the
    wrapper took up the stream (writing its step counter) before it took copies of the buffers. It takes the copies
    first now (found by tests/lifecycle_campaign.py, seed 30172, for tokens_seen)."""
    ids = random_ids(16, seed=73, batch=2)
    fast = make_fast(llama_model, compile="never")
    with torch.inference_mode():
        fast.model(ids[:, :9], past_key_values=fast.cache, use_cache=True)
    if first == "tokens_seen":
        assert fast.tokens_seen == 9
    streamed = fast.step(ids[:, 9:10]) if first != "a call" else fast(ids[:, 9:16])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), ids)[:, 9 : 9 + streamed.shape[1]]
    assert max_abs_diff(streamed, expected) <= TOLERANCE


def test_a_stream_under_autocast_and_begun_or_continued_outside_it(llama_model):
    """torch.autocast("cpu", dtype=torch.bfloat16) around the calls on an fp32 model (common in notebooks): the
    projections give bfloat16 keys and values, and Llama's RoPE (angles in float32) turns the keys back to float32.
    Every wrapper failed inside torch ("expected scalar type Float but found BFloat16" from the fused CPU attention,
    index_copy_'s dtypes in the static step) or refused the stream as another model's ("this cache holds keys of another
    shape, dtype or device ... make a new one for this model"), also a stream begun outside autocast and continued
    under it, or the reverse. Now each streams within bfloat16's tolerance of the float32 stream (logits up to ~6
    here; the dense model under the same autocast is 0.2 off its float32 logits); SmolLM3's layer without RoPE, which
    holds bfloat16 when begun under autocast, takes float32 after it (also in the static step's buffers, which hold
    the model's dtype); model.generate() picks the same tokens."""
    from tiny_models import build_llama_family

    from streaming_llm import StreamingKVCache, prepare_model

    ids = random_ids(40, seed=1).reshape(1, -1)
    pieces = [(0, 16), *((i, i + 1) for i in range(16, 28)), (28, 34), *((i, i + 1) for i in range(34, 40))]
    plans = {"under it": [True] * 20, "begun under it": [True] + [False] * 19, "continued under it": [False] + [True] * 19}

    def stream(wrapper, under):  # blocks and single tokens
        logits = []
        for index, (start, stop) in enumerate(pieces):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=under[index]):
                logits.append(wrapper(ids[:, start:stop]).float())
        return torch.cat(logits, dim=1)

    smollm3 = build_llama_family("smollm3")
    for model, make in ((llama_model, lambda model: make_wrapper(model, 2, 8)),
                        (llama_model, lambda model: make_wrapper(model, 2, 8, streaming_mode="mit")),
                        (llama_model, lambda model: make_fast(model, 2, 8, compile="never")),
                        (smollm3, lambda model: make_wrapper(model, 2, 8)),
                        (smollm3, lambda model: make_fast(model, 2, 8, compile="never"))):
        expected = stream(make(model), [False] * 20)
        for name, under in plans.items():
            assert max_abs_diff(stream(make(model), under), expected) < 0.3, name
    model = prepare_model(copy.deepcopy(llama_model))
    expected = model.generate(ids[:, :20], past_key_values=StreamingKVCache(2, 8), max_new_tokens=10, do_sample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.generate(ids[:, :20], past_key_values=StreamingKVCache(2, 8), max_new_tokens=10,
                                   do_sample=False)
    assert torch.equal(generated, expected)


def test_a_half_model_under_autocast_of_the_other_half_dtype(llama_model):
    """A bfloat16 model under torch.autocast of float16 (torch.autocast("cuda")'s default dtype), or a float16 one
    under bfloat16 autocast: autocast's torch.cat refuses to join the two half dtypes, and every wrapper failed
    inside torch ("Unexpected floating ScalarType in at::autocast::prioritize": RoPE's rotate_half, the kept
    blocks, the sinks of the static step, the frame's move), where the plain model runs. The streaming attention
    and the re-rotations now run in the model's dtype with autocast off; each stream, begun under autocast or
    outside it, keeps within the half dtypes' tolerance of the same stream without autocast (up to 0.16 off, logits
    up to ~6; the bfloat16 stream is 0.19 off the float32 one), through eviction and frame moves, on the general path,
    in mit and pos_shift modes and in the static step."""
    ids = random_ids(40, seed=2).reshape(1, -1)
    pieces = [(0, 12), *((i, i + 1) for i in range(12, 26)), (26, 30), *((i, i + 1) for i in range(30, 40))]

    def stream(wrapper, autocast_dtype=None, begun_under=True):
        logits = []
        for index, (start, stop) in enumerate(pieces):
            under = autocast_dtype is not None and (begun_under or index > 0)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=under):
                logits.append(wrapper(ids[:, start:stop]).float())
        return torch.cat(logits, dim=1)

    makers = (lambda model: make_wrapper(model, 2, 6), lambda model: make_wrapper(model, 2, 6, streaming_mode="mit"),
              lambda model: make_wrapper(model, 2, 6, position_mode="pos_shift"),
              lambda model: make_fast(model, 2, 6, compile="never"))
    for dtype, other in ((torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)):
        model = copy.deepcopy(llama_model).to(dtype)
        for make in makers:
            expected = stream(make(model))
            for begun_under in (True, False):
                assert max_abs_diff(stream(make(model), other, begun_under), expected) < 0.3, (dtype, begun_under)
    fast = make_fast(model, 2, 6, compile="never")
    counter = CountingSteps(fast)
    stream(fast, torch.bfloat16)
    assert counter.calls["full"] > 0


@pytest.mark.parametrize("dtype, other", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_partly_rotated_interleaved_half_model_under_autocast_of_the_other_half_dtype(dtype, other):
    """GLM (interleaved rotary pairs, half of each head rotated): the streaming attention reorders q and k into
    rotate-half order with a torch.cat (the rotated features, then the rest), which ran before autocast was turned off,
    on keys in the held dtype: a stream begun outside autocast and continued under the other half dtype's, and every
    FastStreamingWrapper stream under it (its buffers hold the model's dtype), failed inside torch ("Unexpected floating
    ScalarType in at::autocast::prioritize") where the plain model runs. They stream as llama's do."""
    from tiny_models import build_llama_family

    ids = random_ids(30, seed=2).reshape(1, -1)
    pieces = [(0, 8), *((i, i + 1) for i in range(8, 30))]
    model = build_llama_family("glm").to(dtype)

    def stream(wrapper, under, begun_under):
        logits = []
        for index, (start, stop) in enumerate(pieces):
            with torch.autocast("cpu", dtype=other, enabled=under and (begun_under or index > 0)):
                logits.append(wrapper(ids[:, start:stop]).float())
        return torch.cat(logits, dim=1)

    for make in (lambda: make_wrapper(model, 2, 6), lambda: make_fast(model, 2, 6, compile="never")):
        expected = stream(make(), False, False)
        for begun_under in (True, False):
            assert max_abs_diff(stream(make(), True, begun_under), expected) < 0.3, begun_under


def test_autograd_on_is_named_once(llama_model):
    """The cache is for inference: with autograd on (no torch.no_grad()), its in-place buffers make backward fail
    and keep every step's graph alive, so memory grows with the stream. It runs, but says so once per cache."""
    import warnings

    from streaming_llm import StreamingKVCache, prepare_model

    model = prepare_model(copy.deepcopy(llama_model))
    ids = random_ids(12, seed=3).reshape(1, -1)
    with torch.enable_grad(), pytest.warns(UserWarning, match="autograd on") as caught:
        cache = StreamingKVCache(2, 4)
        for start in range(0, 12, 3):
            model(ids[:, start : start + 3], past_key_values=cache)
    assert sum("autograd on" in str(warning.message) for warning in caught) == 1
    # at the model call above, not inside transformers' attention, which calls the cache's update
    assert [warning.filename for warning in caught if "autograd on" in str(warning.message)] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, past_key_values=StreamingKVCache(2, 4))  # under the tests' no_grad: silent


class CapturedOnce(GraphedStep):
    """GraphedStep keeping what the real one keeps: a "graph" and the logits of its capture (which ran the step once),
    not the step function it captured, nor the wrapper (a replay gives those logits again)."""

    def _warm_up(self, function):
        pass

    def _capture(self, function):
        return SimpleNamespace(replay=lambda: None), function(self.token_ids)


@pytest.mark.parametrize("compile", ["never", "always", "captured"])
def test_a_dropped_wrapper_is_freed_at_once_with_its_buffers_and_model(llama_model, compile, monkeypatch):
    """A process that makes a FastStreamingWrapper per job (a model per request, a benchmark per shape) has each one's
    buffers and model back when it drops it, not at some later run of Python's cycle collector: its built steps (bound
    methods, a compiled one) and its static cache's sink rotations referred back to it, so that every wrapper dropped
    stayed in memory, on the GPU too, until then. ("captured": the steps built as on CUDA, GraphedStep's protocol.)"""
    import gc

    input_ids = random_ids(3 * (N_SINK + WINDOW_SIZE), seed=66)
    if compile == "captured":
        monkeypatch.setattr(fast_module, "GraphedStep", CapturedOnce)
        monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    fast = make_fast(llama_model, compile="never" if compile == "captured" else compile)
    if compile == "captured":
        fast.step_kind = "cuda_graph"
    fast(input_ids[None, :6])
    for t in range(6, input_ids.shape[0]):
        fast.step(input_ids[None, t : t + 1])
    assert set(fast._compiled) == {True, False}  # both steps built: the filling and the full buffer's
    if compile == "captured":
        assert all(type(step) is CapturedOnce for step in fast._compiled.values())
    alive = [weakref.ref(thing) for thing in (fast, fast.model, fast.keys[0], fast.static_cache)]
    gc.collect()
    gc.disable()
    try:
        del fast
        assert [ref() is None for ref in alive] == [True] * len(alive)
    finally:
        gc.enable()


@pytest.mark.parametrize("freed_by", ["its last reference", "the cycle collector"])
def test_a_cache_kept_from_before_static_steps_goes_on_after_its_wrapper_is_gone(llama_model, freed_by):
    """`kept = fast.cache`, static steps, then the wrapper dropped: the kept cache asked the wrapper for the steps it had
    not seen, and with the wrapper gone it fed on from the count of before over buffers the steps had moved on (logits
    off by ~7). The wrapper now brings its stream up to date as it goes; a shallow copy dropped while the wrapper lives
    on (its counts older) leaves the stream alone."""
    import gc

    input_ids = random_ids(40, seed=67)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)[20:]
    fast = make_fast(llama_model, compile="never")
    fast(input_ids[None, :10])
    kept, model = fast.cache, fast.model
    for t in range(10, 14):
        fast.step(input_ids[None, t : t + 1])
    shallow = copy.copy(fast)  # (counts of 14 tokens, not yet in the layers)
    for t in range(14, 18):
        fast.step(input_ids[None, t : t + 1])
    assert fast.cache is kept and kept.get_seq_length() == 18
    del shallow
    assert kept.get_seq_length() == 18  # (not taken back to 14 by the copy)
    for t in range(18, 20):
        fast.step(input_ids[None, t : t + 1])
    alive = weakref.ref(fast)
    if freed_by == "the cycle collector":
        fast.cycle = fast
    del fast
    gc.collect()
    assert alive() is None
    block = input_ids[None, 20:]
    with torch.no_grad():
        logits = model(block, position_ids=torch.zeros_like(block), past_key_values=kept, use_cache=True).logits
    assert max_abs_diff(logits[0], expected) <= TOLERANCE


def test_a_wrapper_alive_when_python_exits_leaves_no_error(tmp_path):
    """A FastStreamingWrapper freed while the interpreter exits, after its module's names were cleared (here over a
    torch.compile'd model, whose compiled code keeps the wrapper until then): its __del__ failed ("Exception ignored in
    ... FastStreamingWrapper.__del__ ... AttributeError: 'NoneType' object has no attribute 'is_finalizing'")."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ends_with_a_wrapper.py"
    script.write_text(
        "import sys\n"
        "import torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from tiny_models import build_llama, random_ids\n"
        "from streaming_llm.fast import FastStreamingWrapper\n"
        "fast = FastStreamingWrapper(torch.compile(build_llama(), backend='eager'), n_sink=2, window_size=8)\n"
        "print(tuple(fast(random_ids(20, seed=3)[None]).shape))\n",
        encoding="utf-8",
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout == "(1, 20, 128)\n", result.stderr
    assert "Exception ignored" not in result.stderr, result.stderr[-2000:]
