"""NVIDIA kvpress 0.5.5's StreamingLLMPress, driven as a method of this package (see docs/kvpress.md).

Two protocols:
- KvpressDecodeStepper: the decode loop of SEMANTICS.md §1. One token a step, kvpress's DecodingPress around
  StreamingLLMPress with compression_interval=1 and target_size = n_sink + window_size: after every step's
  attention the cache is cut back to exactly n_sink + window_size entries. Positions are absolute (§2
  "absolute"): the query gets its stream position t, kept keys keep the rotation they were stored with.
- kvpress_prefill_compress / kvpress_score_continuation: kvpress's intended protocol. Compress a context once,
  during prefill, with KeyRerotationPress(StreamingLLMPress), then score a continuation against that cache.

variant="shipped" is kvpress as installed. variant="corrected" fixes the one flaw found (docs/kvpress.md):
ScorerPress.compress keeps the `topk` indices in topk's order, not in cache order; StreamingLLMPress scores
by cache slot, so from the second compression on it protects whatever sits in the first n_sink *slots*, not
the first n_sink tokens. SortedStreamingLLMPress sorts the kept indices, the line KeyRerotationPress has.

Importing kvpress wraps every function in transformers' ALL_ATTENTION_FUNCTIONS (for head-wise presses such
as AdaKV, none of which is used here; the wrapper passes `dropout` as the 6th positional argument, which this
package's attention functions take there, as transformers' do). This module removes the wrappers around this
package's own attention functions again right after importing kvpress, so that a streaming comparison runs exactly
the registered attention; transformers' functions keep theirs (a pass-through for every press but a head-wise one,
which a user of kvpress in the same process may need). Entering a press also sets
`self_attn.rotary_emb` on each decoder layer of the model (a shared reference to the model's rotary embedding; it
stays after exit).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from kvpress import DecodingPress, KeyRerotationPress, StreamingLLMPress
from kvpress import SUPPORTED_MODELS as KVPRESS_MODELS
from kvpress.utils import compute_n_kept
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from streaming_llm.attention import ATTN_IMPLEMENTATION
from streaming_llm.cache import validate_sizes
from streaming_llm.fast import STATIC_ATTN_IMPLEMENTATION
from streaming_llm.checks import check_int, check_token_ids
from streaming_llm.models import UnsupportedModelError


def _remove_kvpress_attention_wrappers() -> None:
    """Undo kvpress.attention_patch.patch_attention_functions (run at kvpress import) for this package's attention
    functions. transformers' own (sdpa, flash, ...) keep kvpress's wrappers: a head-wise press (AdaKV) used elsewhere
    in the process needs them, and they pass the call through unchanged for every other press.

    It installs its wrappers as local overrides of ALL_ATTENTION_FUNCTIONS; deleting an override restores the
    registered function.
    """
    for name in (ATTN_IMPLEMENTATION, STATIC_ATTN_IMPLEMENTATION):
        if getattr(ALL_ATTENTION_FUNCTIONS.get(name), "__module__", None) == "kvpress.attention_patch":
            del ALL_ATTENTION_FUNCTIONS[name]


_remove_kvpress_attention_wrappers()

VARIANTS = ("shipped", "corrected")


@dataclass
class SortedStreamingLLMPress(StreamingLLMPress):
    """StreamingLLMPress whose compression keeps the cache in stream order (the "corrected" variant).

    Same scores as kvpress's StreamingLLMPress; compress is ScorerPress.compress plus one sort of the kept
    indices, so that cache slot i always holds the i-th oldest kept token and the sinks stay in slots
    0..n_sink-1 however many compressions follow.
    """

    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compression_ratio == 0:
            return keys, values
        scores = self.score(module, hidden_states, keys, values, attentions, kwargs)  # [batch, kv_heads, k_len]
        n_kept = compute_n_kept(keys.shape[2], self.compression_ratio)
        # The fix: sorted kept indices, as KeyRerotationPress.compress has them.
        kept_slots = scores.topk(n_kept, dim=-1).indices.sort(dim=-1).values
        kept_slots = kept_slots.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)
        return keys.gather(2, kept_slots).contiguous(), values.gather(2, kept_slots).contiguous()


def _streaming_press(n_sink: int, variant: str) -> StreamingLLMPress:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; expected one of {VARIANTS}")
    return StreamingLLMPress(n_sink=n_sink) if variant == "shipped" else SortedStreamingLLMPress(n_sink=n_sink)


def require_kvpress_support(model: nn.Module) -> None:
    """UnsupportedModelError unless the model is one kvpress 0.5.5 supports (its SUPPORTED_MODELS: Llama, Mistral,
    Phi-3, Qwen2/3). Others it runs with a warning, or not at all: GPT-NeoX keeps its layers at `model.gpt_neox`,
    not `model.model`, and KeyRerotationPress rotates whole heads, which breaks Phi's partial rotary. Gemma 3 it
    lists, but presses only its full-attention layers."""
    if not isinstance(model, KVPRESS_MODELS):
        supported = ", ".join(cls.__name__ for cls in KVPRESS_MODELS if "ForCausalLM" in cls.__name__)
        raise UnsupportedModelError(
            f"kvpress 0.5.5 does not support {type(model).__name__} (it supports {supported})"
        )
    if model.config.model_type == "gemma3":
        raise UnsupportedModelError("kvpress 0.5.5 compresses only Gemma 3's full-attention layers (its sliding layers "
                                    "keep their own window): not the method compared here")


class _SequenceGatherRecorder(TorchFunctionMode):
    """Records the index of the first `gather` along dim 2 (the sequence axis of [batch, heads, seq, dim] keys)."""

    def __init__(self):
        super().__init__()
        self.kept_slots: torch.Tensor | None = None  # [batch, kv_heads, n_kept]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.gather, torch.Tensor.gather) and self.kept_slots is None:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            index = kwargs.get("index", args[2] if len(args) > 2 else None)
            if dim == 2 and index is not None and index.dim() == 4:
                self.kept_slots = index[..., 0].clone()
        return func(*args, **kwargs)


@contextmanager
def _recording_kept_slots(press, kept_slots: dict[int, torch.Tensor]):
    """While active, each `press.compress` call stores the cache slots it kept in kept_slots[layer_idx].

    Observes kvpress's own gather of the keys (every compress here selects keys with one
    ``keys.gather(2, index)``), so the record is what the press did, not a re-derivation of it.
    """
    class_compress = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        with _SequenceGatherRecorder() as recorder:
            keys, values = class_compress(module, hidden_states, keys, values, attentions, kwargs)
        if recorder.kept_slots is not None:
            kept_slots[module.layer_idx] = recorder.kept_slots
        return keys, values

    press.compress = compress  # an instance attribute, shadowing the class method until exit
    try:
        yield
    finally:
        del press.compress


def _num_layers(model: nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


class KvpressDecodeStepper:
    """kvpress's StreamingLLMPress as a decode-loop method: one token a step, cache cut to n_sink + window_size.

    step(input_ids [1, n]) -> logits [1, n, vocab] feeds the n tokens one at a time, each as
    ``model(token, past_key_values=cache, position_ids=[[t]])`` inside ``with DecodingPress(...)(model)``.
    Token t attends to the cache left by step t-1 plus itself; kvpress's forward hook then compresses each
    layer after its attention (SEMANTICS.md §1). kept_positions() reports which stream positions are held.
    record_positions=False runs the press unobserved, as kvpress runs it (no record of its gathers, no positions
    kept per layer: a few per cent of a step on CPU), for timing it; kept_positions() is then refused.
    """

    def __init__(self, model: nn.Module, n_sink: int, window_size: int, variant: str = "corrected",
                 record_positions: bool = True):
        # Integers, as for our cache: a float n_sink (2.5) made compression_ratio_keeping search for ever.
        n_sink, window_size = validate_sizes(n_sink, window_size)
        require_kvpress_support(model)
        self.model = model
        self.n_sink, self.window_size, self.variant = n_sink, window_size, variant
        self.record_positions = record_positions
        self.cache_capacity = n_sink + window_size
        self.press = DecodingPress(
            base_press=_streaming_press(n_sink, variant),
            compression_interval=1,  # compress after every step...
            target_size=self.cache_capacity,  # ...back to exactly n_sink + window_size entries
            hidden_states_buffer_size=0,  # StreamingLLMPress scores by slot only; no hidden states needed
        )
        self.reset()

    def reset(self) -> None:
        """Forget the stream: empty cache, next token is stream position 0."""
        self.cache = DynamicCache()
        self.tokens_seen = 0
        # per layer: stream position of each cache entry, in cache order, [batch=1, kv_heads, cache_len]
        self._positions: list[torch.Tensor | None] = [None] * _num_layers(self.model)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [1, n, vocab] for input_ids [1, n], fed one token at a time."""
        check_token_ids("input_ids", input_ids)
        kept_slots: dict[int, torch.Tensor] = {}
        logits = []
        recording = _recording_kept_slots(self.press, kept_slots) if self.record_positions else nullcontext()
        with self.press(self.model), recording:
            for token_index in range(input_ids.shape[1]):
                position = self.tokens_seen
                output = self.model(
                    input_ids=input_ids[:, token_index : token_index + 1],
                    past_key_values=self.cache,
                    position_ids=torch.tensor([[position]], device=input_ids.device),  # absolute, as kvpress does
                    use_cache=True,
                )
                logits.append(output.logits)
                self._advance_positions(position, kept_slots)
                kept_slots.clear()
                self.tokens_seen += 1
        return torch.cat(logits, dim=1)

    __call__ = step  # the stepper protocol compute_perplexity uses

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed the start of a stream in one forward pass, while it fits in the capacity.

        Nothing is evicted before the cache is full, so no press runs: the result equals feeding the
        tokens one at a time. Used to reach the steady state quickly (benchmarks).
        """
        check_token_ids("input_ids", input_ids)
        n = input_ids.shape[1]
        if self.tokens_seen + n > self.cache_capacity:
            raise ValueError(f"prefill of {n} tokens after {self.tokens_seen} would exceed the capacity {self.cache_capacity}")
        positions = torch.arange(self.tokens_seen, self.tokens_seen + n, device=input_ids.device)
        output = self.model(input_ids=input_ids, past_key_values=self.cache, position_ids=positions[None],
                            attention_mask=torch.ones_like(input_ids), use_cache=True)
        for layer_idx, layer_positions in enumerate(self._positions if self.record_positions else ()):
            kv_heads = self.cache.layers[layer_idx].keys.shape[1]
            new = positions.cpu().view(1, 1, n).expand(1, kv_heads, n)
            self._positions[layer_idx] = new if layer_positions is None else torch.cat([layer_positions, new], dim=-1)
        self.tokens_seen += n
        return output.logits

    def _advance_positions(self, position: int, kept_slots: dict[int, torch.Tensor]) -> None:
        for layer_idx, layer_positions in enumerate(self._positions):
            cache_len = self.cache.layers[layer_idx].keys.shape[2]
            if self.record_positions:
                kv_heads = self.cache.layers[layer_idx].keys.shape[1]
                new = torch.full((1, kv_heads, 1), position, dtype=torch.long)
                layer_positions = new if layer_positions is None else torch.cat([layer_positions, new], dim=-1)
                if layer_idx in kept_slots:
                    layer_positions = layer_positions.gather(-1, kept_slots[layer_idx].cpu())
                self._positions[layer_idx] = layer_positions
            recorded = layer_positions.shape[-1] if self.record_positions else cache_len
            if cache_len != recorded or cache_len != min(position + 1, self.cache_capacity):
                raise RuntimeError(
                    f"kvpress left {cache_len} entries in layer {layer_idx} after step {position}; "
                    f"expected {min(position + 1, self.cache_capacity)}"
                )

    def kept_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Stream positions of the tokens held in layer `layer_idx`, cache order: LongTensor [kv_heads, cache_len]."""
        if not self.record_positions:
            raise ValueError("this stepper runs kvpress unobserved (record_positions=False): it has no kept positions")
        positions = self._positions[layer_idx]
        return torch.empty(0, 0, dtype=torch.long) if positions is None else positions[0].clone()


def compression_ratio_keeping(context_length: int, n_kept: int) -> float:
    """The compression ratio r with compute_n_kept(context_length, r) == n_kept (kvpress rounds with int())."""
    context_length, n_kept = check_int("context_length", context_length, 0), check_int("n_kept", n_kept, 0)
    if n_kept >= context_length:
        return 0.0
    ratio = 1.0 - n_kept / context_length
    # int(L * (1 - r)) can land one below n_kept through rounding; step r down by ulps until it does not.
    while compute_n_kept(context_length, ratio) < n_kept:
        ratio = math.nextafter(ratio, 0.0)
    if compute_n_kept(context_length, ratio) != n_kept:
        raise RuntimeError(f"no compression ratio keeps exactly {n_kept} of {context_length} tokens")
    return ratio


@dataclass
class KvpressPrefill:
    """A context compressed by kvpress during prefill.

    cache: the compressed DynamicCache; kept_positions: LongTensor [kv_heads, n_kept], stream positions of the
    cache entries in cache order (layer 0); next_position: the position_id the first continuation token gets
    (kvpress's pipeline: the compressed length with rerotation, the context length without);
    last_logits: [1, vocab], the last context token's logits (dense: prefill attention is never compressed),
    which predict the first continuation token.
    """

    cache: DynamicCache
    kept_positions: torch.Tensor
    next_position: int
    last_logits: torch.Tensor


@torch.no_grad()
def kvpress_prefill_compress(
    model: nn.Module, context_ids: torch.Tensor, n_sink: int, window_size: int, rerotate: bool = True
) -> KvpressPrefill:
    """Prefill context_ids [1, L] under KeyRerotationPress(StreamingLLMPress) (or the bare press, rerotate=False).

    The compression ratio is chosen so that exactly min(L, n_sink + window_size) entries stay: the first n_sink
    tokens and the last window_size. With rerotation the kept keys are re-rotated to cache slots
    0..n_kept-1 (as pos-shift places them); without, they keep their stream positions (SEMANTICS.md §2 absolute).
    """
    n_sink, window_size = validate_sizes(n_sink, window_size)  # integers: see KvpressDecodeStepper
    require_kvpress_support(model)
    check_token_ids("context_ids", context_ids)
    context_length = context_ids.shape[1]
    n_kept = min(context_length, n_sink + window_size)
    streaming_press = StreamingLLMPress(
        compression_ratio=compression_ratio_keeping(context_length, n_kept), n_sink=n_sink
    )
    press = KeyRerotationPress(streaming_press) if rerotate else streaming_press
    cache = DynamicCache()
    kept_slots: dict[int, torch.Tensor] = {}
    with press(model), _recording_kept_slots(press, kept_slots):
        output = model(input_ids=context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if cache.get_seq_length() != n_kept:
        raise RuntimeError(f"kvpress kept {cache.get_seq_length()} of {context_length} tokens; expected {n_kept}")
    kept_positions = kept_slots[0][0].cpu() if 0 in kept_slots else torch.arange(context_length).expand(
        cache.layers[0].keys.shape[1], -1
    )
    return KvpressPrefill(
        cache=cache,
        kept_positions=kept_positions.clone(),
        next_position=n_kept if rerotate else context_length,
        last_logits=output.logits[:, -1],
    )


@torch.no_grad()
def kvpress_score_continuation(
    model: nn.Module, prefill: KvpressPrefill, continuation_ids: torch.Tensor
) -> torch.Tensor:
    """Per-token NLLs (nats, float32 [m]) of continuation_ids [1, m] given the compressed context.

    NLL i is -log p(continuation[i] | context, continuation[:i]); i = 0 is scored from prefill.last_logits.
    The continuation is run in one forward at positions next_position .. next_position + m - 1 with no further
    compression, as kvpress's pipeline answers a question; the cache is cut back afterwards, so one prefill
    can score several continuations.
    """
    check_token_ids("continuation_ids", continuation_ids)
    length = continuation_ids.shape[1]
    context_cache_length = prefill.cache.get_seq_length()
    logits = prefill.last_logits[:, None]  # [1, 1, vocab]
    if length > 1:
        positions = prefill.next_position + torch.arange(length - 1, device=continuation_ids.device)
        output = model(
            input_ids=continuation_ids[:, :-1],
            past_key_values=prefill.cache,
            position_ids=positions[None],
            use_cache=True,
        )
        prefill.cache.crop(context_cache_length)
        logits = torch.cat([logits, output.logits], dim=1)
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)  # [m, vocab]
    return -log_probs.gather(-1, continuation_ids[0, :, None]).squeeze(-1)
