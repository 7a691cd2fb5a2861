"""kvpress 0.5.5's StreamingLLMPress as a decode-loop method and in its prefill protocol (eval/kvpress_adapters.py).

The flaw these tests pin down (docs/kvpress.md): ScorerPress.compress keeps topk's indices unsorted, so after the
second compression the "shipped" decode loop no longer holds the first n_sink tokens; "corrected" sorts them.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("kvpress")

from kvpress import DecodingPress, StreamingLLMPress  # noqa: E402
from tiny_models import build_llama, dense_logits, feed_stream, make_wrapper, max_abs_diff, random_ids  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.models.llama.modeling_llama import rotate_half  # noqa: E402

from streaming_llm.eval.kvpress_adapters import (  # noqa: E402
    KvpressDecodeStepper,
    SortedStreamingLLMPress,
    compression_ratio_keeping,
    kvpress_prefill_compress,
    kvpress_score_continuation,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def kv_model():
    """A private tiny Llama: entering a press sets `self_attn.rotary_emb` on its layers."""
    return build_llama()


def streaming_positions(t: int, n_sink: int, window_size: int) -> list[int]:
    """SEMANTICS.md §1: the stream positions held after step t, in stream order."""
    return list(range(min(n_sink, t + 1))) + list(range(max(n_sink, t - window_size + 1), t + 1))


def naive_absolute_logits(model, input_ids: torch.Tensor, kept_after_step: list[list[int]]) -> torch.Tensor:
    """Decode loop with a plain DynamicCache and absolute positions; after step t, evict by hand every entry whose
    stream position is not in kept_after_step[t]. Logits [T, vocab]."""
    cache, positions, logits = DynamicCache(), [], []
    for t in range(input_ids.shape[0]):
        output = model(input_ids[None, t : t + 1], past_key_values=cache, position_ids=torch.tensor([[t]]))
        logits.append(output.logits[0, -1])
        positions.append(t)
        keep = [slot for slot, position in enumerate(positions) if position in set(kept_after_step[t])]
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        positions = [positions[slot] for slot in keep]
    return torch.stack(logits)


def run_stepper(model, input_ids: torch.Tensor, n_sink: int, window_size: int, variant: str):
    """Logits [T, vocab] and, per step, the kept positions of every layer: LongTensor [layers, kv_heads, cache_len]."""
    stepper = KvpressDecodeStepper(model, n_sink, window_size, variant=variant)
    logits, kept = [], []
    for t in range(input_ids.shape[0]):
        logits.append(stepper.step(input_ids[None, t : t + 1])[0, 0])
        kept.append(torch.stack([stepper.kept_positions(layer) for layer in range(len(stepper.cache.layers))]))
    return torch.stack(logits), kept


@pytest.fixture(scope="module")
def shipped_and_corrected_runs(kv_model):
    """64 steps, n_sink=4, window_size=16 (capacity 20): compressions from step 20 on."""
    with torch.no_grad():
        ids = random_ids(64, seed=5)
        return ids, {variant: run_stepper(kv_model, ids, 4, 16, variant) for variant in ("shipped", "corrected")}


# --- the decode loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["shipped", "corrected"])
def test_stepper_equals_dense_when_the_window_covers_the_stream(kv_model, variant):
    ids = random_ids(24, seed=1)
    stepper = KvpressDecodeStepper(kv_model, n_sink=4, window_size=24, variant=variant)
    assert max_abs_diff(stepper.step(ids[None])[0], dense_logits(kv_model, ids)) <= TOLERANCE
    assert stepper.kept_positions().tolist() == [list(range(24))] * 2


@pytest.mark.parametrize("n_sink, window_size", [(0, 1), (0, 5), (1, 3), (4, 8), (2, 1)])
def test_corrected_keeps_exactly_the_sinks_and_the_window(kv_model, n_sink, window_size):
    ids = random_ids(40, seed=2)
    _, kept = run_stepper(kv_model, ids, n_sink, window_size, "corrected")
    for t, kept_t in enumerate(kept):
        expected = streaming_positions(t, n_sink, window_size)
        assert kept_t.tolist() == [[expected] * kept_t.shape[1]] * kept_t.shape[0], f"step {t}"


@pytest.mark.parametrize("n_sink, window_size", [(2, 8), (0, 5)])
def test_corrected_equals_the_naive_absolute_decode_loop(kv_model, n_sink, window_size):
    ids = random_ids(40, seed=3)
    logits, _ = run_stepper(kv_model, ids, n_sink, window_size, "corrected")
    expected_kept = [streaming_positions(t, n_sink, window_size) for t in range(len(ids))]
    assert max_abs_diff(logits, naive_absolute_logits(kv_model, ids, expected_kept)) <= TOLERANCE


def test_corrected_equals_our_absolute_position_mode(kv_model):
    """Same stream, same semantics (§1 eviction, §2 absolute positions), two implementations."""
    ids = random_ids(40, seed=4)
    logits, _ = run_stepper(kv_model, ids, 4, 8, "corrected")
    ours = feed_stream(make_wrapper(kv_model, n_sink=4, window_size=8, position_mode="absolute"), ids)
    assert max_abs_diff(logits, ours) <= TOLERANCE


def test_shipped_loses_the_true_sinks_after_repeated_compression(shipped_and_corrected_runs):
    _, runs = shipped_and_corrected_runs
    kept = runs["shipped"][1]
    final = kept[-1][0, 0].tolist()  # layer 0, kv head 0, cache order
    assert len(final) == 20
    assert sorted(final) != streaming_positions(63, 4, 16)
    assert final != sorted(final), "the cache is no longer in stream order"
    assert 0 not in final, "token 0, the strongest attention sink, has been evicted"
    assert (kept[-1] == kept[-1][0, 0]).all(), "every layer and kv head keeps the same scrambled set"
    # The first compression (step 20) is still right; the second one evicts by cache slot.
    assert sorted(kept[20][0, 0].tolist()) == streaming_positions(20, 4, 16)
    assert sorted(kept[21][0, 0].tolist()) != streaming_positions(21, 4, 16)


def test_shipped_positions_are_what_the_model_attends_to(kv_model, shipped_and_corrected_runs):
    """The tracked kept positions are not a re-derivation: a by-hand eviction of exactly those positions reproduces
    the shipped logits, and they differ from the corrected ones once the sets differ."""
    ids, runs = shipped_and_corrected_runs
    shipped_logits, shipped_kept = runs["shipped"]
    reference = naive_absolute_logits(kv_model, ids, [kept_t[0, 0].tolist() for kept_t in shipped_kept])
    assert max_abs_diff(shipped_logits, reference) <= TOLERANCE
    corrected_logits = runs["corrected"][0]
    assert max_abs_diff(shipped_logits[:22], corrected_logits[:22]) <= TOLERANCE  # step 22 first sees the difference
    assert max_abs_diff(shipped_logits[22:], corrected_logits[22:]) > 1e-2


def test_shipped_press_scrambles_slots_without_any_model():
    """The mechanism on its own: keys that carry their stream position, compressed one step at a time."""

    class Layer:
        head_dim, layer_idx = 1, 0

    def compress_stream(base_press, steps: int) -> list[int]:
        press = DecodingPress(base_press=base_press, compression_interval=1, target_size=20)
        keys = torch.zeros(1, 1, 0, 1)
        for t in range(steps):
            keys = torch.cat([keys, torch.full((1, 1, 1, 1), float(t))], dim=2)
            if keys.shape[2] > 20:
                keys, _ = press.compress(Layer, None, keys, keys, None, {})
        return keys[0, 0, :, 0].long().tolist()

    assert compress_stream(SortedStreamingLLMPress(n_sink=4), 200) == streaming_positions(199, 4, 16)
    shipped = compress_stream(StreamingLLMPress(n_sink=4), 200)
    assert sorted(shipped) != streaming_positions(199, 4, 16)


def test_stepper_reset_and_validation(kv_model):
    ids = random_ids(30, seed=6)
    stepper = KvpressDecodeStepper(kv_model, n_sink=2, window_size=4)
    first = stepper.step(ids[None])
    stepper.reset()
    assert stepper.kept_positions().numel() == 0
    assert max_abs_diff(stepper.step(ids[None]), first) == 0.0
    with pytest.raises(ValueError, match="variant"):
        KvpressDecodeStepper(kv_model, 2, 4, variant="fixed")
    with pytest.raises(ValueError, match="window_size"):
        KvpressDecodeStepper(kv_model, 2, 0)
    for bad in (ids[None].expand(2, -1), ids[None].float(), ids.tolist()):  # a list: AttributeError before
        with pytest.raises(ValueError, match="input_ids must be an integer tensor of token ids of shape \\[1, n\\]"):
            stepper.step(bad)
    # A size that is not an integer: kvpress_prefill_compress(n_sink=2.5) searched for a compression ratio for ever.
    with pytest.raises(ValueError, match="n_sink must be an integer >= 0, got 2.5"):
        kvpress_prefill_compress(kv_model, ids[None], n_sink=2.5, window_size=8)
    with pytest.raises(ValueError, match="n_kept must be an integer >= 0"):
        compression_ratio_keeping(10, -1)


def test_a_press_that_does_not_cut_the_cache_back_is_reported(kv_model):
    """The stepper checks after every step that kvpress left min(t + 1, capacity) entries; a press compressing only
    every second step leaves one too many and is stopped at once, not scored as if it were StreamingLLM."""
    stepper = KvpressDecodeStepper(kv_model, n_sink=2, window_size=4)
    stepper.press.compression_interval = 2
    with pytest.raises(RuntimeError, match="kvpress left 7 entries in layer 0 after step 7; expected 6"):
        stepper.step(random_ids(12, seed=11)[None])



def test_the_bench_times_kvpress_unobserved(kv_model, monkeypatch):
    """The recorder of kept positions (a TorchFunctionMode around every compress, a list of positions per layer) cost
    the bench's kvpress_decode a few per cent of each step that kvpress itself does not: the bench runs kvpress
    unobserved, with the same logits, and such a stepper's kept_positions() says why it has none. Its cache length is
    still checked after every step."""
    import copy

    from streaming_llm.bench.latency import make_decoder
    from streaming_llm.eval import kvpress_adapters

    ids = random_ids(30, seed=12)[None]
    recorded = KvpressDecodeStepper(kv_model, n_sink=2, window_size=6).step(ids)

    def observed(*args, **kwargs):
        raise AssertionError("kvpress's compression was observed")

    monkeypatch.setattr(kvpress_adapters._SequenceGatherRecorder, "__torch_function__", observed)
    unobserved = KvpressDecodeStepper(kv_model, n_sink=2, window_size=6, record_positions=False)
    assert torch.equal(unobserved.step(ids), recorded)
    with pytest.raises(ValueError, match="record_positions=False"):
        unobserved.kept_positions()
    unobserved.reset()
    unobserved.press.compression_interval = 2
    with pytest.raises(RuntimeError, match="kvpress left 9 entries in layer 0 after step 9; expected 8"):
        unobserved.step(ids)
    decoder = make_decoder("kvpress_decode", copy.deepcopy(kv_model), n_sink=2, capacity=8)
    decoder.prepare()
    decoder.token = ids[:, :1]
    decoder.step()
    assert decoder.cache_length() == 8

def adakv_decode(model):
    """Logits of one decode step after a prefill compressed by a head-wise press (AdaKV hides keys per head)."""
    from kvpress import AdaKVPress, KnormPress

    input_ids, cache = random_ids(24, seed=5)[None], DynamicCache()
    with AdaKVPress(KnormPress(compression_ratio=0.5))(model):
        model(input_ids, past_key_values=cache)
    return model(input_ids[:, :1], past_key_values=cache, cache_position=torch.tensor([24])).logits


def test_importing_the_adapters_unwraps_only_our_attention_and_leaves_head_wise_presses_working(monkeypatch):
    """kvpress wraps every attention function at import (module docstring). The adapters removed every wrapper, so a
    head-wise press (AdaKV) used elsewhere in the same process silently attended to the keys it had hidden (decode
    logits off by 5); only this package's functions are unwrapped now, and AdaKV decodes as with kvpress alone."""
    from kvpress.attention_patch import attention_patch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    wrapped = {name for name in ALL_ATTENTION_FUNCTIONS
               if getattr(ALL_ATTENTION_FUNCTIONS[name], "__module__", None) == "kvpress.attention_patch"}
    assert not wrapped & {"streaming_llm", "streaming_llm_static"}
    model = build_llama()
    model.set_attn_implementation("sdpa")
    got = adakv_decode(model)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", attention_patch(sdpa_attention_forward))  # kvpress's own
    torch.testing.assert_close(got, adakv_decode(model), rtol=0, atol=0)


def test_a_head_wise_press_on_a_prepared_model_is_as_on_the_model():
    """A prepared SDPA model run without a StreamingKVCache called transformers' SDPA function directly, past
    kvpress's wrapper in the registry, so AdaKV on it attended to the keys it had hidden (decode logits off by 5); it
    calls the registered "sdpa", as the model itself does."""
    import copy

    from streaming_llm import prepare_model

    model = build_llama()
    model.set_attn_implementation("sdpa")
    prepared = prepare_model(copy.deepcopy(model))
    torch.testing.assert_close(adakv_decode(prepared), adakv_decode(model), rtol=0, atol=0)


def test_our_attention_functions_run_under_kvpress_attention_wrapper():
    """kvpress's wrapper passes dropout as the 6th positional argument (docs/kvpress.md §4): both of our attention
    functions take it there, so a streaming wrapper runs with the wrapper installed, and gives the same logits."""
    import inspect

    from kvpress.attention_patch import attention_patch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from streaming_llm.attention import streaming_attention_forward
    from streaming_llm.fast import static_streaming_attention_forward

    for function in (streaming_attention_forward, static_streaming_attention_forward):
        assert list(inspect.signature(function).parameters)[5:7] == ["dropout", "scaling"]
    input_ids = random_ids(12, seed=3)[None]
    want = make_wrapper(build_llama(), 2, 4)(input_ids)
    ALL_ATTENTION_FUNCTIONS["streaming_llm"] = attention_patch(streaming_attention_forward)
    try:
        got = make_wrapper(build_llama(), 2, 4)(input_ids)
    finally:
        del ALL_ATTENTION_FUNCTIONS["streaming_llm"]
    assert ALL_ATTENTION_FUNCTIONS["streaming_llm"] is streaming_attention_forward
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- the prefill protocol -------------------------------------------------------------------------------


def test_compression_ratio_keeping_is_exact():
    from kvpress.utils import compute_n_kept

    for context_length in range(2, 400):
        for n_kept in {1, min(17, context_length), context_length - 1, context_length}:
            assert compute_n_kept(context_length, compression_ratio_keeping(context_length, n_kept)) == n_kept


def _dense_prefill_cache(model, context_ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    model(context_ids, past_key_values=cache)
    return cache


def _continuation_nlls(model, cache: DynamicCache, context_logits, continuation_ids, first_position: int):
    positions = first_position + torch.arange(continuation_ids.shape[1] - 1)
    logits = model(continuation_ids[:, :-1], past_key_values=cache, position_ids=positions[None]).logits
    logits = torch.cat([context_logits[:, None], logits], dim=1)[0]
    return -torch.log_softmax(logits, -1).gather(-1, continuation_ids[0, :, None])[:, 0]


@pytest.mark.parametrize("rerotate", [True, False])
def test_prefill_keeps_sinks_and_window_and_scores_like_a_by_hand_cache(kv_model, rerotate):
    """Reference: the dense prefill cache, cut by hand to the first 4 + last 12 entries; with rerotation the kept
    keys are rotated from position p to their slot (RoPE of the delta), and the continuation starts at slot 16."""
    context, continuation = random_ids(40, seed=7)[None], random_ids(9, seed=8)[None]
    options = {} if rerotate else {"rerotate": False}  # rerotation is the default, as in kvpress's pipeline
    prefill = kvpress_prefill_compress(kv_model, context, n_sink=4, window_size=12, **options)
    kept = list(range(4)) + list(range(28, 40))
    assert prefill.kept_positions.sort(dim=-1).values.tolist() == [kept, kept]
    # KeyRerotationPress sorts the kept indices; the bare press leaves topk's order, which is harmless here:
    # attention does not depend on the order of the keys, and nothing is compressed after the prefill.
    assert (prefill.kept_positions.tolist() == [kept, kept]) == rerotate
    assert prefill.cache.get_seq_length() == 16
    assert prefill.next_position == (16 if rerotate else 40)
    nlls = kvpress_score_continuation(kv_model, prefill, continuation)
    assert prefill.cache.get_seq_length() == 16, "scoring leaves the compressed cache as it was"
    assert max_abs_diff(kvpress_score_continuation(kv_model, prefill, continuation), nlls) == 0.0

    cache = _dense_prefill_cache(kv_model, context)
    context_logits = kv_model(context).logits[:, -1]
    delta = torch.arange(16) - torch.tensor(kept)  # slot - position
    cos, sin = kv_model.model.rotary_emb(cache.layers[0].keys, position_ids=delta[None])  # [1, 16, head_dim]
    for layer in cache.layers:
        keys = layer.keys[:, :, kept]
        layer.keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None] if rerotate else keys
        layer.values = layer.values[:, :, kept]
    reference = _continuation_nlls(kv_model, cache, context_logits, continuation, prefill.next_position)
    assert max_abs_diff(nlls, reference) <= TOLERANCE


def test_prefill_without_compression_scores_like_the_dense_model(kv_model):
    context, continuation = random_ids(12, seed=9)[None], random_ids(6, seed=10)[None]
    prefill = kvpress_prefill_compress(kv_model, context, n_sink=4, window_size=12)
    assert prefill.kept_positions.tolist() == [list(range(12))] * 2 and prefill.next_position == 12
    nlls = kvpress_score_continuation(kv_model, prefill, continuation)
    logits = dense_logits(kv_model, torch.cat([context, continuation], dim=1)[0])[11:-1]
    dense_nlls = -torch.log_softmax(logits, -1).gather(-1, continuation[0, :, None])[:, 0]
    assert max_abs_diff(nlls, dense_nlls) <= TOLERANCE


def test_prefill_equals_feeding_one_token_at_a_time(kv_model):
    """prefill (one forward, no press while the cache fits) then decode = the pure decode loop."""
    ids = random_ids(40, seed=5)[None]
    one_by_one = KvpressDecodeStepper(kv_model, 4, 16, variant="corrected")
    expected = one_by_one(ids)
    prefilled = KvpressDecodeStepper(kv_model, 4, 16, variant="corrected")
    logits = torch.cat([prefilled.prefill(ids[:, :20]), prefilled(ids[:, 20:])], dim=1)
    assert max_abs_diff(logits, expected) <= 1e-4
    assert torch.equal(prefilled.kept_positions(), one_by_one.kept_positions())
    with pytest.raises(ValueError, match="capacity"):
        prefilled.prefill(ids[:, :1])


def test_kvpress_runs_only_the_models_it_supports():
    """kvpress 0.5.5 names the models it supports; on others it warns and goes on, and KeyRerotationPress, which
    rotates whole heads, failed inside torch on Phi's partial rotary (which our streaming cache supports). Both
    kvpress methods now refuse such a model with UnsupportedModelError, which eval turns into a skipped method."""
    from streaming_llm.models import UnsupportedModelError

    from tiny_models import build_llama_family

    ids = random_ids(20, seed=4)[None]
    phi = build_llama_family("phi")
    for run in (lambda: kvpress_prefill_compress(phi, ids, n_sink=2, window_size=8),
                lambda: KvpressDecodeStepper(phi, n_sink=2, window_size=8)(ids)):
        with pytest.raises(UnsupportedModelError, match="does not support PhiForCausalLM .it supports LlamaForCausalLM"):
            run()
    assert kvpress_prefill_compress(build_llama_family("phi3"), ids, n_sink=2, window_size=8).cache.get_seq_length() == 10
