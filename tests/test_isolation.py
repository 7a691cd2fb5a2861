"""Using the package leaves the user's model and other code as they were: a wrapped or prepared model run without a
StreamingKVCache is the model as loaded, bit for bit (plain forward, generate with transformers' own caches)."""

import copy

import pytest
import torch
from tiny_models import random_ids
from transformers import StaticCache

from streaming_llm import FastStreamingWrapper, StreamingLLMWrapper, prepare_model

WRAPS = {
    "prepare_model": prepare_model,
    "wrapper": lambda model: StreamingLLMWrapper(model, n_sink=2, window_size=6)(random_ids(12, seed=1)[None]),
    "fast": lambda model: FastStreamingWrapper(model, n_sink=2, window_size=6, compile="never")(random_ids(12, seed=1)[None]),
}


def greedy_scores(model, input_ids, **kwargs):
    out = model.generate(input_ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_an_eager_model_wrapped_runs_densely_as_before_bit_for_bit(model, wrap):
    """The tiny models are loaded with eager attention. A prepared model run without a StreamingKVCache ran
    transformers' SDPA instead: logits off by ~4e-6 from the same model before wrapping, and output_attentions=True,
    which eager attention serves, failed (IndexError). It runs the model's own eager attention now."""
    assert model.config._attn_implementation == "eager"
    before, wrapped = copy.deepcopy(model), copy.deepcopy(model)
    WRAPS[wrap](wrapped)
    input_ids = random_ids(16, seed=2, batch=2)
    padding = torch.ones_like(input_ids)
    padding[1, :3] = 0
    for kwargs in ({}, {"attention_mask": padding}):
        assert torch.equal(wrapped(input_ids, **kwargs).logits, before(input_ids, **kwargs).logits)
    attentions = wrapped(input_ids, output_attentions=True).attentions
    assert all(torch.equal(a, b) for a, b in zip(attentions, before(input_ids, output_attentions=True).attentions))
    for cache in (lambda m: {}, lambda m: {"past_key_values": StaticCache(config=m.config, max_cache_len=32)}):
        for got, expected in zip(greedy_scores(wrapped, input_ids[:1], **cache(wrapped)),
                                 greedy_scores(before, input_ids[:1], **cache(before))):
            assert torch.equal(got, expected)


def fed_wrapper(llama_model, wrapper_class):
    """A copy of the model, a wrapper of the class on it (the fast one uncompiled), its kwargs, and the 10 ids fed."""
    model = copy.deepcopy(llama_model)
    kwargs = {"compile": "never"} if wrapper_class is FastStreamingWrapper else {}
    wrapper = wrapper_class(model, n_sink=2, window_size=6, **kwargs)
    input_ids = random_ids(10, seed=3)[None]
    wrapper(input_ids)
    return model, wrapper, kwargs, input_ids


def assert_every_feed_refused(wrapper, input_ids, pattern: str) -> None:
    """A token, a new stream after reset(), and the fast wrapper's step() are each refused with `pattern`."""
    feeds = [lambda: wrapper(input_ids[:, :1]), lambda: wrapper.reset() or wrapper(input_ids)]
    if isinstance(wrapper, FastStreamingWrapper):
        feeds.append(lambda: wrapper.step(input_ids[:, :1]))
    for feed in feeds:
        with pytest.raises(ValueError, match=pattern):
            feed()


def test_a_model_loaded_with_sdpa_runs_densely_with_its_soft_cap():
    """A prepared Gemma 2 (attention logit soft-capping) loaded with SDPA, run without a StreamingKVCache, attends as
    its eager attention does (SDPA applies no soft cap): the written-out softmax, with grouped query heads. (GPT-OSS,
    whose sink logits take the same path, cannot be loaded with SDPA in transformers 5.)"""
    from tiny_models import build_llama_family

    model = build_llama_family("gemma2")
    input_ids = random_ids(12, seed=2)[None]
    with torch.no_grad():
        expected = model(input_ids).logits
        model.set_attn_implementation("sdpa")
        logits = prepare_model(model)(input_ids).logits
    assert model.model.layers[0].self_attn.streaming_dense_attention == "sdpa"
    assert (logits - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("wrapper_class", [StreamingLLMWrapper, FastStreamingWrapper])
def test_a_model_cast_after_the_wrapper_was_made_is_refused_in_one_line(llama_model, wrapper_class):
    """model.to(torch.bfloat16) also casts the model's RoPE frequencies, which the wrapper had taken in float32: the
    plain wrapper streamed on with the old ones (not the cast model's: a fresh wrapper's logits differed), the fast one
    refused with 'reset it', which did not help, or failed inside index_copy_ mid-stream. Both name the cast now."""
    model, wrapper, kwargs, input_ids = fed_wrapper(llama_model, wrapper_class)
    model.to(torch.bfloat16)
    assert_every_feed_refused(wrapper, input_ids, r"cast or moved after this wrapper was made \(torch.float32.*now "
                                                  r"torch.bfloat16.*make a new wrapper")
    fresh = wrapper_class(model, n_sink=2, window_size=6, **kwargs)
    assert fresh(input_ids).dtype == torch.bfloat16


@pytest.mark.parametrize("wrapper_class", [StreamingLLMWrapper, FastStreamingWrapper])
def test_a_model_cast_and_cast_back_after_the_wrapper_was_made_is_refused(llama_model, wrapper_class):
    """model.half().float() leaves the dtype as it was but rounds the model's RoPE frequencies (new tensors): the
    plain wrapper streamed on with the ones it had taken (1e-3 off a new wrapper's logits here), the fast one rotated
    the sinks with those and the new token with the model's. Refused now; a cast to the dtype the model already has
    (no new tensors) is not."""
    model, wrapper, kwargs, input_ids = fed_wrapper(llama_model, wrapper_class)
    model.float().to("cpu")  # no change: same tensors
    wrapper(input_ids[:, :1])
    model.half().float()
    assert_every_feed_refused(wrapper, input_ids, r"RoPE frequencies were replaced after this wrapper was made .*make a "
                                                  r"new wrapper")
    fresh = wrapper_class(model, n_sink=2, window_size=6, **kwargs)
    within = input_ids[:, :8]  # no more than the cache holds: the model's own logits, with its (rounded) RoPE
    assert torch.allclose(fresh(within), model(within).logits, atol=1e-4)


@pytest.mark.parametrize("other_feeds", ["a wrapper made before", "a wrapper it makes"])
def test_wrappers_on_one_model_in_two_threads_take_turns(llama_model, other_feeds):
    """One model shared by the handlers of a thread pool (a chat server, a Gradio demo): a FastStreamingWrapper's step
    switches the model's attention to its static one for the step, so another thread's wrapper that ran during that
    step ran the static attention on its StreamingKVCache and failed, and one made then (prepare_model) switched the
    model back mid-step. Their forward passes and prepare_model take turns (a lock per model): each stream gives its
    own logits, and the model is left on the streaming attention."""
    import threading

    model, copied = copy.deepcopy(llama_model), copy.deepcopy(llama_model)
    ids = random_ids(12, seed=4)[None]
    fast, general = (FastStreamingWrapper(model, n_sink=2, window_size=6, compile="never"),
                     StreamingLLMWrapper(model, n_sink=2, window_size=6))
    fast(ids[:, :8])  # its next token takes the static step
    reference = FastStreamingWrapper(copied, n_sink=2, window_size=6, compile="never")
    reference(ids[:, :8])
    expected_step = reference.step(ids[:, 8:9])
    expected_general = StreamingLLMWrapper(copied, n_sink=2, window_size=6)(ids)
    main, outcome, entered = threading.current_thread(), {}, threading.Event()

    def feed_other():
        try:
            wrapper = general if other_feeds == "a wrapper made before" else StreamingLLMWrapper(model, n_sink=2, window_size=6)
            outcome["logits"] = wrapper(ids)
        except Exception as error:  # shown by the assertion below
            outcome["error"] = error

    other = threading.Thread(target=feed_other)

    def start_the_other_mid_step(module, args):
        if threading.current_thread() is other:
            entered.set()
        elif threading.current_thread() is main and not other.ident:
            other.start()  # it runs its whole forward pass inside this step if it may start one
            if entered.wait(timeout=0.5):
                other.join()

    handle = model.model.layers[0].register_forward_pre_hook(start_the_other_mid_step)
    try:
        step = fast.step(ids[:, 8:9])
        other.join()
    finally:
        handle.remove()
    assert "error" not in outcome, outcome.get("error")
    assert torch.equal(outcome["logits"], expected_general) and torch.equal(step, expected_step)
    assert model.config._attn_implementation == "streaming_llm"
