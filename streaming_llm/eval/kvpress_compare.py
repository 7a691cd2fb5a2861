"""kvpress's intended protocol ("kvpress_official") next to ours, and how their key rerotations differ.

Protocol (kvpress's pipeline): a context of L tokens is prefilled densely; during that prefill
KeyRerotationPress(StreamingLLMPress) keeps the first n_sink and the last window_size tokens of every layer
and re-rotates the kept keys to cache slots 0..C-1; a continuation of m tokens is then scored against that
cache in one forward at positions C.. (no further compression).

`compare_prefill_protocol` runs on one context + continuation:
- kvpress_rerotate: the protocol above (kvpress's classes, via kvpress_adapters);
- kvpress_no_rerotate: the bare StreamingLLMPress (kept keys keep their stream positions);
- ours_same_protocol: the same dense prefill, the same kept set, with *our* rerotation
  (`streaming_llm.rope.rerotate_keys`, one rotation per kept token by slot - position, shared by all
  heads), scored by the same continuation code: the only difference from kvpress_rerotate is the rerotation;
- ours_streaming: our StreamingLLMWrapper (pos_shift) on context + continuation, the decode-loop semantics
  (the context is streamed, not prefilled densely; the continuation keeps evicting);
- dense: the whole context kept.
It also compares the kept keys themselves: kvpress's against ours on every layer of the dense prefill, and,
on layer 0 (whose keys do not depend on attention, so streaming and dense prefill give the same raw keys),
against `StreamingKVCache.compress(0)` of our cache after streaming the context in rerotate and pos_shift
mode; and it times the two rerotations on the same keys.
"""

from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn
from transformers import DynamicCache

from streaming_llm.models import describe
from streaming_llm.rope import rerotate_keys


def kept_stream_positions(context_length: int, n_sink: int, window_size: int) -> torch.Tensor:
    """Stream positions StreamingLLM keeps of a context: [0, n_sink) and the last window_size, LongTensor [n_kept]."""
    if context_length <= n_sink + window_size:
        return torch.arange(context_length)
    return torch.cat([torch.arange(n_sink), torch.arange(context_length - window_size, context_length)])


def our_rerotation(keys: torch.Tensor, kept: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Keys [b, kv_heads, L, d] rotated at stream positions -> the kept ones [b, kv_heads, n_kept, d] at slots
    0..n_kept-1: one gather, one rotation by (slot - position) with cos/sin shared by all heads."""
    slots = torch.arange(kept.shape[0], device=keys.device)
    return rerotate_keys(keys.index_select(2, kept.to(keys.device)), slots - kept.to(keys.device), inv_freq)


def kvpress_rerotation(keys: torch.Tensor, kept: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The same through kvpress's KeyRerotationPress.rerotate_keys (per-head indices, per-head cos/sin)."""
    from kvpress import KeyRerotationPress

    batch, kv_heads, _, head_dim = keys.shape
    module = SimpleNamespace(rotary_emb=SimpleNamespace(inv_freq=inv_freq), head_dim=head_dim)
    indices = kept.to(keys.device)[None, None].expand(batch, kv_heads, -1)
    return KeyRerotationPress.rerotate_keys(module, indices, keys)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _continuation_nlls_from_cache(model: nn.Module, cache: DynamicCache, next_position: int, last_logits, continuation):
    from streaming_llm.eval.kvpress_adapters import KvpressPrefill, kvpress_score_continuation

    prefill = KvpressPrefill(cache=cache, kept_positions=torch.empty(0), next_position=next_position, last_logits=last_logits)
    return kvpress_score_continuation(model, prefill, continuation).double()


@torch.no_grad()
def compare_prefill_protocol(
    model: nn.Module,
    input_ids: torch.Tensor,
    context_length: int,
    continuation_length: int,
    n_sink: int,
    window_size: int,
    timing_repeats: int = 20,
) -> dict:
    """Run every variant of the module docstring on input_ids[:, :context_length + continuation_length].

    Returns a JSON-ready dict: per-variant continuation perplexity and per-token NLLs, max |Δ| between the
    variants, max |Δ| of the kept keys (kvpress vs ours), kept positions, and rerotation timings (seconds).
    """
    from streaming_llm.eval.kvpress_adapters import kvpress_prefill_compress
    from streaming_llm.eval.perplexity import compute_perplexity
    from streaming_llm.wrapper import StreamingLLMWrapper

    total = context_length + continuation_length
    if input_ids.shape[1] < total:
        raise ValueError(f"need {total} tokens, got {input_ids.shape[1]}")
    if context_length <= n_sink + window_size:
        raise ValueError(f"context_length={context_length} must exceed the capacity {n_sink + window_size} to compress")
    context, continuation = input_ids[:, :context_length], input_ids[:, context_length:total]
    inv_freq = describe(model).single_rotary("the kvpress prefill comparison").inv_freq
    kept = kept_stream_positions(context_length, n_sink, window_size)
    n_kept = kept.shape[0]

    # kvpress's protocol, with and without rerotation.
    from streaming_llm.eval.kvpress_adapters import kvpress_score_continuation

    kv = kvpress_prefill_compress(model, context, n_sink, window_size, rerotate=True)
    kvpress_kept = kv.kept_positions.sort(dim=-1).values
    nlls = {"kvpress_rerotate": kvpress_score_continuation(model, kv, continuation).double()}
    kv_keys = [layer.keys.clone() for layer in kv.cache.layers]
    del kv
    kv_plain = kvpress_prefill_compress(model, context, n_sink, window_size, rerotate=False)
    nlls["kvpress_no_rerotate"] = kvpress_score_continuation(model, kv_plain, continuation).double()
    del kv_plain

    # The same dense prefill, uncompressed: the keys both rerotations start from.
    dense_cache = DynamicCache()  # plain layers: a sliding-window layer from the config keeps only its last keys
    mask = torch.ones_like(context)
    last_logits = model(context, attention_mask=mask, past_key_values=dense_cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    dense_keys = [layer.keys.clone() for layer in dense_cache.layers]
    dense_values = [layer.values.clone() for layer in dense_cache.layers]
    nlls["dense"] = _continuation_nlls_from_cache(model, dense_cache, context_length, last_logits, continuation)
    del dense_cache

    ours_cache = DynamicCache()
    key_deltas = []
    for layer_idx, (keys, values) in enumerate(zip(dense_keys, dense_values)):
        ours = our_rerotation(keys, kept, inv_freq)
        key_deltas.append(float((ours - kv_keys[layer_idx]).abs().max()))
        ours_cache.update(ours, values.index_select(2, kept.to(values.device)), layer_idx)
    nlls["ours_same_protocol"] = _continuation_nlls_from_cache(model, ours_cache, n_kept, last_logits, continuation)
    del ours_cache

    # Our streaming cache after the context: layer 0's kept keys at their slots, in both storing modes.
    layer0 = {}
    for position_mode in ("rerotate", "pos_shift"):
        wrapper = StreamingLLMWrapper(model, n_sink, window_size, position_mode)
        for start in range(0, context_length, 256):
            wrapper(context[:, start : start + 256])
        cache_keys, _ = wrapper.cache.compress(0)
        layer0[position_mode] = {
            "kept_positions_equal": bool(torch.equal(wrapper.cache.kept_positions(0).cpu(), kept)),
            "max_abs_delta_keys_vs_kvpress": float((cache_keys - kv_keys[0]).abs().max()),
        }
    streaming = compute_perplexity(StreamingLLMWrapper(model, n_sink, window_size), input_ids[:, :total], block_size=256)
    nlls["ours_streaming"] = streaming.nlls[context_length - 1 : total - 1]

    layer_keys = dense_keys[0]
    timings = {
        "ours_rerotate_keys_s": _median_seconds(lambda: our_rerotation(layer_keys, kept, inv_freq), timing_repeats),
        "kvpress_rerotate_keys_s": _median_seconds(lambda: kvpress_rerotation(layer_keys, kept, inv_freq), timing_repeats),
        "keys_shape": list(layer_keys.shape),
        "repeats": timing_repeats,
    }
    max_key_scale = max(float(keys.abs().max()) for keys in kv_keys)

    def delta(a: str, b: str) -> float:
        return float((nlls[a] - nlls[b]).abs().max())

    return {
        "context_length": context_length,
        "continuation_length": continuation_length,
        "n_sink": n_sink,
        "window_size": window_size,
        "kept_positions_kvpress_equal_ours": bool(all(torch.equal(row.cpu(), kept) for row in kvpress_kept)),
        "perplexity": {name: float(torch.exp(values.mean())) for name, values in nlls.items()},
        "max_abs_delta_nll": {
            "kvpress_rerotate_vs_ours_same_protocol": delta("kvpress_rerotate", "ours_same_protocol"),
            "kvpress_rerotate_vs_ours_streaming": delta("kvpress_rerotate", "ours_streaming"),
            "kvpress_rerotate_vs_kvpress_no_rerotate": delta("kvpress_rerotate", "kvpress_no_rerotate"),
            "kvpress_rerotate_vs_dense": delta("kvpress_rerotate", "dense"),
        },
        "keys": {
            "max_abs_delta_per_layer_kvpress_vs_ours": key_deltas,
            "max_abs_delta_all_layers": max(key_deltas),
            "max_abs_key": max_key_scale,
            "layer0_streaming_cache_compress": layer0,
        },
        "rerotation_timing": timings,
        "continuation_nlls": {name: [round(float(v), 6) for v in values] for name, values in nlls.items()},
    }
