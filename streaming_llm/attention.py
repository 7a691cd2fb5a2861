"""The "streaming_llm" attention implementation, registered with transformers' AttentionInterface.

The model's own attention modules compute q, k, v and RoPE and call `cache.update(...)` as usual; they
then call this function instead of sdpa/eager. When the cache is a StreamingKVCache, the layer it just
updated computes the sink + window attention of SEMANTICS.md (docs/semantics.md); any other cache
(or none) falls back to the attention the model had (its eager attention, else transformers' sdpa), so a prepared
model still runs densely, as before.

The hand-off from `cache.update` to this function is a thread-local slot: update() is always called
right before the attention function of the same layer, in the same thread. The mask is handed off the same
way: a StreamingKVCache's `get_mask_sizes` marks the step (by its cache_position tensor, which transformers
passes on to the mask function it calls next), so that a prepared model run densely keeps its own mask.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from streaming_llm.models import check_capacity, describe, sliding_windows

ATTN_IMPLEMENTATION = "streaming_llm"
_handoff = threading.local()


NOT_PREPARED = ("a StreamingKVCache was updated but the model did not run the streaming attention; "
                "call streaming_llm.prepare_model(model) first")


def expect_streaming_attention(cache, layer_idx: int) -> None:
    """Called by StreamingKVCache.update: the next attention call of `layer_idx` belongs to `cache`.

    A model that is not prepared is refused at its first layer: the mask it built for this step did not come from
    `streaming_mask` (still marked); or at its second, whose update finds the first one's hand-off not taken. A
    hand-off left by another cache is dropped (its forward pass ended or failed), so it never blames this one."""
    previous, _handoff.step = getattr(_handoff, "step", None), None
    if previous is not None and previous[0] is cache:
        raise RuntimeError(NOT_PREPARED)
    if layer_idx == 0 and getattr(_handoff, "mask_cache", None) is cache:
        _handoff.mask_cache = _handoff.mask_position = None
        raise RuntimeError(NOT_PREPARED)
    _handoff.step = (cache, layer_idx)


def expect_streaming_mask(cache, cache_position: torch.Tensor) -> None:
    """Called by StreamingKVCache.get_mask_sizes: the mask built next for this cache_position is a streaming step's."""
    _handoff.mask_cache, _handoff.mask_position = cache, cache_position


HALF_DTYPES = (torch.float16, torch.bfloat16)


def under_other_half_autocast(dtype: torch.dtype, device_type: str) -> bool:
    """Whether torch.autocast of the other half dtype than `dtype` (what a layer holds) is on: a bfloat16 model under
    float16 autocast, or the reverse. Its promoting ops (torch.cat: RoPE's rotate_half, the kept blocks, the sinks)
    refuse that mix ("Unexpected floating ScalarType in at::autocast::prioritize"), so the streaming attention and
    the cache's re-rotations then run with autocast off, in the model's own dtype, as its weights are."""
    return (dtype in HALF_DTYPES and torch.is_autocast_enabled(device_type)
            and dtype != torch.get_autocast_dtype(device_type))


def autocast_off_if(condition: bool, device_type: str):
    return torch.autocast(device_type, enabled=False) if condition else contextlib.nullcontext()


def in_held_dtype(held: torch.Tensor):
    """The context a cache's own torch.cat and re-rotation of what it holds (`held`) run in: autocast off under
    autocast of the other half dtype than `held`'s (under_other_half_autocast), as it is otherwise."""
    device_type = held.device.type
    return autocast_off_if(under_other_half_autocast(held.dtype, device_type), device_type)


def cap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping, softcap * tanh(scores / softcap); the scores as they are without."""
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def softmax_with_sink_logits(scores: torch.Tensor, s_aux: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the keys, in float32. `s_aux` (GPT-OSS's learned logit per query head [heads]: a key without a
    value that takes its share of every row's weight) joins the softmax and is dropped after it.

    scores: [b, kv_heads, groups * n, m] as `cache.grouped_scores` lays them out (query head kv * groups + g in rows
    g * n .. g * n + n - 1), or [b, heads, n, m] (groups = 1)."""
    scores = scores.float()
    if s_aux is None:
        return torch.softmax(scores, dim=-1)
    batch, kv_heads, rows, _ = scores.shape
    groups = s_aux.numel() // kv_heads
    sink_column = s_aux.float().reshape(1, kv_heads, groups, 1, 1).expand(batch, kv_heads, groups, rows // groups, 1)
    return torch.softmax(torch.cat([scores, sink_column.reshape(batch, kv_heads, rows, 1)], dim=-1), dim=-1)[..., :-1]


def _dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A prepared model run without a StreamingKVCache: the model's own eager attention where it was loaded with
    eager attention (prepare_model records it), so that it gives the same logits, and attention weights, as before;
    otherwise transformers' SDPA attention, or, for Gemma 2's logit soft-capping and GPT-OSS's learned sink logits
    (which SDPA does not apply), the same softmax written out as the model's eager attention does."""
    if getattr(module, "streaming_dense_attention", None) == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            return eager(module, query, key, value, _additive_mask(attention_mask, query, key), dropout=dropout,
                         scaling=scaling, **kwargs)
    softcap, s_aux = kwargs.get("softcap"), kwargs.get("s_aux")
    if softcap is None and s_aux is None:
        # looked up, as the model itself does: an override of "sdpa" (kvpress's wrapper for head-wise presses) applies
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    n, m = query.shape[-2], key.shape[-2]
    if attention_mask is None:  # SDPA's causal shortcut: the queries are the last n of the m positions
        attention_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
    if attention_mask.dtype == torch.bool:  # hidden keys at the dtype's lowest value, as the eager attentions have
        # it: a padded query that sees no key then averages the values instead of making NaNs that spread to every
        # token of its row through the next layer's values
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(query.dtype).min)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = cap_scores(query @ key.transpose(-1, -2) * (module.scaling if scaling is None else scaling), softcap)
    weights = softmax_with_sink_logits(scores + attention_mask[..., :m], s_aux).to(value.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), None


def _additive_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The mask an eager attention takes (transformers' eager_mask): 0 where a key is seen, the dtype's lowest value
    where it is hidden, [b, 1, n, m]; from the SDPA mask the streaming mask function built (boolean, or None for
    plain causal attention over the last n of m positions)."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask
    n, m = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        attention_mask = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)[None, None]
    zero = torch.tensor(0.0, device=query.device, dtype=query.dtype)
    return torch.where(attention_mask, zero, torch.finfo(query.dtype).min)


def streaming_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [b, heads, n, d] -> output [b, n, heads, d] (the layout transformers' attention functions return)."""
    step = getattr(_handoff, "step", None)
    if step is None:
        return _dense_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    cache, layer_idx = step
    _handoff.step = None
    if layer_idx != module.layer_idx:
        raise RuntimeError(f"streaming cache updated layer {layer_idx} but attention ran for layer {module.layer_idx}")
    if kwargs.get("output_attentions"):
        raise ValueError("the streaming attention computes no attention weights: output_attentions=True is not "
                         "supported with a StreamingKVCache (run the model with a DynamicCache and eager attention)")
    if attention_mask is not None and _has_padding(attention_mask):
        _refuse_masked_step(cache.layers[layer_idx].get_seq_length(), kwargs.get("position_ids"))
    rotary = getattr(module, "streaming_rotary", None)
    if rotary is None:
        raise RuntimeError("this model was switched to streaming attention without prepare_model(model)")
    check_capacity(module.config, cache.cache_capacity)
    cache.layers[layer_idx].rotary = rotary
    pending = cache.layers[layer_idx].pending
    held, device_type = pending["values"].dtype, query.device.type
    # Under autocast of the other half dtype the whole step runs with autocast off, the interleaved models' reordering
    # too: a partly rotated head (GLM, GLM-4) is reordered with a torch.cat, which refuses the keys in the held dtype.
    autocast_off = under_other_half_autocast(held, device_type)
    with autocast_off_if(autocast_off, device_type):
        if rotary.interleaved:  # q, k and the model's angles in rotate-half order (the same permutation: q·k unchanged)
            query, pending["keys"] = rotary.to_half_layout(query), rotary.to_half_layout(pending["keys"])
            if pending["sin"] is not None:
                pending["cos"], pending["sin"] = rotary.model_angles(pending["cos"]), rotary.model_angles(pending["sin"])
        if pending["sin"] is None and rotary.rotary_ndims:  # SmolLM3 rotates but passes no cos/sin to cache.update
            pending["cos"], pending["sin"] = _model_rotation(rotary, kwargs.get("position_ids"), query.dtype)
        scaling = module.scaling if scaling is None else scaling
        if autocast_off:  # the step in the held dtype; keys and values are in it already (StreamingLayer._held_dtype)
            query = query.to(held)
            if pending["sin"] is not None:
                pending["cos"], pending["sin"] = pending["cos"].to(held), pending["sin"].to(held)
        output = cache.layers[layer_idx].attend(query, rotary, scaling, kwargs.get("softcap"),
                                                module.streaming_window, kwargs.get("s_aux"))
    return output.transpose(1, 2).contiguous(), None


def _model_rotation(rotary, position_ids: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin [batch, n, rotary_ndims] the model rotated this step's q and k with, from its position ids: its RoPE
    is `rotary` (a static type: the angles are the positions times inv_freq, scaled by attention_scaling), in the
    dtype of q and k, as the model's rotary embedding returns them."""
    if position_ids is None:
        raise ValueError("StreamingKVCache needs the rotary cos/sin in cache_kwargs, or the position ids in the "
                         "attention's arguments (RoPE models only)")
    cos, sin = rotary.angles(position_ids)
    return cos.to(dtype), sin.to(dtype)


def _refuse_masked_step(seen: int, position_ids: torch.Tensor | None) -> None:
    """The ValueError for a step whose mask hides keys: a stream fed again from its start, or padding."""
    start = int(position_ids.reshape(-1)[0]) if position_ids is not None and position_ids.numel() else seen
    if start < seen:
        raise ValueError(  # transformers builds that mask for a step that starts before the tokens the cache holds
            f"this step starts at stream position {start}, but the StreamingKVCache has "
            f"already taken {seen} tokens: a stream is fed once, in order (model.generate needs use_cache=True; to "
            "start again, reset the cache)"
        )
    raise ValueError(
        "StreamingKVCache does not support padded batches (an attention_mask with zeros): every row must be "
        "a stream of the same length; stream sequences of different lengths separately. (model.generate builds "
        "such a mask when the prompt contains the pad token id: pass attention_mask=torch.ones_like(input_ids).)"
    )


def _has_padding(attention_mask: torch.Tensor) -> bool:
    """A 4D mask [b, 1, q, k] hides padding as key columns no query may see (causal masking never does)."""
    if attention_mask.ndim != 4:
        return False
    hidden = ~attention_mask if attention_mask.dtype == torch.bool else torch.isneginf(attention_mask)
    return bool(hidden.all(dim=-2).any())


def streaming_mask(batch_size, cache_position, kv_length, kv_offset=0, mask_function=causal_mask_function,
                   attention_mask=None, **kwargs):
    """The mask transformers builds for a streaming step. It serves only to detect padded rows (refused above):
    which keys a query sees is the cache's decision (SEMANTICS.md §1). So a sliding-window overlay (Mistral v0.1,
    Qwen2 with use_sliding_window) is dropped: laid over the cache's slots in stream coordinates, it would hide
    every held key once the stream is longer than the window. A layer's own window is applied by the cache instead,
    in the mode's positions (`positions.visible_in_layer`), the window prepare_model read from the config.
    A step without a StreamingKVCache (a prepared model run densely) gets the model's own mask, overlay included."""
    if getattr(_handoff, "mask_position", None) is not cache_position:
        return sdpa_mask(batch_size, cache_position, kv_length, kv_offset, mask_function, attention_mask, **kwargs)
    cache, _handoff.mask_cache, _handoff.mask_position = _handoff.mask_cache, None, None
    if (attention_mask is not None and attention_mask.ndim == 2 and attention_mask.shape[-1] < kv_length
            and int(cache_position[0]) >= cache.get_seq_length()):  # (a stream fed again from 0: refused later)
        raise ValueError(  # its missing columns would read as padding (refused as a "padded batch")
            f"attention_mask covers {attention_mask.shape[-1]} tokens; as with any transformers cache it must cover "
            "the tokens fed before too (the whole stream so far and the new ones), or be left out")
    kwargs.pop("local_size", None)
    return sdpa_mask(batch_size, cache_position, kv_length, kv_offset, causal_mask_function, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, streaming_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, streaming_mask)


_model_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_model_locks_lock = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock the wrappers of `model` hold while it runs for them (and prepare_model while it sets it up): a
    FastStreamingWrapper's step switches the model's config to the static attention for the step, which every
    layer of another thread's forward pass on the same model would read. Kept beside the model, not on it (a
    lock does not deepcopy), and dropped with it."""
    lock = _model_locks.get(model)
    if lock is None:
        with _model_locks_lock:
            lock = _model_locks.setdefault(model, threading.RLock())
    return lock


def prepare_model(model: nn.Module) -> nn.Module:
    """Make `model` run the streaming attention whenever its cache is a StreamingKVCache.

    Checks the architecture (ValueError naming the supported ones), gives every attention layer the
    model's rotary frequencies and its own sliding window (`models.sliding_windows`: from the config, as the model's
    mask reads it; Qwen2-MoE and PhiMoE do not pass theirs on to the attention function), and switches
    `config._attn_implementation` to "streaming_llm". Run without a StreamingKVCache, the model attends as it did
    before: with its own eager attention if it was loaded with `attn_implementation="eager"`, else with SDPA.
    Returns the model, unchanged otherwise. Runs under `model_lock(model)`, as the wrappers' forward passes do.
    """
    with model_lock(model):
        return _prepare(model)


def _prepare(model: nn.Module) -> nn.Module:
    architecture = describe(model)
    windows = sliding_windows(model.config)
    if len(windows) != len(architecture.attention_modules):
        raise ValueError(f"this {architecture.model_type} model has {len(architecture.attention_modules)} attention "
                         f"layers where its config names {len(windows)}")
    for module, rotary, window in zip(architecture.attention_modules, architecture.layer_rotaries, windows):
        module.streaming_rotary, module.streaming_window = rotary, window
        previous = getattr(module.config, "_attn_implementation", None)
        if previous != ATTN_IMPLEMENTATION:  # what the model ran before (kept by a second prepare_model)
            module.streaming_dense_attention = previous
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
