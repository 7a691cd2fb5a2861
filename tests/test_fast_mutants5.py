"""Behaviour of the static-shape fast path (streaming_llm/fast.py) that no other test pinned down, found by the fifth
mutation-testing round.

Each test here fails on at least one small change to fast.py (a changed number, a flipped comparison) that the rest
of the suite let through.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from test_fast_path import make_fast as fast_path_wrapper
from tiny_models import feed_stream, make_wrapper, max_abs_diff, random_ids

from streaming_llm import fast as fast_module
from streaming_llm.fast import DECODE_ATTENTION, decode_attention

N_SINK, WINDOW_SIZE = 2, 6


def make_fast(model, n_sink=N_SINK, window_size=WINDOW_SIZE, compile="never", **options):
    """test_fast_path's fast wrapper over a copy of the model, with this file's sizes, eager unless told otherwise."""
    return fast_path_wrapper(model, n_sink, window_size, compile=compile, **options)


def naive_attention(query, key, value, mask, scaling):
    """One query token per head over every key, the kv head of query head h being h // (heads // kv_heads)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask.double()
    return (scores.softmax(-1) @ value.double()).float()


@pytest.mark.parametrize("scaling", [0.3, None])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (2, 2)])
def test_each_decode_attention_formulation_is_its_own_kernel_call(monkeypatch, heads, kv_heads, masked, scaling):
    """decode_attention's formulations give the same attention (scaled by 1/sqrt(head_dim) where no scaling is given,
    as SDPA's default), each by the kernel call its docstring names: "grouped" one SDPA call with the query heads of a
    kv head as rows ([b, kv_heads, groups, d]), "gqa" one SDPA call with enable_gqa where query heads share kv heads
    (not otherwise: it narrows the SDPA backends that may run), "expanded_masked" one SDPA call over keys repeated
    per query head with an explicit mask, "matmul" no SDPA call at all. They are what the benchmark compares
    (docs/performance.md); a formulation that took another's kernel would still give the same numbers."""
    generator = torch.Generator().manual_seed(0)
    batch, slots, dim = 2, 7, 8
    groups = heads // kv_heads
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 1, slots).masked_fill(torch.arange(slots) > 4, float("-inf"))
    expected = naive_attention(query, key, value, mask, dim**-0.5 if scaling is None else scaling)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording(q, k, v, attn_mask=None, scale=None, enable_gqa=False, **kwargs):
        calls.append(dict(query=tuple(q.shape), key=tuple(k.shape), masked=attn_mask is not None, gqa=enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    expected_calls = {
        "grouped": [dict(query=(batch, kv_heads, groups, dim), key=(batch, kv_heads, slots, dim), masked=masked,
                         gqa=False)],
        "gqa": [dict(query=(batch, heads, 1, dim), key=(batch, kv_heads, slots, dim), masked=masked, gqa=groups > 1)],
        "expanded_masked": [dict(query=(batch, heads, 1, dim), key=(batch, heads, slots, dim), masked=True, gqa=False)],
        "matmul": [],
    }
    assert set(expected_calls) == set(DECODE_ATTENTION)
    for variant in DECODE_ATTENTION:
        calls.clear()
        output = decode_attention(query, key, value, mask, scaling, variant)
        assert output.shape == (batch, heads, 1, dim), variant
        assert torch.allclose(output, expected, atol=1e-5), variant
        assert calls == expected_calls[variant], variant


def test_the_static_attention_returns_transformers_layout_of_batch_query_heads_features():
    """static_streaming_attention_forward answers as every attention function of transformers' AttentionInterface:
    [batch, query tokens, heads, head_dim], each head's attention of the query in its place (the models reshape it to
    [batch, query tokens, hidden]; the one-token layout [batch, heads, 1, head_dim] has the same memory, so no
    model output shows the difference, but it is another tensor: a model that reads its heads axis reads tokens)."""
    from types import SimpleNamespace

    generator = torch.Generator().manual_seed(1)
    batch, heads, kv_heads, slots, dim = 2, 4, 2, 6, 8
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    key = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    value = torch.randn(batch, kv_heads, slots, dim, generator=generator)
    module = SimpleNamespace(streaming_window=None, streaming_rotary=SimpleNamespace(to_half_layout=lambda x: x))
    output, weights = fast_module.static_streaming_attention_forward(
        module, query, key, value, None, scaling=0.25, streaming_mask=None, streaming_decode_attention="grouped",
        streaming_window_masks={}, streaming_ring_masks={})
    assert weights is None
    assert output.shape == (batch, 1, heads, dim)
    assert torch.allclose(output, naive_attention(query, key, value, None, 0.25).transpose(1, 2), atol=1e-5)


def test_compress_of_the_fast_wrappers_cache_without_a_layer_is_the_first_layers(llama_model):
    """cache.compress() with no layer given is layer 0's kept keys and values (StreamingKVCache.compress's default),
    also through the fast wrapper's cache after static steps: the same as the general wrapper's."""
    input_ids = random_ids(15, seed=3)[None]
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    general(input_ids)
    fast = make_fast(llama_model)
    feed_stream(fast, input_ids[0])
    kept = fast.cache
    for got, first, want in zip(kept.compress(), kept.compress(0), general.cache.compress()):
        assert torch.equal(got, first)
        assert max_abs_diff(got, want) <= 1e-4
    assert max_abs_diff(kept.compress(1)[0], kept.compress(0)[0]) > 1e-2  # (the layers hold different keys)


@pytest.mark.parametrize("cache, batch", [("its own", 3), ("a new StreamingKVCache given to it", 3),
                                          ("its own, reset for a batch of 2", 1)])
def test_generate_on_a_fresh_wrappers_cache_takes_the_batch_it_is_given(llama_model, cache, batch):
    """model.generate(batch of 3, past_key_values=fast.cache) on a fresh wrapper starts a stream of 3 (the tiny Llama
    has 2 kv heads: a batch of 2 cannot tell the batch axis from the heads axis), also where the wrapper was given an
    empty cache of its own first (`fast.cache = StreamingKVCache(...)`: its stream is as empty as a fresh one); a
    wrapper reset for a batch of 2 takes a single stream so; and the wrapper's steps go on with it as the general
    wrapper does."""
    from streaming_llm import StreamingKVCache

    prompts = random_ids(6, seed=61, batch=batch)
    fast = make_fast(llama_model)
    if cache == "a new StreamingKVCache given to it":
        fast.cache = StreamingKVCache(N_SINK, WINDOW_SIZE, num_layers=2)
    elif cache == "its own, reset for a batch of 2":
        fast.reset(batch_size=2)
    generated = fast.model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=fast.cache,
                                    max_new_tokens=4, do_sample=False)
    assert tuple(fast.keys[0].shape[:1]) == (batch,) and fast.tokens_seen == 9
    stream = torch.cat([generated, random_ids(3, seed=62, batch=batch)], dim=1)  # 9 tokens fed, then 4 more
    streamed = torch.cat([fast.step(stream[:, 9 + i : 10 + i]) for i in range(4)], dim=1)
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), stream)
    assert max_abs_diff(streamed, expected[:, 9:]) <= 1e-4


def test_a_compiled_wrapper_freezes_no_weights_unless_asked(llama_model, monkeypatch):
    """freeze_weights is False by default: a compiled wrapper's steps, the full buffer's included, are not frozen (a
    frozen step keeps a copy of the weights and misses their edits, docs/performance.md). Here torch.compile is the
    identity and freezing a marker, so the steps run eagerly."""
    frozen_steps = []
    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    monkeypatch.setattr(fast_module, "frozen", lambda step: frozen_steps.append(step) or step)
    wrapper = make_fast(llama_model, 2, 4, compile="always")
    assert wrapper.freeze_weights is False
    ids = random_ids(10, seed=5)[None]
    for t in range(ids.shape[1]):
        wrapper(ids[:, t : t + 1])
    assert set(wrapper._compiled) == {False, True} and frozen_steps == []


@pytest.mark.parametrize("given", ["a new StreamingKVCache", "a general wrapper's stream"])
def test_a_cache_given_after_the_wrappers_cache_was_reset_goes_on(llama_model, given):
    """`fast.cache.reset()` (transformers' Cache.reset(): the layers let their buffers go), then `fast.cache = other`:
    the wrapper takes the other stream up and goes on with it, as the general wrapper does (the reset cache, holding
    no buffers, has none to be let go of)."""
    from streaming_llm import StreamingKVCache

    input_ids = random_ids(14, seed=63)[None]
    fast = make_fast(llama_model)
    feed_stream(fast, random_ids(11, seed=64))
    fast.cache.reset()
    general = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
    if given == "a new StreamingKVCache":
        fast.cache = StreamingKVCache(N_SINK, WINDOW_SIZE, num_layers=2)
        expected = general(input_ids)
        streamed = torch.cat([fast(input_ids[:, t : t + 1]) for t in range(14)], dim=1)
    else:
        general(input_ids[:, :9])
        fast.cache = copy.deepcopy(general.cache)
        expected = torch.cat([general(input_ids[:, t : t + 1]) for t in range(9, 14)], dim=1)
        streamed = torch.cat([fast.step(input_ids[:, t : t + 1]) for t in range(9, 14)], dim=1)
    assert max_abs_diff(streamed, expected) <= 1e-4


@pytest.mark.parametrize("given", ["a stream whose last pass stopped after the first layer",
                                   "a stream of a model with fewer layers"])
def test_a_cache_whose_layers_hold_different_counts_is_refused_when_given_naming_each(llama_model, given):
    """A stream whose layers hold different numbers of tokens, given to the fast wrapper, is refused at once, the error
    naming the first layer's count and then the other one (the numbers a user compares): a pass stopped after the first
    layer (13 tokens against 10), or the stream of a model with fewer layers than the wrapper's (its missing layer
    holds 0)."""
    from test_validation import interrupt_after_the_first_layer
    from tiny_models import build_llama_family

    ids = random_ids(13, seed=65)[None]
    if given == "a stream of a model with fewer layers":
        began = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)
        began(ids)
        fast = make_fast(build_llama_family("llama", num_hidden_layers=3))
        counts = (13, 0)
    else:
        began = make_wrapper(copy.deepcopy(llama_model), N_SINK, WINDOW_SIZE)
        began(ids[:, :10])
        interrupt_after_the_first_layer(began.model, lambda: began(ids[:, 10:]))
        fast = make_fast(llama_model)
        counts = (13, 10)
    with pytest.raises(RuntimeError, match=f"its first layer has taken {counts[0]} tokens of the stream, a later one "
                                           f"{counts[1]}, "):
        fast.cache = copy.deepcopy(began.cache)


@pytest.mark.parametrize("other", ["another model's keys", "another dtype"])
def test_a_cache_of_other_keys_is_refused_when_given_naming_both_key_buffers(llama_model, gpt_neox_model, other):
    """A stream of other key buffers given to the fast wrapper is refused, the error naming the shape, dtype and
    device of the given layers' keys and of the keys this wrapper's model streams (not of their sinks)."""
    import re

    if other == "another model's keys":
        began, shape = make_wrapper(gpt_neox_model, N_SINK, WINDOW_SIZE), "(1, 4, 9, 16), torch.float32"
    else:
        began, shape = make_wrapper(copy.deepcopy(llama_model).double(), N_SINK, WINDOW_SIZE), "(1, 2, 9, 16), torch.float64"
    began(random_ids(9, seed=66)[None])
    fast = make_fast(llama_model)
    message = (f"this cache holds keys of another shape, dtype or device (layers of {shape}, cpu) than this wrapper's "
               "model streams ((1, 2, 9, 16), torch.float32, cpu): make a new one for this model")
    with pytest.raises(ValueError, match=re.escape(message)):
        fast.cache = copy.deepcopy(began.cache)


def test_a_cache_that_left_the_wrapper_fed_another_batch_leaves_the_wrappers_stream_alone(llama_model):
    """`kept = fast.cache; fast.cache = StreamingKVCache(...)`: the cache kept, reset (Cache.reset()) and fed by
    generate() a batch of 2 while the wrapper streams on (one stream, 5 tokens in), is a stream of its own: it takes
    that batch as a StreamingKVCache does, and the wrapper's buffers, batch and stream stay as they were."""
    from streaming_llm import StreamingKVCache

    ids, prompts = random_ids(9, seed=67)[None], random_ids(6, seed=68, batch=2)
    fast = make_fast(llama_model)
    kept = fast.cache
    fast.cache = StreamingKVCache(N_SINK, WINDOW_SIZE, num_layers=2)
    fast(ids[:, :5])
    kept.reset()
    generated = fast.model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=kept,
                                    max_new_tokens=3, do_sample=False)
    alone = fast.model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                past_key_values=StreamingKVCache(N_SINK, WINDOW_SIZE), max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, alone)
    streamed = torch.cat([fast.step(ids[:, t : t + 1]) for t in range(5, 9)], dim=1)
    expected = make_wrapper(llama_model, N_SINK, WINDOW_SIZE)(ids)[:, 5:]
    assert fast.tokens_seen == 9 and max_abs_diff(streamed, expected) <= 1e-4


def interrupt_after_layer(model, index, feed) -> None:
    """Run `feed()` with a KeyboardInterrupt raised after the model's layer `index`: a forward pass stopped part-way."""

    def stop(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[index].register_forward_hook(stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            feed()
    finally:
        handle.remove()


@pytest.mark.parametrize("then", ["step()", "a call", "tokens_seen"])
@pytest.mark.parametrize("layers, stopped_after", [(2, 0), (3, 1)])
def test_the_wrappers_stream_fed_by_a_pass_stopped_part_way_is_refused_naming_each_count(llama_model, layers,
                                                                                         stopped_after, then):
    """The model fed the fast wrapper's cache itself (model(..., past_key_values=fast.cache)), and that pass stopped
    after its first layer, or after the second of three: the wrapper's next step, call or read refuses the stream,
    naming the first layer's count (13) and then the last one's, which the pass never reached (10)."""
    from tiny_models import build_llama_family

    ids = random_ids(14, seed=69)[None]
    fast = make_fast(llama_model if layers == 2 else build_llama_family("llama", num_hidden_layers=layers))
    fast(ids[:, :10])
    block = ids[:, 10:13]
    interrupt_after_layer(fast.model, stopped_after, lambda: fast.model(block, position_ids=torch.zeros_like(block),
                                                                        past_key_values=fast.cache, use_cache=True))
    with pytest.raises(RuntimeError, match="its first layer has taken 13 tokens of the stream, a later one 10, "):
        if then == "step()":
            fast.step(ids[:, 13:])
        elif then == "a call":
            fast(ids[:, 13:])
        else:
            fast.tokens_seen


@pytest.mark.parametrize("then", ["step()", "a call", "tokens_seen"])
def test_the_wrappers_cache_given_back_after_generate_fed_it_goes_on_from_there(llama_model, then):
    """`kept = fast.cache`, model.generate(past_key_values=kept) feeds it, then `fast.cache = kept` gives it back: the
    wrapper goes on from where generate() left the stream (it is the stream over the wrapper's own buffers), as it
    does when the cache is not given back."""
    input_ids = random_ids(30, seed=70)
    fast = make_fast(llama_model)
    fast(input_ids[None, :6])
    fast(input_ids[None, 6:7])  # a static step
    kept = fast.cache
    generated = fast.model.generate(input_ids[None, :12], attention_mask=torch.ones(1, 12, dtype=torch.long),
                                    past_key_values=kept, max_new_tokens=6, do_sample=False)
    fast.cache = kept
    if then == "tokens_seen":
        assert fast.tokens_seen == 17
    stream = torch.cat([generated[0], input_ids[:3]])
    feed = fast.step if then == "step()" else fast
    streamed = torch.cat([feed(stream[None, 17 + i : 18 + i])[0] for i in range(4)])
    expected = feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), stream)
    assert max_abs_diff(streamed, expected[17:]) <= 1e-4
    assert fast.tokens_seen == 21 == fast.cache.get_seq_length()


@pytest.mark.parametrize("n_sink", [0, N_SINK])
def test_step_runs_every_token_from_the_sinks_on_through_the_static_step(llama_model, n_sink):
    """step() takes the general path for the first n_sink tokens only: token n_sink is the first static step, as for
    a call with one token (docs: blocks and the first n_sink tokens take the general path)."""
    from test_fast_path import CountingSteps

    input_ids = random_ids(20, seed=71)[None]
    fast = make_fast(llama_model, n_sink=n_sink)
    counter = CountingSteps(fast)
    stepped = torch.cat([fast.step(input_ids[:, t : t + 1]) for t in range(20)], dim=1)
    expected = make_wrapper(llama_model, n_sink, WINDOW_SIZE)(input_ids)
    assert max_abs_diff(stepped, expected) <= 1e-4
    assert counter.calls == {"filling": WINDOW_SIZE, "full": 20 - n_sink - WINDOW_SIZE}


def test_a_step_torch_compile_refuses_is_named_by_the_first_line_of_its_error(llama_model, monkeypatch):
    """The refusal of a step torch.compile cannot trace quotes the first line of torch's error (its summary; the
    lines after it are torch's explanation and hints), and the stream is left as it was."""

    def refusing(function, **options):
        def call(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("\n  data-dependent branching\n  explanation: ...\n  hint: ...")
        return call

    monkeypatch.setattr(torch, "compile", refusing)
    fast = make_fast(llama_model, compile="always")
    input_ids = random_ids(3, seed=72)[None]
    fast(input_ids[:, :N_SINK])
    with pytest.raises(ValueError) as error:
        fast(input_ids[:, N_SINK:])
    assert str(error.value) == ("torch.compile could not compile this model's decode step (TorchDynamoException: "
                                "data-dependent branching); run the step eagerly: compile='never' (--compile never)")
    assert fast.tokens_seen == N_SINK and int(fast.step_position) == N_SINK


def test_a_step_looks_at_the_models_parameters_only_when_some_were_registered_since(llama_model, monkeypatch):
    """A built step compares the count of parameter registrations at every step (an integer) and reads the model's
    parameters (their ids and addresses) only when the count moved: once when the steps are first built, and after a
    parameter was replaced once to see it and once as the step is built again; not per token."""
    signatures = []
    signature = fast_module.parameter_signature
    monkeypatch.setattr(fast_module, "parameter_signature", lambda model: signatures.append(1) or signature(model))
    fast = make_fast(llama_model)
    input_ids = random_ids(20, seed=73)[None]
    for t in range(12):
        fast(input_ids[:, t : t + 1])
    assert len(signatures) == 1
    head = fast.model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for t in range(12, 20):
        fast(input_ids[:, t : t + 1])
    assert len(signatures) == 3


@pytest.mark.parametrize("step_kind", ["compiled", "cuda_graph", "cuda_graph_trees"])
def test_every_compiled_step_is_compiled_as_one_whole_graph(llama_model, monkeypatch, step_kind):
    """Each way of compiling the step asks torch.compile for one whole graph (fullgraph=True: a graph break would
    leave host code in a step that a CUDA graph replays blind), the fallback after a refused capture with
    mode="reduce-overhead" (torch.compile's own CUDA graphs). Here torch.compile records its options and is the
    identity, and a CUDA graph is replayed by running the step (test_fast_path's protocol on CPU)."""
    from test_fast_path import ReplayedGraph

    class RefusedCapture(ReplayedGraph):
        def _capture(self, function):
            raise RuntimeError("operation not permitted when stream is capturing")

    options_seen = []
    monkeypatch.setattr(torch, "compile", lambda function, **options: options_seen.append(options) or function)
    monkeypatch.setattr(fast_module, "GraphedStep", RefusedCapture if step_kind == "cuda_graph_trees" else ReplayedGraph)
    fast = make_fast(llama_model, compile="always")
    assert fast.step_kind == "compiled"
    fast.step_kind = "cuda_graph" if step_kind != "compiled" else step_kind
    input_ids = random_ids(20, seed=74)
    with pytest.warns(RuntimeWarning) if step_kind == "cuda_graph_trees" else contextlib.nullcontext():
        streamed = feed_stream(fast, input_ids)
    assert max_abs_diff(streamed, feed_stream(make_wrapper(llama_model, N_SINK, WINDOW_SIZE), input_ids)) <= 1e-4
    assert fast.step_kind == step_kind
    whole, trees = {"fullgraph": True}, {"mode": "reduce-overhead", "fullgraph": True}
    expected = {"compiled": [whole, whole], "cuda_graph": [whole, whole], "cuda_graph_trees": [whole, trees, trees]}
    assert options_seen == expected[step_kind]


@pytest.mark.parametrize("position_mode, n_sink", [("absolute", 1), ("pos_shift", 8)])
def test_a_sliding_layers_window_over_a_window_of_one_token_streams_as_the_general_path(position_mode, n_sink):
    """window_size = 1 (the least there is) on a hybrid model whose sliding layers' window (8) hides kept sinks:
    under absolute positions from t - j >= 8 on, under pos_shift once the capacity reaches 8. The static step masks
    them as the general path does (the ring of w + 1 = 2 slots is always in view)."""
    from test_sliding_layers import build, stream

    input_ids = random_ids(24, seed=75)
    results = stream(build("gemma3_text"), input_ids, n_sink, 1, position_mode=position_mode)
    assert max_abs_diff(results["static"], results["general"]) <= 1e-4
