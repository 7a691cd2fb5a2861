"""Behaviour of streaming_llm/eval/kvpress_adapters.py that no other test pinned down (found by mutation testing): the
recorder of the slots kvpress keeps, on every way a gather can be called, and the corrected press on a batch. No
model is needed: keys that carry their stream position stand in for a layer's cache."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("kvpress")

from streaming_llm.eval.kvpress_adapters import SortedStreamingLLMPress, _SequenceGatherRecorder  # noqa: E402


def _index(slots: list[int], head_dim: int = 3) -> torch.Tensor:
    """A gather index [1, 1, len(slots), head_dim] that takes `slots` along the sequence axis."""
    return torch.tensor(slots)[None, None, :, None].expand(1, 1, -1, head_dim)


@pytest.mark.parametrize("call", ["method, positional", "method, index by name", "function, both by name"])
def test_the_recorder_sees_a_sequence_gather_however_it_is_called(call):
    """The first gather along dim 2 with a 4-D index is the kept slots, whether dim and index are passed by position
    or by name (and whatever the head size, 1 included); a gather along another axis, or of a 3-D tensor, before it is
    not taken for it."""
    keys = torch.arange(2 * 5 * 3, dtype=torch.float32).view(1, 1, 5, 6)[..., :3].contiguous()
    with _SequenceGatherRecorder() as recorder:
        keys.gather(3, _index([0, 1, 2, 0, 1]))  # along the head axis: not a choice of slots
        torch.zeros(1, 1, 5).gather(2, torch.tensor([[[4, 1]]]))  # scores or positions [batch, heads, seq]
        if call == "method, positional":
            keys = keys[..., :1].contiguous()  # a head of one feature
            kept = keys.gather(2, _index([0, 3, 4], head_dim=1))
        elif call == "method, index by name":
            kept = keys.gather(2, index=_index([0, 3, 4]))
        else:
            kept = torch.gather(keys, dim=2, index=_index([0, 3, 4]))
        keys.gather(2, _index([1, 2], head_dim=keys.shape[-1]))  # only the first is recorded
    assert torch.equal(kept, keys[:, :, [0, 3, 4]])
    assert recorder.kept_slots.tolist() == [[[0, 3, 4]]]


def test_the_corrected_press_keeps_each_streams_sinks_and_window_in_a_batch():
    """SortedStreamingLLMPress is a kvpress press like the shipped one, for any batch size: each row of a batch of two
    keeps its first n_sink entries and its last ones, in stream order."""

    class Layer:
        head_dim, layer_idx = 1, 0

    press = SortedStreamingLLMPress(n_sink=2, compression_ratio=0.5)
    keys = torch.arange(2 * 12, dtype=torch.float32).view(2, 1, 12, 1)  # row 1 = row 0 + 12
    kept, values = press.compress(Layer, torch.zeros(2, 12, 4), keys, keys.clone(), None, {})
    assert kept[:, 0, :, 0].tolist() == [[0, 1, 8, 9, 10, 11], [12, 13, 20, 21, 22, 23]]
    assert torch.equal(values, kept)


def test_a_prefill_is_taken_up_to_the_capacity_and_refused_past_it():
    """prefill feeds a stream's start only while it fits: the whole capacity at once is taken, one token more is
    refused before the model runs, and so is a second prefill that would go past it."""
    from tiny_models import build_llama, random_ids

    from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

    model, ids = build_llama(), random_ids(12, seed=3)[None]
    stepper = KvpressDecodeStepper(model, n_sink=2, window_size=6)
    with pytest.raises(ValueError, match="prefill of 9 tokens after 0 would exceed the capacity 8"):
        stepper.prefill(ids[:, :9])
    assert stepper.tokens_seen == 0
    assert stepper.prefill(ids[:, :5]).shape == (1, 5, model.config.vocab_size)
    with pytest.raises(ValueError, match="prefill of 4 tokens after 5 would exceed the capacity 8"):
        stepper.prefill(ids[:, 5:9])
    stepper.prefill(ids[:, 5:8])
    assert stepper.kept_positions().tolist() == [list(range(8))] * 2


def test_kept_positions_read_the_first_layer_and_are_empty_before_any_token():
    """kept_positions() is of layer 0 by default (a one-layer model has no other), and before the first token it is
    an empty [kv_heads, cache_len] table: two axes, as after a step, nothing in them."""
    from tiny_models import build_llama_family, random_ids

    from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

    stepper = KvpressDecodeStepper(build_llama_family("llama", num_hidden_layers=1), n_sink=1, window_size=2)
    assert stepper.kept_positions().shape == (0, 0)
    stepper.step(random_ids(5, seed=2)[None])
    assert stepper.kept_positions().tolist() == [[0, 3, 4]] * 2


def test_an_empty_context_keeps_nothing_at_ratio_0():
    from streaming_llm.eval.kvpress_adapters import compression_ratio_keeping

    assert compression_ratio_keeping(0, 0) == 0.0
    assert compression_ratio_keeping(7, 7) == 0.0


def test_a_continuation_of_one_token_is_scored_from_the_context_and_an_empty_one_is_refused():
    """One token: its NLL is read from the context's last logits, the cache untouched; no token: a named refusal."""
    from tiny_models import build_llama, random_ids

    from streaming_llm.eval.kvpress_adapters import kvpress_prefill_compress, kvpress_score_continuation

    model, ids = build_llama(), random_ids(13, seed=4)[None]
    prefill = kvpress_prefill_compress(model, ids[:, :12], n_sink=2, window_size=6)
    nlls = kvpress_score_continuation(model, prefill, ids[:, 12:])
    expected = -torch.log_softmax(prefill.last_logits[0].float(), dim=-1)[ids[0, 12]]
    assert nlls.shape == (1,) and nlls[0].item() == expected.item()
    assert prefill.cache.get_seq_length() == 8
    with pytest.raises(ValueError, match=r"continuation_ids must be .* shape \[1, n\], n >= 1; got shape \(1, 0\)"):
        kvpress_score_continuation(model, prefill, ids[:, :0])


@pytest.mark.parametrize("context_length", [12, 6])
def test_a_one_layer_models_prefill_reports_its_kept_positions(context_length):
    """kvpress_prefill_compress reads the kept slots and the head count of layer 0, the one layer a one-layer model
    has, whether the context was compressed (12 tokens into 2 + 6) or fitted (6); a two-token continuation is scored
    by one forward and the context's last logits."""
    from tiny_models import build_llama_family, random_ids

    from streaming_llm.eval.kvpress_adapters import kvpress_prefill_compress, kvpress_score_continuation

    model, ids = build_llama_family("llama", num_hidden_layers=1), random_ids(context_length + 2, seed=6)[None]
    prefill = kvpress_prefill_compress(model, ids[:, :context_length], n_sink=2, window_size=6)
    kept = [0, 1, 6, 7, 8, 9, 10, 11] if context_length == 12 else list(range(6))
    assert prefill.kept_positions.tolist() == [kept] * 2
    nlls = kvpress_score_continuation(model, prefill, ids[:, context_length:])
    assert nlls.shape == (2,) and prefill.cache.get_seq_length() == len(kept)
    expected = -torch.log_softmax(prefill.last_logits[0].float(), dim=-1)[ids[0, context_length]]
    assert nlls[0].item() == expected.item()
