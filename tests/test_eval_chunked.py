"""Chunked evaluation and the strided sliding window: their limiting cases equal the decode loop / recompute."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from streaming_llm.eval.chunked import chunked_streaming_perplexity, deviation, strided_window_perplexity
from streaming_llm.eval.methods import METHODS
from streaming_llm.eval.perplexity import compute_perplexity
from tiny_models import random_ids

TOLERANCE = 1e-4


def _decode(model, name, ids, n_sink, window_size):
    stepper = METHODS[name].build(copy.deepcopy(model), n_sink, window_size)
    return compute_perplexity(stepper, ids, block_size=1).nlls


def test_chunk_of_one_token_is_the_decode_loop(model):
    ids = random_ids(36, seed=8)[None]
    chunked = chunked_streaming_perplexity(model, ids, n_sink=2, window_size=7, chunk_size=1).nlls
    assert deviation(chunked, _decode(model, "streaming_pos_shift", ids, 2, 7))["max_abs_delta_nll"] <= TOLERANCE


@pytest.mark.parametrize("model_type", ["glm", "cohere"])
def test_chunked_re_rotation_keeps_an_interleaved_model_s_feature_order(model_type):
    """The chunked baseline re-rotates keys in the model's own cache: for interleaved rotary (GLM: partial, Cohere),
    in the model's pair order, so that a chunk of one token is still the decode loop."""
    from tiny_models import build_llama_family

    model = build_llama_family(model_type)
    ids = random_ids(36, seed=8)[None]
    chunked = chunked_streaming_perplexity(model, ids, n_sink=2, window_size=7, chunk_size=1).nlls
    assert deviation(chunked, _decode(model, "streaming_pos_shift", ids, 2, 7))["max_abs_delta_nll"] <= TOLERANCE


@pytest.mark.parametrize("model_type, overrides", [
    ("gemma2", dict(sliding_window=8)), ("olmo3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    ("mistral", dict(sliding_window=16))])
def test_a_chunk_of_one_token_is_the_decode_loop_for_sliding_window_layers(model_type, overrides):
    """The chunked baseline crashed for any model with sliding-window layers (its DynamicCache, made from the config,
    dropped old keys in those layers itself: 17 keys against a mask of 18). With plain cache layers the model's own
    sliding-window mask falls on cache slots, and a chunk of one token is the decode loop — sinks leaving a sliding
    layer's view included (Gemma 2 and OLMo-3 at capacity 9 with a window of 8: docs/semantics.md §8)."""
    from tiny_models import build_llama_family

    model = build_llama_family(model_type, **overrides)
    ids = random_ids(36, seed=8)[None]
    chunked = chunked_streaming_perplexity(model, ids, n_sink=2, window_size=7, chunk_size=1).nlls
    assert deviation(chunked, _decode(model, "streaming_pos_shift", ids, 2, 7))["max_abs_delta_nll"] <= TOLERANCE


def test_the_chunked_baseline_refuses_layers_that_rotate_differently():
    """Gemma 3's sliding and full-attention layers rotate with different frequencies; the chunked re-rotation, which
    applies one RoPE to every layer, refuses it by name instead of scoring it with the wrong frequencies."""
    from tiny_models import build_llama_family

    from streaming_llm.models import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="the chunked evaluation's re-rotation assumes one RoPE for every layer"):
        chunked_streaming_perplexity(build_llama_family("gemma3_text"), random_ids(20, seed=8)[None], n_sink=2,
                                     window_size=7, chunk_size=4)


def test_larger_chunks_see_more_than_the_decode_loop(model):
    """Before the first cut (the first chunk) chunked equals dense; after it, it differs from the decode loop."""
    ids = random_ids(36, seed=9)[None]
    chunked = chunked_streaming_perplexity(model, ids, n_sink=2, window_size=7, chunk_size=12).nlls
    dense = _decode(model, "dense", ids, 2, 7)
    assert deviation(chunked[:12], dense[:12])["max_abs_delta_nll"] <= TOLERANCE
    assert deviation(chunked, _decode(model, "streaming_pos_shift", ids, 2, 7))["max_abs_delta_nll"] > 1e-3


@pytest.mark.parametrize("chunk_size", [5, 12])
def test_chunks_equal_the_naive_reference_of_the_chunked_protocol(model, chunk_size, monkeypatch):
    """Past the first chunk, chunks of several tokens were only checked to differ from the decode loop: a re-rotation
    by -1 (right when one token leaves per step, as with chunks of one) passed. The naive reference
    (tests/reference.py) with the protocol's visible keys: a chunk starting at s sees the first n_sink and the last
    window_size tokens before s (all of them while they fit) and the chunk's own tokens up to t, at cache slots."""
    import reference

    n_sink, window_size = 2, 7

    def chunked_visible_keys(t, n_sink, window_size):
        start = t - t % chunk_size
        kept = list(range(start)) if start <= n_sink + window_size else [
            *range(n_sink), *range(start - window_size, start)]
        return kept + list(range(start, t + 1))

    ids = random_ids(36, seed=12)
    monkeypatch.setattr(reference, "visible_keys", chunked_visible_keys)
    logits = reference.naive_streaming_logits(model, ids, n_sink, window_size, "pos_shift")
    expected = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")
    chunked = chunked_streaming_perplexity(model, ids[None], n_sink, window_size, chunk_size=chunk_size).nlls
    assert (chunked - expected).abs().max().item() <= TOLERANCE


def test_stride_one_with_capacity_plus_one_is_recompute(llama_model):
    ids = random_ids(30, seed=10)[None]
    strided = strided_window_perplexity(llama_model, ids, context_size=2 + 6 + 1, stride=1).nlls
    recompute = _decode(llama_model, "recompute", ids, 2, 6)
    assert deviation(strided, recompute)["max_abs_delta_nll"] <= TOLERANCE


@pytest.mark.parametrize("context_size, stride", [(8, 3), (7, 5)])
def test_overlapping_strides_score_each_token_from_its_blocks_window(llama_model, context_size, stride):
    """1 < stride < context_size (windows that overlap, the baseline's usual setting), against the definition token by
    token: prediction t, in the block of `stride` predictions ending at e, is made by the dense model from a fresh
    window of tokens max(0, e - context_size)..t at positions 0.. (only stride 1 and stride = context_size had tests:
    a last, shorter block whose window started at start + stride - context_size, too late, passed them)."""
    ids = random_ids(26, seed=15)[None]
    steps = ids.shape[1] - 1
    strided = strided_window_perplexity(llama_model, ids, context_size=context_size, stride=stride).nlls
    expected = torch.empty(steps, dtype=torch.float64)
    with torch.no_grad():
        for t in range(steps):
            end = min((t // stride + 1) * stride, steps)
            window = ids[:, max(0, end - context_size) : t + 1]
            logits = llama_model(window, use_cache=False).logits[0, -1].double()
            expected[t] = torch.nn.functional.cross_entropy(logits[None], ids[0, t + 1 : t + 2])
    assert deviation(strided, expected)["max_abs_delta_nll"] <= TOLERANCE


def test_bad_chunk_and_stride_are_clear_errors(llama_model):
    ids = random_ids(10, seed=11)[None]
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_streaming_perplexity(llama_model, ids, 2, 6, chunk_size=0)
    with pytest.raises(ValueError, match="stride"):
        strided_window_perplexity(llama_model, ids, context_size=4, stride=5)
    # stride == context_size: windows that do not overlap, each scored from its own start like the dense model
    disjoint = strided_window_perplexity(llama_model, ids, context_size=4, stride=4).nlls
    dense = _decode(llama_model, "dense", ids, 2, 6)
    assert deviation(disjoint[:4], dense[:4])["max_abs_delta_nll"] <= TOLERANCE
    assert deviation(disjoint[4:8], _decode(llama_model, "dense", ids[:, 4:], 2, 6)[:4])["max_abs_delta_nll"] <= TOLERANCE
    for n_sink, window_size in ((-1, 6), (2, 0)):
        with pytest.raises(ValueError, match=f"need n_sink >= 0 and window_size >= 1, got {n_sink}, {window_size}"):
            chunked_streaming_perplexity(llama_model, ids, n_sink, window_size, chunk_size=2)


@pytest.mark.parametrize("ids", [random_ids(10, seed=12, batch=2), random_ids(10, seed=12), random_ids(1, seed=12)[None]],
                         ids=["batch_of_2", "one_dimensional", "one_token"])
def test_input_ids_other_than_one_stream_are_refused(llama_model, ids):
    """Both score one stream [1, T], T >= 2, as compute_perplexity: a batch of 2 made strided_window_perplexity score
    its first row alone (no error) and chunked_streaming_perplexity fail inside transformers' masking (IndexError), as
    did a [T] tensor."""
    shape = r"input_ids must be an integer tensor of token ids of shape \[1, n\], n >= 2"
    with pytest.raises(ValueError, match=shape):
        chunked_streaming_perplexity(llama_model, ids, 2, 6, chunk_size=2)
    with pytest.raises(ValueError, match=shape):
        strided_window_perplexity(llama_model, ids, context_size=4, stride=2)


def test_chunked_without_sinks_and_with_a_one_token_window(llama_model):
    """n_sink=0 and window_size=1 are the smallest caches, accepted; chunk 1 is then the decode loop."""
    ids = random_ids(12, seed=13)[None]
    for n_sink, window_size in ((0, 4), (2, 1)):
        chunked = chunked_streaming_perplexity(llama_model, ids, n_sink, window_size, chunk_size=1).nlls
        decoded = _decode(llama_model, "streaming_pos_shift", ids, n_sink, window_size)
        assert deviation(chunked, decoded)["max_abs_delta_nll"] <= TOLERANCE


def test_progress_bars_only_when_asked(llama_model, capsys):
    ids = random_ids(8, seed=14)[None]
    chunked_streaming_perplexity(llama_model, ids, 2, 3, chunk_size=2)
    strided_window_perplexity(llama_model, ids, context_size=4, stride=2)
    assert capsys.readouterr().err == ""
    chunked_streaming_perplexity(llama_model, ids, 2, 3, chunk_size=2, progress=True)
    strided_window_perplexity(llama_model, ids, context_size=4, stride=2, progress=True)
    err = capsys.readouterr().err
    assert "chunked2" in err and "strided2" in err


def test_kvpress_prefill_rerotation_equals_ours(llama_model):
    """kvpress_official protocol: KeyRerotationPress keeps the same tokens as ours and rotates them to the same
    keys; the continuation's NLLs agree; streaming the context through our cache gives the same layer-0 keys."""
    pytest.importorskip("kvpress")
    from streaming_llm.eval.kvpress_compare import compare_prefill_protocol

    ids = random_ids(60, seed=12)[None]
    report = compare_prefill_protocol(copy.deepcopy(llama_model), ids, 40, 12, 2, 8, timing_repeats=1)
    assert report["kept_positions_kvpress_equal_ours"]
    assert report["keys"]["max_abs_delta_all_layers"] <= 1e-5
    for mode in ("rerotate", "pos_shift"):
        layer0 = report["keys"]["layer0_streaming_cache_compress"][mode]
        assert layer0["kept_positions_equal"] and layer0["max_abs_delta_keys_vs_kvpress"] <= 1e-5
    assert report["max_abs_delta_nll"]["kvpress_rerotate_vs_ours_same_protocol"] <= TOLERANCE
    # Rerotation matters, and the prefill protocol is not the decode loop:
    assert report["max_abs_delta_nll"]["kvpress_rerotate_vs_kvpress_no_rerotate"] > 1e-3
    assert report["max_abs_delta_nll"]["kvpress_rerotate_vs_ours_streaming"] > 1e-3


@pytest.mark.parametrize("overrides", [dict(sliding_window=16), dict(sliding_window=8, use_sliding_window=True,
                                                                         max_window_layers=1)])
def test_the_kvpress_comparison_runs_a_model_with_sliding_window_layers(overrides):
    """Mistral (every layer within 16) and a hybrid Qwen2 (its second layer within 8) at capacity 10: the comparison's
    DynamicCache, made from the config, could not be cropped past the window (a ValueError from transformers); with
    plain layers kvpress's rerotation again equals ours."""
    pytest.importorskip("kvpress")
    from tiny_models import build_llama_family

    from streaming_llm.eval.kvpress_compare import compare_prefill_protocol

    model_type = "qwen2" if "use_sliding_window" in overrides else "mistral"
    report = compare_prefill_protocol(build_llama_family(model_type, **overrides), random_ids(60, seed=1)[None], 40, 12, 2,
                                      8, timing_repeats=1)
    assert report["max_abs_delta_nll"]["kvpress_rerotate_vs_ours_same_protocol"] <= TOLERANCE


def test_the_kvpress_comparison_sees_a_rerotation_that_is_off(llama_model, monkeypatch):
    """The comparison is not vacuous: with one of our rotated keys off by 0.1 in layer 0 and 0.2 in layer 1, it reports those
    key differences per layer, their maximum, and continuation NLLs that move. Input exactly as long as the context
    plus the continuation is enough; a context that fits in the cache (nothing to compress) is refused."""
    pytest.importorskip("kvpress")
    from streaming_llm.eval import kvpress_compare

    rerotation, calls = kvpress_compare.our_rerotation, []

    def off_by_layer(keys, kept, inv_freq):
        calls.append(None)
        keys = rerotation(keys, kept, inv_freq)
        keys[..., 0, 0] += 0.1 * len(calls)  # one feature of the first kept key: the other deltas stay ~0
        return keys

    monkeypatch.setattr(kvpress_compare, "our_rerotation", off_by_layer)
    ids = random_ids(52, seed=12)[None]
    report = kvpress_compare.compare_prefill_protocol(copy.deepcopy(llama_model), ids, 40, 12, 2, 8, timing_repeats=1)
    assert report["keys"]["max_abs_delta_per_layer_kvpress_vs_ours"] == pytest.approx([0.1, 0.2], abs=1e-5)
    assert report["keys"]["max_abs_delta_all_layers"] == pytest.approx(0.2, abs=1e-5)
    assert report["max_abs_delta_nll"]["kvpress_rerotate_vs_ours_same_protocol"] > 1e-3
    with pytest.raises(ValueError, match="need 52 tokens, got 51"):
        kvpress_compare.compare_prefill_protocol(llama_model, ids[:, :51], 40, 12, 2, 8)
    with pytest.raises(ValueError, match="context_length=10 must exceed the capacity 10 to compress"):
        kvpress_compare.compare_prefill_protocol(llama_model, ids, 10, 12, 2, 8)


def test_deviation_summarises_signed_and_absolute_differences():
    """NLLs 0.5 above and 0.1 below the reference: |Δ| max 0.5, mean 0.3; the mean NLL moves by +0.2, which is a
    perplexity ratio of exp(0.2). Mismatched lengths are refused."""
    result = deviation(torch.tensor([1.5, 0.9]), torch.tensor([1.0, 1.0]))
    assert result["max_abs_delta_nll"] == pytest.approx(0.5)
    assert result["mean_abs_delta_nll"] == pytest.approx(0.3)
    assert result["delta_mean_nll"] == pytest.approx(0.2)
    assert result["perplexity_ratio"] == pytest.approx(math.exp(0.2))
    with pytest.raises(ValueError, match="cannot be compared"):
        deviation(torch.zeros(3), torch.zeros(2))
