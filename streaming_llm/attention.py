"""The "streaming_llm" attention implementation, registered with transformers' AttentionInterface.

The model's own attention modules compute q, k, v and RoPE and call `cache.update(...)` as usual; they
then call this function instead of sdpa/eager. When the cache is a StreamingKVCache, the layer it just
updated computes the sink + window attention of SEMANTICS.md (attention.md in docs/); any other cache
(or none) falls back to transformers' sdpa attention, so a prepared model still runs densely.

The hand-off from `cache.update` to this function is a thread-local slot: update() is always called
right before the attention function of the same layer, in the same thread.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from streaming_llm.models import describe

ATTN_IMPLEMENTATION = "streaming_llm"
_handoff = threading.local()


def expect_streaming_attention(cache, layer_idx: int) -> None:
    """Called by StreamingKVCache.update: the next attention call of `layer_idx` belongs to `cache`."""
    previous = getattr(_handoff, "step", None)
    if previous is not None:
        _handoff.step = None
        raise RuntimeError(
            "a StreamingKVCache was updated but the model did not run the streaming attention; "
            "call streaming_llm.prepare_model(model) (or load it with streaming_llm.load_model) first"
        )
    _handoff.step = (cache, layer_idx)


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
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, layer_idx = step
    _handoff.step = None
    if layer_idx != module.layer_idx:
        raise RuntimeError(f"streaming cache updated layer {layer_idx} but attention ran for layer {module.layer_idx}")
    if attention_mask is not None and _has_padding(attention_mask):
        raise ValueError(
            "StreamingKVCache does not support padded batches (an attention_mask with zeros): every row must be "
            "a stream of the same length; stream sequences of different lengths separately"
        )
    rotary = getattr(module, "streaming_rotary", None)
    if rotary is None:
        raise RuntimeError("this model was switched to streaming attention without prepare_model(model)")
    max_positions = getattr(module.config, "max_position_embeddings", None)
    if max_positions is not None and cache.cache_capacity >= max_positions:
        raise ValueError(
            f"cache capacity {cache.cache_capacity} (n_sink + window_size) is too large for the model's "
            f"max_position_embeddings={max_positions}: a step attends to capacity + 1 tokens at positions "
            f"0..capacity; use n_sink + window_size <= {max_positions - 1}"
        )
    cache.rotary = rotary
    scaling = module.scaling if scaling is None else scaling
    output = cache.layers[layer_idx].attend(query, rotary, scaling)
    return output.transpose(1, 2).contiguous(), None


def _has_padding(attention_mask: torch.Tensor) -> bool:
    """A 4D mask [b, 1, q, k] hides padding as key columns no query may see (causal masking never does)."""
    if attention_mask.ndim != 4:
        return False
    hidden = ~attention_mask if attention_mask.dtype == torch.bool else torch.isneginf(attention_mask)
    return bool(hidden.all(dim=-2).any())


AttentionInterface.register(ATTN_IMPLEMENTATION, streaming_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def prepare_model(model: nn.Module) -> nn.Module:
    """Make `model` run the streaming attention whenever its cache is a StreamingKVCache.

    Checks the architecture (ValueError naming the supported ones), gives every attention layer the
    model's rotary frequencies, and switches `config._attn_implementation` to "streaming_llm".
    Returns the model, unchanged otherwise.
    """
    architecture = describe(model)
    for module in architecture.attention_modules:
        module.streaming_rotary = architecture.rotary
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model
