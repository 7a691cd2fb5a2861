"""Every model type the package says it supports (models.SUPPORTED_MODEL_TYPES) streams exactly: a tiny model of
each against the dense model (no eviction) and the naive reference (eviction), general path and static step."""

import copy

import pytest
import torch
from reference import naive_streaming_logits
from tiny_models import (block_sizes_covering, build_gemma3_multimodal, build_gpt_neox, build_llama, build_llama_family,
                         check_compiled_step_graphs, dense_logits, feed_stream, make_wrapper, max_abs_diff, random_ids)

from streaming_llm import prepare_model
from streaming_llm.fast import FastStreamingWrapper, compiles_step
from streaming_llm.models import SUPPORTED_MODEL_TYPES, is_mixture_of_experts

TOLERANCE = 1e-4
N_SINK, WINDOW_SIZE, LENGTH = 2, 11, 48
BUILDERS = {"llama": build_llama, "gpt_neox": build_gpt_neox, "gemma3": build_gemma3_multimodal}


@pytest.fixture(scope="module", params=SUPPORTED_MODEL_TYPES)
def typed_model(request):
    model = BUILDERS.get(request.param, lambda: build_llama_family(request.param))()
    assert model.config.model_type == request.param
    return model


def test_no_eviction_equals_dense(typed_model):
    input_ids = random_ids(LENGTH, seed=7)
    dense = dense_logits(typed_model, input_ids)
    for streaming_mode in ("ours", "mit"):
        streamed = feed_stream(make_wrapper(typed_model, N_SINK, LENGTH, streaming_mode=streaming_mode), input_ids,
                               block_sizes_covering(LENGTH, [1, 9, 1, 20]))
        assert max_abs_diff(streamed, dense) <= TOLERANCE, streaming_mode


def dense_in_blocks_after_prepare(model, input_ids, blocks):
    """Logits [T, vocab] of a prepared copy of `model` run densely (a DynamicCache), fed in `blocks`."""
    from streaming_llm import prepare_model
    from streaming_llm.eval.baselines import DenseStepper

    stepper = DenseStepper(prepare_model(copy.deepcopy(model)))
    pieces = input_ids[None].split(block_sizes_covering(input_ids.shape[0], blocks), dim=1)
    return torch.cat([stepper(piece)[0] for piece in pieces]).float()


def test_a_prepared_model_without_a_streaming_cache_is_the_model(typed_model):
    """prepare_model keeps the model's own attention for any other cache: eval's dense baseline runs so."""
    input_ids = random_ids(LENGTH, seed=11)
    assert max_abs_diff(dense_in_blocks_after_prepare(typed_model, input_ids, [1, 9, 1, 20]),
                        dense_logits(typed_model, input_ids)) <= TOLERANCE


def test_a_prepared_model_run_densely_with_left_padding_is_the_model(typed_model):
    """A padded batch without a StreamingKVCache (eval's dense baseline, or any use of a prepared model): the real
    tokens' logits are the model's. The written-out attention (Gemma 2's soft-capping, GPT-OSS's sink logits) hid keys
    at -inf, so a padded query that sees none made NaNs, which reached every token of its row (found in review)."""
    input_ids = random_ids(24, seed=13, batch=2)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0
    prepared = prepare_model(copy.deepcopy(typed_model))
    with torch.no_grad():
        expected = typed_model(input_ids, attention_mask=attention_mask).logits
        logits = prepared(input_ids, attention_mask=attention_mask).logits
    assert not logits.isnan().any()
    assert max_abs_diff(logits[0], expected[0]) <= TOLERANCE and max_abs_diff(logits[1, 5:], expected[1, 5:]) <= TOLERANCE


def test_compiled_step_is_one_graph_that_writes_only_static_buffers(typed_model):
    """The full step of every type; the filling step too for the three built apart (test_sliding_layers traces both
    steps of the types with sliding layers, and the mixtures of experts below both of theirs)."""
    if is_mixture_of_experts(typed_model.config):
        pytest.skip("mixtures of experts: test_a_mixture_of_experts_compiles_with_experts_that_trace")
    both = typed_model.config.model_type in BUILDERS
    check_compiled_step_graphs(typed_model, N_SINK, WINDOW_SIZE, steps=(True, False) if both else (False,))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_mixture_of_experts_compiles_with_experts_that_trace(model_type):
    """transformers' default grouped_mm experts trace in bfloat16 only: compile="always" on a float32 mixture of experts
    failed at its first step with dynamo's traceback (and pages of logged errors); now refused at once, in a sentence
    that names the ways out, the model left as it was. With batched_mm experts the step compiles as one graph."""
    model = build_llama_family(model_type)
    with pytest.raises(ValueError, match=r"float32: .*grouped_mm.*bfloat16 only.*set_experts_implementation\('batched_mm'\)"):
        FastStreamingWrapper(model, N_SINK, WINDOW_SIZE, compile="always")
    assert model.config._attn_implementation == "eager"
    model.set_experts_implementation("batched_mm")
    check_compiled_step_graphs(model, N_SINK, WINDOW_SIZE)


def test_auto_compiles_the_step_on_cuda_except_for_mixtures_of_experts():
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    for config, compiled_on_cuda in ((LlamaConfig(), True), (MixtralConfig(), False), (Qwen3MoeConfig(), False)):
        assert compiles_step("auto", "cuda", config) is compiled_on_cuda
        assert compiles_step("auto", "cpu", config) is False and compiles_step("never", "cuda", config) is False
        assert compiles_step("always", "cpu", config) is True


_REFERENCES: dict = {}


def evicting_reference(model, position_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The stream the eviction tests below feed (seed 8) and the naive reference's logits for it, computed once per
    model and mode: test_mit_mode_eviction_matches_reference holds MIT mode to the pos_shift logits that
    test_eviction_matches_reference computed (the reference, token by token in Python, was most of its time)."""
    input_ids = random_ids(LENGTH, seed=8)
    if (model, position_mode) not in _REFERENCES:  # a module hashes by identity
        _REFERENCES[model, position_mode] = naive_streaming_logits(model, input_ids, N_SINK, WINDOW_SIZE, position_mode)
    return input_ids, _REFERENCES[model, position_mode]


@pytest.mark.parametrize("position_mode", ["pos_shift", "rerotate", "absolute"])
def test_eviction_matches_reference(typed_model, position_mode):
    input_ids, expected = evicting_reference(typed_model, position_mode)
    general = make_wrapper(typed_model, N_SINK, WINDOW_SIZE, position_mode=position_mode)
    assert max_abs_diff(feed_stream(general, input_ids, block_sizes_covering(LENGTH, [5, 1, 13])), expected) <= TOLERANCE
    fast = FastStreamingWrapper(copy.deepcopy(typed_model), N_SINK, WINDOW_SIZE, position_mode=position_mode,
                                compile="never")
    assert max_abs_diff(feed_stream(fast, input_ids), expected) <= TOLERANCE


def test_mit_mode_eviction_matches_reference(typed_model):
    """streaming_mode="mit" (keys stored un-rotated, rotated at their cache index every step) is pos_shift."""
    input_ids, expected = evicting_reference(typed_model, "pos_shift")
    mit = make_wrapper(typed_model, N_SINK, WINDOW_SIZE, streaming_mode="mit")
    assert max_abs_diff(feed_stream(mit, input_ids, block_sizes_covering(LENGTH, [5, 1, 13])), expected) <= TOLERANCE


SLIDING_WINDOW = 16
SLIDING = {"mistral": dict(sliding_window=SLIDING_WINDOW),
           "qwen2": dict(sliding_window=SLIDING_WINDOW, use_sliding_window=True, max_window_layers=0),
           "phi3": dict(sliding_window=SLIDING_WINDOW), "starcoder2": dict(sliding_window=SLIDING_WINDOW)}


@pytest.fixture(scope="module", params=sorted(SLIDING))
def sliding_model(request):
    return build_llama_family(request.param, **SLIDING[request.param])


@pytest.mark.parametrize("blocks", [[1], [7, 1, 20]])
def test_sliding_window_model_is_window_attention_one_below_its_window(sliding_model, blocks):
    """A layer that attends within a sliding window of 16 sees the token and the 15 before it: exactly window
    attention (no sinks) with window_size 15, far past the window, token by token and in blocks, on both paths.
    (transformers' sliding-window mask, laid over the cache's slots, used to hide every held key there.)"""
    input_ids = random_ids(60, seed=9)
    dense = dense_logits(sliding_model, input_ids)
    feeding = block_sizes_covering(60, blocks)
    window = make_wrapper(sliding_model, 0, SLIDING_WINDOW - 1)
    assert max_abs_diff(feed_stream(window, input_ids, feeding), dense) <= TOLERANCE
    fast = FastStreamingWrapper(copy.deepcopy(sliding_model), 0, SLIDING_WINDOW - 1, compile="never")
    assert max_abs_diff(feed_stream(fast, input_ids, feeding), dense) <= TOLERANCE


def test_a_prepared_sliding_window_model_run_densely_keeps_its_window(sliding_model):
    """A prepared model run densely (eval's dense baseline, generate without a StreamingKVCache) attended to every
    earlier token: the streaming mask, which drops the sliding-window overlay, was used for any cache."""
    input_ids = random_ids(60, seed=13)
    assert max_abs_diff(dense_in_blocks_after_prepare(sliding_model, input_ids, [1, 30, 1]),
                        dense_logits(sliding_model, input_ids)) <= TOLERANCE


def test_sinks_stream_past_the_sliding_window(sliding_model):
    input_ids = random_ids(60, seed=10)
    expected = naive_streaming_logits(sliding_model, input_ids, 2, SLIDING_WINDOW - 3)
    streamed = feed_stream(make_wrapper(sliding_model, 2, SLIDING_WINDOW - 3), input_ids, block_sizes_covering(60, [9, 1, 30]))
    assert max_abs_diff(streamed, expected) <= TOLERANCE


def test_capacity_beyond_the_sliding_window_is_refused(sliding_model):
    with pytest.raises(ValueError, match=f"too large for the model's sliding_window={SLIDING_WINDOW}: .* at most 15"):
        make_wrapper(sliding_model, 2, SLIDING_WINDOW - 2)


def test_static_step_refuses_a_model_that_drops_attention_arguments(monkeypatch):
    """StableLM's decoder layers do not pass keyword arguments on to the attention, so the static step's mask of
    empty slots never arrived and the fast path's logits were wrong (by 2.8) without a word, had StableLM been let
    in. The static attention now refuses to run without its arguments; the general path is exact for it."""
    from streaming_llm.models import llama

    monkeypatch.setattr(llama, "MODEL_TYPES", (*llama.MODEL_TYPES, "stablelm"))
    model = build_llama_family("stablelm")
    input_ids = random_ids(20, seed=12)
    fast = FastStreamingWrapper(copy.deepcopy(model), N_SINK, WINDOW_SIZE, compile="never")
    fast(input_ids[None, :4])
    with pytest.raises(RuntimeError, match="StableLmAttention's model does not pass keyword arguments on"):
        fast(input_ids[None, 4:5])


def test_the_documented_list_of_model_types_is_the_supported_one():
    """docs/reliability.md quotes the refusal's list of supported types; a type added to an adapter is added there."""
    from pathlib import Path

    reliability = (Path(__file__).parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"naming the supported types ({', '.join(SUPPORTED_MODEL_TYPES)})" in reliability


def test_gemma3_layers_keep_their_own_rope_everywhere_a_rope_is_used():
    """Gemma 3 rotates its sliding and full-attention layers with different frequencies: each layer's is recorded
    (compress(layer) uses it); what assumes one RoPE for all layers (the chunked baseline's re-rotation) says so; a
    length-dependent RoPE type in any layer type is refused."""
    from streaming_llm.eval.chunked import chunked_streaming_perplexity
    from streaming_llm.models import UnsupportedModelError, describe

    model = build_llama_family("gemma3_text")
    architecture = describe(model)
    sliding, full = architecture.layer_rotaries
    assert sliding is architecture.rotary and not torch.equal(sliding.inv_freq, full.inv_freq)
    wrapper = make_wrapper(model, N_SINK, WINDOW_SIZE)
    wrapper(random_ids(20, seed=14)[None])
    for layer, rotary in zip(wrapper.cache.layers, (sliding, full)):
        assert torch.equal(layer.rotary.inv_freq, rotary.inv_freq)
    for layer_idx, rotary in enumerate((sliding, full)):
        for got, want in zip(wrapper.cache.compress(layer_idx), wrapper.cache.compress(layer_idx, rotary=rotary)):
            assert torch.equal(got, want)
    assert not torch.equal(wrapper.cache.compress(1)[0], wrapper.cache.compress(1, rotary=sliding)[0])
    with pytest.raises(UnsupportedModelError, match="chunked evaluation's re-rotation assumes one RoPE"):
        chunked_streaming_perplexity(model, random_ids(20, seed=14)[None], N_SINK, WINDOW_SIZE, chunk_size=8)
    llama = describe(build_llama())
    assert llama.single_rotary("anything") is llama.rotary and set(map(id, llama.layer_rotaries)) == {id(llama.rotary)}
    dynamic = build_llama_family("gemma3_text", rope_parameters={
        "sliding_attention": dict(rope_type="default", rope_theta=10.0),
        "full_attention": dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0)})
    with pytest.raises(ValueError, match="RoPE type 'dynamic' changes its frequencies"):
        describe(dynamic)


def test_smollm3_layers_without_rope_stream_and_a_model_without_any_is_refused():
    """SmolLM3's layers with use_rope = 0 rotate nothing: their RoPE is NO_ROPE (tested against the dense model and
    the reference above); a model whose every layer is so has no positions for a streaming cache to give."""
    from streaming_llm.models import NO_ROPE, describe

    assert describe(build_llama_family("smollm3")).layer_rotaries[1] is NO_ROPE
    with pytest.raises(ValueError, match="this smollm3 model rotates no features in any layer"):
        describe(build_llama_family("smollm3", no_rope_layers=[0, 0]))


def test_exaone4_full_attention_layers_without_rope_ignore_any_angles_passed_to_them(monkeypatch):
    """Hybrid EXAONE 4 (a sliding window) rotates only in its sliding layers: its full-attention layer gets NO_ROPE, and
    without a sliding window every layer rotates. A NoPE layer whose model passes cos/sin anyway (EXAONE 4 passes
    none) leaves its keys as they are: the same logits with arbitrary angles given to it."""
    from streaming_llm import StreamingKVCache
    from streaming_llm.models import NO_ROPE, describe

    model = build_llama_family("exaone4")
    assert [rotary is NO_ROPE for rotary in describe(model).layer_rotaries] == [False, True]
    assert all(rotary is not NO_ROPE for rotary in describe(build_llama_family("exaone4", sliding_window=None))
               .layer_rotaries)
    input_ids = random_ids(LENGTH, seed=13)
    expected = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids, block_sizes_covering(LENGTH, [5, 1]))
    update = StreamingKVCache.update

    def update_with_angles_for_the_nope_layer(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == 1:
            angles = torch.rand(key_states.shape[0], key_states.shape[2], key_states.shape[3]) * 6
            cache_kwargs = {**(cache_kwargs or {}), "cos": angles.cos(), "sin": angles.sin()}
        return update(self, key_states, value_states, layer_idx, cache_kwargs)

    monkeypatch.setattr(StreamingKVCache, "update", update_with_angles_for_the_nope_layer)
    streamed = feed_stream(make_wrapper(model, N_SINK, WINDOW_SIZE), input_ids, block_sizes_covering(LENGTH, [5, 1]))
    assert max_abs_diff(streamed, expected) <= TOLERANCE


@pytest.mark.parametrize("model_type", ["llama", "cohere", "glm"])
def test_compress_gives_keys_in_the_models_own_feature_order(model_type):
    """compress() hands out keys at their cache slots as the model itself would hold them there: before any eviction,
    the keys of the model's own DynamicCache, interleaved rotary pairs included (the cache keeps them in rotate-half
    order inside)."""
    from transformers import DynamicCache

    model = build_llama_family(model_type)
    input_ids = random_ids(20, seed=14)
    wrapper = make_wrapper(model, N_SINK, 30)
    feed_stream(wrapper, input_ids, [7, 13])
    dense_cache = DynamicCache(config=model.config)
    model(input_ids[None], past_key_values=dense_cache, use_cache=True)
    for layer_idx in range(model.config.num_hidden_layers):
        keys, values = wrapper.cache.compress(layer_idx)
        assert max_abs_diff(keys, dense_cache.layers[layer_idx].keys) <= TOLERANCE
        assert max_abs_diff(values, dense_cache.layers[layer_idx].values) <= TOLERANCE


def test_cos_sin_rebuilt_from_position_ids_are_the_models_and_a_rope_layer_without_either_is_refused():
    """SmolLM3 passes no cos/sin to cache.update: the attention function rebuilds them from the position ids, and they
    are exactly what the model's rotary embedding gives (YaRN's attention factor included); a RoPE layer whose model
    passes neither is refused, not streamed with keys of unknown rotation."""
    from tiny_models import build_llama

    from streaming_llm import StreamingKVCache, prepare_model
    from streaming_llm.attention import _model_rotation, streaming_attention_forward

    model = prepare_model(build_llama("yarn"))
    rotary = model.model.layers[0].self_attn.streaming_rotary
    positions = torch.tensor([[0, 5, 200]])
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    got_cos, got_sin = _model_rotation(rotary, positions, torch.float32)
    torch.testing.assert_close(got_cos, want_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_sin, want_sin, rtol=0, atol=1e-6)
    attention = model.model.layers[0].self_attn
    keys = torch.randn(1, 2, 1, 16)
    cache = StreamingKVCache(2, 8)
    cache.update(keys, keys, 0, {})
    with pytest.raises(ValueError, match="needs the rotary cos/sin in cache_kwargs, or the position ids"):
        streaming_attention_forward(attention, torch.randn(1, 4, 1, 16), keys, keys, None)


def test_a_multimodal_gemma3_cache_past_the_trained_context_is_refused_when_the_wrapper_is_made():
    """The wrapper checks the capacity against the language model's config (a multimodal Gemma 3 keeps
    max_position_embeddings there, not at its top level) when it is made, not only at the first step."""
    from streaming_llm import StreamingLLMWrapper

    model = build_gemma3_multimodal(max_position_embeddings=16)
    with pytest.raises(ValueError, match="capacity n_sink \\+ window_size = 16 is too large for the model's "
                                         "max_position_embeddings=16"):
        StreamingLLMWrapper(model, 2, 14)


def test_layers_of_one_type_share_its_rope_and_a_type_without_frequencies_is_named(monkeypatch):
    """Gemma 3's layers of the same type get the same RotaryParams object (Architecture.single_rotary compares them by
    identity); a layer whose type the rotary embedding keeps no frequencies for is refused with a ValueError naming the
    missing attribute, not an AttributeError from inside."""
    from streaming_llm.models import describe

    model = build_llama_family("gemma3_text", num_hidden_layers=3,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    first, second, full = describe(model).layer_rotaries
    assert first is second and full is not first
    monkeypatch.setattr(model.model.layers[2].self_attn, "layer_type", "chunked_attention")
    with pytest.raises(ValueError, match="this gemma3_text model's rotary embedding has no chunked_attention_inv_freq"):
        describe(model)


def test_a_step_torch_compile_cannot_trace_is_refused_in_one_sentence():
    """AFMoE's own experts loop over the experts a token picked, a guard on values known only at run time: with
    compile="always" the first compiled step failed with torch's traceback (GuardOnDataDependentSymNode). Now one
    ValueError naming the way out, and the stream is as it was (the graph failed before it ran)."""
    model = build_llama_family("afmoe")
    fast = FastStreamingWrapper(model, N_SINK, WINDOW_SIZE, compile="always")
    input_ids = random_ids(LENGTH, seed=9)
    fast(input_ids[None, :N_SINK])
    with pytest.raises(ValueError, match=r"torch.compile could not compile this model's decode step \(GuardOnData.*"
                                         r"compile='never'"):
        fast(input_ids[None, N_SINK : N_SINK + 1])
    assert fast.tokens_seen == N_SINK and int(fast.step_position) == N_SINK


@pytest.mark.parametrize("wrapper_class", ["StreamingLLMWrapper", "FastStreamingWrapper"])
def test_a_peft_model_streams_as_its_merged_model_and_prompt_learning_is_refused(llama_model, wrapper_class):
    """A LoRA model from peft's get_peft_model (a PeftModelForCausalLM around the transformers model) was refused for
    Llama-structured models with "'LlamaForCausalLM' object has no attribute 'rotary_emb'": the adapters looked for
    model.model.rotary_emb, and a PEFT model's `model` is the transformers model itself. It streams as its merged model
    now (the wrappers and prepare_model). Prefix and prompt tuning add virtual tokens to every forward pass: refused
    in one sentence, the model left as it was (they streamed wrong logits, or failed inside the static step)."""
    pytest.importorskip("peft")  # installed with kvpress
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    import streaming_llm
    from streaming_llm import StreamingKVCache

    def wrapped(model):
        kwargs = {"compile": "never"} if wrapper_class == "FastStreamingWrapper" else {}
        return getattr(streaming_llm, wrapper_class)(model, n_sink=2, window_size=6, **kwargs)

    torch.manual_seed(3)
    lora = get_peft_model(copy.deepcopy(llama_model), LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False,
                                                                 target_modules=["q_proj", "k_proj", "v_proj"]))
    merged = copy.deepcopy(lora).merge_and_unload()
    input_ids = random_ids(16, seed=8)
    streamed = feed_stream(wrapped(lora), input_ids, [5, 1, 1, 9])
    assert max_abs_diff(streamed, feed_stream(wrapped(copy.deepcopy(merged)), input_ids)) <= TOLERANCE
    prompt = input_ids[None, :5]
    generated = [prepare_model(model).generate(prompt, past_key_values=StreamingKVCache(2, 6), max_new_tokens=10,
                                               do_sample=False) for model in (lora, merged)]
    assert torch.equal(*generated)

    prefix = get_peft_model(copy.deepcopy(llama_model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    for make in (wrapped, prepare_model):
        with pytest.raises(ValueError, match="prompt learning"):
            make(prefix)
    assert prefix.config._attn_implementation == "eager"
