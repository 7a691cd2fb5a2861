"""StreamingKVCache: attention sinks + a recent window, behind transformers' `Cache` contract.

One `StreamingLayer` per model layer holds that layer's kept keys and values; `StreamingKVCache`
holds the layers. The model's attention code calls `cache.update(...)` as it does for any cache;
the attention itself runs in `streaming_llm.attention` (registered as the attention implementation
"streaming_llm" by `prepare_model`), which asks the layer to `attend` and then to evict.

Keys arrive rotated at whatever positions the caller used (the wrapper passes position 0, generate()
passes stream positions); the layer undoes that rotation with the very cos/sin the model used and
applies the positions of SEMANTICS.md itself, so the caller's positions never matter.

Storage, streaming_mode="ours": a sink buffer [batch, kv_heads, n_sink, head_dim] and a buffer
[batch, kv_heads, n_sink + window_size + 1, head_dim] preallocated on first use (see RingLayer); a token at
stream position p >= n_sink lives in ring slot n_sink + (p - n_sink) % (window_size + 1), so a step writes only
its new tokens and never copies the kept ones. streaming_mode="mit": one tensor per layer in stream order, cut after
every step by `StartRecentKVCache`, as MIT's code does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streaming_llm.attention import cap_scores, expect_streaming_attention, expect_streaming_mask, softmax_with_sink_logits
from streaming_llm.checks import check_int, warn_at_caller
from streaming_llm.mit_cache import StartRecentKVCache
from streaming_llm.positions import POSITION_MODES, PositionPolicy, visible_in_layer
from streaming_llm.rope import RotaryParams, cos_sin, rerotate_keys, rotation_matrix

STREAMING_MODES = ("ours", "mit")
# A block of more tokens than min(capacity + 1, BLOCK_PIECE) is attended a piece of that many at a time
# (StreamingLayer.attend).
BLOCK_PIECE = 512


def validate_sizes(n_sink: int, window_size: int) -> tuple[int, int]:
    """(n_sink, window_size) as Python ints; ValueError unless n_sink is an integer >= 0 and window_size an
    integer >= 1 (SEMANTICS.md)."""
    return check_int("n_sink", n_sink, 0), check_int("window_size", window_size, 1)


def validate_config(n_sink: int, window_size: int, position_mode: str, streaming_mode: str) -> tuple[int, int]:
    """(n_sink, window_size) as Python ints; ValueError with the reason for any configuration SEMANTICS.md does
    not define."""
    n_sink, window_size = validate_sizes(n_sink, window_size)
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode must be one of {', '.join(POSITION_MODES)}; got {position_mode!r}")
    if streaming_mode not in STREAMING_MODES:
        raise ValueError(f"streaming_mode must be one of {', '.join(STREAMING_MODES)}; got {streaming_mode!r}")
    return n_sink, window_size


def sliding_ring_size(window_size: int, sliding_window: int | None) -> int | None:
    """W for a layer with its own sliding window W <= window_size + 1, else None. Such a layer sees, of the keys of
    SEMANTICS.md §1, exactly the last W tokens (each at its true distance) in every position mode: W <= window_size + 1
    keeps them all in the window, and a sink is W or more back (t - j >= W) whenever it is not one of them (before
    token C every position frame is the stream's). So it needs W slots (RingLayer.sliding), not capacity + 1."""
    return sliding_window if sliding_window is not None and sliding_window <= window_size + 1 else None


def ring_layout(n_sink: int, window_size: int, sliding_window: int | None = None) -> tuple[int, int]:
    """(sink slots, ring slots) of a RingLayer's buffers: the sinks kept apart, then a ring of window_size + 1 recent
    tokens; (0, W) for a layer that keeps only its last W tokens (`sliding_ring_size`)."""
    ring = sliding_ring_size(window_size, sliding_window)
    return (0, ring) if ring else (n_sink, window_size + 1)


def kv_cache_bytes(config, n_sink: int, window_size: int, streaming_mode: str = "ours",
                   dtype: torch.dtype = torch.float32, batch_size: int = 1) -> int:
    """Bytes of keys and values a full StreamingKVCache holds for a model of this config (what `streaming-llm info`
    shows): per layer, "ours" keeps capacity + 1 slots and the sinks' own keys, a sliding ring W slots and no sinks
    (`sliding_ring_size`); "mit" keeps the capacity (its step concatenates one token more for a moment)."""
    from streaming_llm.models import attention_shape, sliding_windows

    shape = attention_shape(config)
    per_slot = batch_size * shape.kv_heads * shape.head_dim * torch.empty((), dtype=dtype).element_size()
    slots = 0
    for window in sliding_windows(config):
        if streaming_mode == "mit":
            slots += 2 * (n_sink + window_size)
        else:
            sinks, ring = ring_layout(n_sink, window_size, window)
            slots += 2 * (sinks + ring) + sinks  # keys and values, and the sinks' own keys
    return slots * per_slot


def written_outside_inference_mode(tensor: torch.Tensor) -> bool:
    """True for an inference tensor (made under torch.inference_mode()) now that the mode is off: torch refuses
    to write it in place, so a stream begun in the mode goes on with copies."""
    return tensor.is_inference() and not torch.is_inference_mode_enabled()


def made_as(buffer: torch.Tensor):
    """A context in which new tensors are made as `buffer` was: an inference tensor only if it is one. A layer's slot
    positions rebuilt under torch.inference_mode() beside buffers made outside it (a FastStreamingWrapper reset, or its
    cache read, in that mode) could not be written outside it ("Inplace update to inference tensor")."""
    return torch.inference_mode(torch.is_inference_mode_enabled() and buffer.is_inference())


def stopped_pass_error(first_layer_seen: int, later_layer_seen: int) -> RuntimeError:
    """The error for a stream whose layers hold different numbers of tokens: a forward pass stopped between two layers
    (an exception or KeyboardInterrupt raised in a later layer, or in a hook on one, after the first had stored the
    step's tokens). Fed on, such a stream was attended, silently, as a stream some layers never saw (logits off by 1 to
    4 on the tiny Llama), whether the token was fed again or not. The same holds for a stream one model began and a
    model with another number of layers went on with (a cache given to another wrapper or model): named too."""
    return RuntimeError(f"a forward pass through this stream stopped part-way (an exception or KeyboardInterrupt in a "
                        f"layer), or a model with another number of layers than the one that began it went on with it: "
                        f"its first layer has taken {first_layer_seen} tokens of the stream, a later one "
                        f"{later_layer_seen}, so the layers no longer hold the same stream; reset it (wrapper.reset(), "
                        "cache.reset()) to start a new one")


def _can_use_fused_cpu_attention(query: torch.Tensor, new_positions: torch.Tensor, policy: PositionPolicy) -> bool:
    """The fused path needs PyTorch's CPU flash kernel (it returns the log-sum-exp the sink merge needs), a
    dtype it takes, and a block with no new sink tokens (so every query has a visible window key)."""
    return (
        query.device.type == "cpu"
        and query.dtype in (torch.float32, torch.bfloat16)
        and not torch.is_autocast_enabled("cpu")  # an op autocast does not cast: q (rotated) and v differ there
        and int(new_positions[0]) >= policy.n_sink
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q·k for grouped-query attention without repeating keys.

    query [b, heads, n, d], keys [b, kv_heads, m, d] -> [b, kv_heads, groups * n, m]; query head i
    uses kv head i // groups, as transformers' repeat_kv does.
    """
    batch, heads, n, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * n, dim)
    return grouped @ keys.transpose(-1, -2)


def grouped_output(probabilities: torch.Tensor, values: torch.Tensor, heads: int) -> torch.Tensor:
    """P @ V for grouped-query attention, [b, kv_heads, groups * n, m] x [b, kv_heads, m, d] -> [b, heads, n, d]."""
    output = probabilities @ values
    batch, kv_heads, grouped_n, dim = output.shape
    return output.reshape(batch, heads, grouped_n * kv_heads // heads, dim)


def grouped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float,
                      mask: torch.Tensor | None = None, softcap: float | None = None,
                      s_aux: torch.Tensor | None = None) -> torch.Tensor:
    """Attention written out as matmuls over grouped heads, for scores no SDPA kernel shapes (Gemma 2's soft-capping,
    GPT-OSS's sink logits): [b, heads, n, d] over [b, kv_heads, m, d] -> [b, heads, n, dv]. `mask`: boolean (true
    where a query sees a key) or additive, broadcastable to the grouped scores."""
    scores = cap_scores(grouped_scores(query, keys).float() * scaling, softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return grouped_output(softmax_with_sink_logits(scores, s_aux).to(values.dtype), values, query.shape[1])


class StreamingLayer(CacheLayerMixin):
    """One layer's kept keys/values and the streaming attention over them (storage in subclasses)."""

    def __init__(self, policy: PositionPolicy, shared: dict):
        super().__init__()
        self.policy = policy
        self.shared = shared  # per-step values every layer reuses (the decode rotation matrices)
        self.seen = 0  # tokens of the stream this layer has processed
        self.base = 0  # frame offset of the stored window keys: key p sits at position p - base
        self.pending: dict[str, Any] | None = None
        self.positions: torch.Tensor | None = None  # stream position of every stored slot, -1 = empty
        self.rotary: RotaryParams | None = None  # the layer's RoPE, recorded by the attention function

    stores_raw_keys = False
    sliding: int | None = None  # W where the layer keeps a ring of its last W tokens only (RingLayer)

    @property
    def layout(self) -> tuple[int, int]:
        """(sink slots, ring slots): the tokens kept for ever, and the ring of recent ones (`ring_layout`)."""
        return ring_layout(self.policy.n_sink, self.policy.window_size, self.sliding)

    # -- transformers' CacheLayerMixin contract ------------------------------------------------------
    def update(self, key_states, value_states, cache_kwargs=None):
        """Record the step's new keys/values; the attention function consumes them (see attention.py)."""
        if not self.is_initialized:
            self.begun_under_autocast = torch.is_autocast_enabled(key_states.device.type)
            if self.begun_under_autocast:  # one dtype for both (`_held_dtype`)
                dtype = torch.promote_types(key_states.dtype, value_states.dtype)
                key_states, value_states = key_states.to(dtype), value_states.to(dtype)
            self.lazy_initialization(key_states, value_states)
        elif written_outside_inference_mode(self.values):
            self.leave_inference_mode()
        if key_states.shape[0] != self.values.shape[0]:
            raise ValueError(
                f"this cache holds a batch of {self.values.shape[0]} streams; got {key_states.shape[0]} (a stream "
                "goes on with its batch size: generate() with num_return_sequences or num_beams > 1 multiplies it; "
                "reset the cache for a new batch)"
            )
        held_dtype = self.values.dtype
        if key_states.dtype is not held_dtype or value_states.dtype is not held_dtype:  # (dtypes are singletons)
            key_states, value_states = self._held_dtype(key_states, value_states)
        held = (self.values.shape[1], self.values.shape[-1], self.values.dtype, self.values.device)
        if (key_states.shape[1], value_states.shape[-1], value_states.dtype, value_states.device) != held:
            raise ValueError(  # another model (heads, head size) or the same one moved to another dtype or device
                f"this cache holds keys of another shape, dtype or device ({held[0]} kv heads of size {held[1]}, "
                f"{held[2]}, {held[3]}); got {key_states.shape[1]} of size {value_states.shape[-1]}, "
                f"{value_states.dtype}, {value_states.device}: reset it, or make a new one for this model"
            )
        cache_kwargs = cache_kwargs or {}  # no cos/sin: no RoPE here, or the attention function rebuilds them
        self.pending = {"keys": key_states, "values": value_states, "cos": cache_kwargs.get("cos"),
                        "sin": cache_kwargs.get("sin")}
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    begun_under_autocast = False

    def _held_dtype(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's keys and values in the dtype the layer holds, where torch.autocast made them differ from it: its
        projections come out in autocast's dtype, and a model that rotates keys with angles in its own dtype (Llama)
        turns them back, so a step's keys and values differ from each other and from a stream begun outside it (refused
        as keys of "another dtype": "make a new one for this model"). Under autocast they are cast to the held dtype
        (the attention computes in autocast's all the same); a layer begun under it that held them in autocast's dtype
        (no RoPE: SmolLM3's every fourth) takes the model's wider one after it, as torch.cat would. Anything else is
        left to update's refusal (a model cast after the stream began)."""
        dtype = self.values.dtype
        if torch.is_autocast_enabled(key_states.device.type):
            return key_states.to(dtype), value_states.to(dtype)
        if (self.begun_under_autocast and key_states.dtype == value_states.dtype
                and torch.promote_types(dtype, key_states.dtype) == key_states.dtype):
            for name, held in list(vars(self).items()):
                if isinstance(held, torch.Tensor) and held.is_floating_point():
                    setattr(self, name, held.to(key_states.dtype))
            self.dtype = key_states.dtype
        return key_states, value_states

    def leave_inference_mode(self) -> None:
        """Go on outside torch.inference_mode() with a stream begun inside it: the held tensors were inference
        tensors, which may not be written in place outside that mode; the layer holds normal copies instead."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor) and value.is_inference():
                setattr(self, name, value.clone())

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_cache_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1  # unbounded stream; the kept length is bounded by `capacity`

    @property
    def max_batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def max_cache_len(self) -> int:
        return self.policy.capacity

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.seen = self.base = 0
        self.pending = None

    # generate() strategies that rearrange or take back cached tokens. Beam search reorders rows; speculative
    # decoding (assistant_model=, prompt_lookup_num_tokens=) crops the draft tokens the model rejected, but by
    # then the block has evicted the tokens a crop would have to bring back. Refused here, in words, rather
    # than with an AttributeError from inside transformers.
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a streaming cache")

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a streaming cache cannot be cropped (a block may already have evicted the tokens a crop would bring back), so "
            "speculative decoding (assistant_model=, prompt_lookup_num_tokens=) is not supported with it"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a streaming cache cannot repeat its batch rows: give generate() the full batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a streaming cache cannot select batch rows: start a new cache for the subset")

    # -- what every storage provides --------------------------------------------------------------------
    def held_mask(self) -> torch.Tensor:
        """Which stored slots hold a kept token: the sinks and the last window_size tokens (the keys the next token
        attends to besides its own)."""
        return self._held(self.positions)

    def _held(self, positions: torch.Tensor) -> torch.Tensor:
        n_sink, ring = self.layout
        return (positions >= 0) & ((positions < n_sink) | (positions > self.seen - ring))

    def get_cache_length(self) -> int:
        """Tokens held now (<= capacity after every step)."""
        return 0 if self.positions is None else int(self.held_mask().sum())

    def held_blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(keys, values, positions) blocks in their stored frame; empty slots have position -1."""
        raise NotImplementedError

    def store(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Write a step's new tokens (keys in the stored frame) and drop what the window no longer holds."""
        raise NotImplementedError

    def shift_window_keys(self, delta: int, rotary: RotaryParams) -> None:
        """Rotate every stored window key (position >= n_sink) by `delta` positions."""
        raise NotImplementedError

    # -- streaming attention ----------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, rotary: RotaryParams, scaling: float,
               softcap: float | None = None, sliding_window: int | None = None,
               s_aux: torch.Tensor | None = None) -> torch.Tensor:
        """Streaming attention of this step's queries over the kept and the new keys, then eviction.

        query: [batch, heads, n, head_dim] as rotated by the model; returns [batch, heads, n, head_dim].
        `softcap` (Gemma 2): scaled scores pass through softcap * tanh(score / softcap) before the softmax.
        `sliding_window`: the layer's own window, as prepare_model recorded it (`visible_in_layer`).
        `s_aux` (GPT-OSS): a learned logit per query head that joins every softmax (`softmax_with_sink_logits`).
        """
        step, self.pending = self.pending, None
        if step["sin"] is None or rotary.is_identity(step["sin"]):  # no RoPE, or position 0 (the wrapper's) unscaled
            query_raw, keys_raw = query, step["keys"]
        else:
            query_raw = rotary.unrotate(query, step["cos"], step["sin"])
            keys_raw = rotary.unrotate(step["keys"], step["cos"], step["sin"])
        # A long block (a whole prompt from generate()) in pieces, each stored before the next and the frame moved
        # between them, as if fed one after the other (exact: SEMANTICS.md §5): positions stay within ~3C, not C + n,
        # and a piece's scores are bounded, not quadratic in n.
        n, piece = query.shape[-2], min(self.policy.capacity + 1, BLOCK_PIECE)
        outputs = []
        for start in range(0, n, piece):
            rows = slice(start, min(start + piece, n))
            query_piece, values = query_raw[:, :, rows], step["values"][:, :, rows]
            output, stored_keys, new_positions = self.attend_block(
                query_piece, keys_raw[:, :, rows], values, rotary, scaling, softcap,
                self.hiding_window(sliding_window, query_piece), s_aux)
            self.store(stored_keys, values, new_positions)
            self.seen += query_piece.shape[-2]
            self.advance_frame(rotary)
            outputs.append(output)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-2)

    def hiding_window(self, sliding_window: int | None, query: torch.Tensor) -> int | None:
        """The layer's sliding window where it hides a key from one of this step's queries, else None (and the
        step is computed exactly as for a layer without one)."""
        return sliding_window if self.policy.window_hides(sliding_window, self.seen + query.shape[-2] - 1) else None

    def attend_block(self, query_raw, keys_raw, values, rotary: RotaryParams, scaling: float,
                     softcap: float | None = None, sliding_window: int | None = None,
                     s_aux: torch.Tensor | None = None):
        """The general path: any number of new tokens, positions and visibility from SEMANTICS.md (within the
        layer's `sliding_window`, given where it hides a key).

        Returns (output [b, heads, n, d], new keys in the stored frame, their stream positions).
        """
        policy = self.policy
        n = query_raw.shape[-2]
        new_positions = torch.arange(self.seen, self.seen + n, device=query_raw.device)
        base = policy.step_base(self.seen + n - 1) if self.stores_raw_keys else self.base

        new_keys = rotary.rotate(keys_raw, policy.key_frame(new_positions, base))
        sink_frame, window_frame = policy.query_frames(new_positions, base)
        query_window = rotary.rotate(query_raw, window_frame)
        query_sink = rotary.rotate(query_raw, sink_frame) if policy.mode != "absolute" else query_window

        blocks = self.held_blocks() + [(new_keys, values, new_positions)]
        positions = torch.cat([p for _, _, p in blocks])
        keys = torch.cat([k for k, _, _ in blocks], dim=-2)
        if self.stores_raw_keys:  # only the held part is raw; the new keys were rotated above
            held = positions.shape[0] - n
            keys = torch.cat([rotary.rotate(keys[:, :, :held], policy.key_frame(positions[:held], base)), new_keys], dim=-2)
        all_values = torch.cat([v for _, v, _ in blocks], dim=-2)

        if (softcap is None and sliding_window is None and s_aux is None
                and _can_use_fused_cpu_attention(query_raw, new_positions, policy)):
            output = self._fused_block_attention(query_window, query_sink, keys, all_values, positions, new_positions, scaling)
            return output, (keys_raw if self.stores_raw_keys else new_keys), new_positions

        groups = query_raw.shape[1] // keys_raw.shape[1]
        scores = grouped_scores(query_window, keys)  # [b, kv_heads, groups * n, keys]
        if policy.n_sink > 0 and policy.mode != "absolute":
            # Sink columns (at most n_sink of them) take the query at its sink position instead.
            sink_columns = torch.nonzero((positions >= 0) & (positions < policy.n_sink)).squeeze(1)
            if sink_columns.numel():
                scores[..., sink_columns] = grouped_scores(query_sink, keys[:, :, sink_columns])
        bias = self._visibility_bias(new_positions, positions, groups, scores.dtype, sliding_window=sliding_window)
        scores = cap_scores(scores * scaling, softcap) + bias
        probabilities = softmax_with_sink_logits(scores, s_aux).to(query_raw.dtype)
        output = grouped_output(probabilities, all_values, query_raw.shape[1])
        return output, (keys_raw if self.stores_raw_keys else new_keys), new_positions

    def _fused_block_attention(self, query_window, query_sink, keys, values, positions, new_positions, scaling):
        """The block path through the fused CPU flash-attention kernel (about half the time of the explicit
        softmax). The kernel takes one query per row, so it scores the window keys only and returns their
        log-sum-exp; the few sink columns, which need the query at its sink position, are scored apart and
        merged into the same softmax through that log-sum-exp."""
        policy = self.policy
        groups = query_window.shape[1] // keys.shape[1]
        keys_all = keys.repeat_interleave(groups, dim=1)
        values_all = values.repeat_interleave(groups, dim=1)
        is_sink = (positions >= 0) & (positions < policy.n_sink)
        has_sinks = policy.mode != "absolute" and bool(is_sink.any())
        bias = self._visibility_bias(new_positions, positions, 1, query_window.dtype, exclude_sinks=has_sinks)
        output, log_sum_exp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query_window, keys_all, values_all, 0.0, False, attn_mask=bias, scale=scaling
        )
        if not has_sinks:
            return output
        # Every query of such a block sees every held sink (t >= n_sink), so the sink scores need no mask.
        sink_columns = torch.nonzero(is_sink).squeeze(1)
        sink_scores = (query_sink @ keys_all[:, :, sink_columns].transpose(-1, -2)).float() * scaling
        log_sum_exp = log_sum_exp.float()
        peak = torch.maximum(log_sum_exp, sink_scores.amax(dim=-1))
        window_weight = torch.exp(log_sum_exp - peak)[..., None]  # [b, heads, n, 1]
        sink_weights = torch.exp(sink_scores - peak[..., None])  # [b, heads, n, sinks]
        merged = window_weight * output.float() + sink_weights @ values_all[:, :, sink_columns].float()
        return (merged / (window_weight + sink_weights.sum(dim=-1, keepdim=True))).to(query_window.dtype)

    def _per_step(self, slot, key, compute):
        """compute(), once per forward pass and `key`: the first layer that asks stores it under `slot` in `shared`
        (cleared when layer 0 updates), the others with the same key reuse it."""
        cached = self.shared.get(slot)
        if cached is None or cached[0] != key:
            self.shared[slot] = cached = (key, compute())
        return cached[1]

    def _visibility_bias(self, query_positions, key_positions, groups: int, dtype: torch.dtype,
                         exclude_sinks: bool = False, sliding_window: int | None = None) -> torch.Tensor:
        """0 where a query sees a key, -inf elsewhere, [groups * n, keys] (sink columns hidden with
        `exclude_sinks`); every layer of one layout holds its tokens at the same positions, so the first layer of a
        forward pass builds it and the others with the same sliding window and layout reuse it (a sliding ring,
        RingLayer.sliding, is a layout of its own)."""
        def compute():
            mask = visible_in_layer(self.policy, query_positions, key_positions, sliding_window)
            if exclude_sinks:
                mask &= (key_positions >= self.policy.n_sink)[None, :]
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            return bias.repeat(groups, 1)

        key = (self.seen, query_positions.shape[0], key_positions.shape[0], groups, dtype, exclude_sinks)
        return self._per_step(("bias", sliding_window, self.sliding), key, compute)

    def advance_frame(self, rotary: RotaryParams) -> None:
        """After a step, move the stored window keys to the policy's frame (see PositionPolicy.next_base)."""
        if self.stores_raw_keys:
            return
        new_base = self.policy.next_base(self.base, self.seen)
        if new_base != self.base:
            self.shift_window_keys(self.base - new_base, rotary)
            self.base = new_base

    def compress(self, rotary: RotaryParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept (keys, values, positions) in stream order, keys rotated at their cache slots 0..len-1."""
        keys, values, positions = (torch.cat(parts, dim=-2 if parts[0].ndim > 1 else 0) for parts in zip(*self.held_blocks()))
        held = self._held(positions)
        order = torch.argsort(torch.where(held, positions, torch.iinfo(torch.long).max))[: int(held.sum())]
        positions, keys, values = positions[order], keys[:, :, order], values[:, :, order]
        slots = torch.arange(positions.shape[0], device=positions.device)
        if self.stores_raw_keys:
            return rotary.rotate(keys, slots), values, positions
        stored_frame = self.policy.key_frame(positions, self.base)
        return rerotate_keys(keys, slots - stored_frame, rotary.inv_freq), values, positions


class RingLayer(StreamingLayer):
    """streaming_mode="ours": preallocated buffers, nothing copied or re-rotated per step.

    keys/values: [batch, kv_heads, n_sink + window_size + 1, head_dim]. Slots [0, n_sink) hold the sinks,
    slots [n_sink, ...) a ring where stream position p >= n_sink lives at n_sink + (p - n_sink) % (window_size + 1).
    The ring keeps one slot more than the window: a decode step writes its token over the one it
    evicts only at the next step, since token t still attends to t - window_size (eviction after
    attention). So token t's keys are exactly the filled prefix of the buffer and a decode step is one
    scaled_dot_product_attention call, as for a dense static cache (masked for a sliding layer whose window hides a
    held key; matmuls where the model soft-caps its scores or adds sink logits, which SDPA does not take).

    Window keys are stored rotated at p - base. Sinks are kept separately at their own index j
    (`sink_keys`); each decode step writes them, rotated by the offset between the query's window and
    sink positions, into the buffer's first slots.

    A layer with its own sliding window W <= window_size + 1 (Gemma 2 / 3's local layers at a large capacity, GPT-OSS's
    128-token layers: docs/semantics.md §8) never sees a sink, nor any key W or more tokens back, in any position
    mode. Such a layer (`sliding = W`) keeps a plain ring of W slots instead, position p in slot p % W, no sink slots:
    its memory and its decode step's work are those of W tokens, not capacity + 1.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Empty buffers of the stream's batch, heads, dtype and device (update's checks read them); they are sized at
        # the layer's first attention, where its sliding window is known (_allocate).
        batch, kv_heads, _, head_dim = key_states.shape
        self.adopt(key_states.new_zeros(batch, kv_heads, 0, head_dim),
                   value_states.new_zeros(batch, kv_heads, 0, value_states.shape[-1]),
                   key_states.new_zeros(batch, kv_heads, 0, head_dim))

    def _allocate(self, sliding_window: int | None) -> None:
        """The buffers, at the first attention: a ring of the layer's last `sliding_window` tokens where that window
        is at most window_size + 1 (`sliding_ring_size`), else sinks + a ring of window_size + 1."""
        batch, kv_heads, _, head_dim = self.keys.shape
        sliding = sliding_ring_size(self.policy.window_size, sliding_window)
        sinks, ring = ring_layout(self.policy.n_sink, self.policy.window_size, sliding_window)
        self.adopt(self.keys.new_zeros(batch, kv_heads, sinks + ring, head_dim),
                   self.values.new_zeros(batch, kv_heads, sinks + ring, self.values.shape[-1]),
                   self.keys.new_zeros(batch, kv_heads, sinks, head_dim), sliding)

    def adopt(self, keys: torch.Tensor, values: torch.Tensor, sink_keys: torch.Tensor, sliding: int | None = None) -> None:
        """Hold these buffers, empty: keys/values [batch, kv_heads, capacity + 1, d], sink_keys [batch, kv_heads,
        n_sink, d] (with `sliding` = W: keys/values [batch, kv_heads, W, d], sink_keys [batch, kv_heads, 0, d]).
        Allocated at the first attention, or given by FastStreamingWrapper (its static decode step writes them too)."""
        self.keys, self.values, self.sink_keys, self.sliding = keys, values, sink_keys, sliding
        self.dtype, self.device = keys.dtype, keys.device
        with made_as(keys):
            self.positions = torch.full((keys.shape[-2],), -1, dtype=torch.long, device=keys.device)
        self.is_initialized = True

    def resume(self, seen: int, base: int) -> None:
        """Take up a stream whose tokens were written into the buffers by someone else (the static decode step):
        `seen` tokens so far, window keys stored at p - base. Rebuilds the slot positions from `seen`, a tensor of the
        buffers' kind (made_as)."""
        n_sink, ring = self.layout
        with made_as(self.keys):
            sinks = torch.arange(n_sink, device=self.device)
            offsets = torch.arange(ring, device=self.device)
            ring_seen = seen - n_sink  # tokens that went to the ring so far; the latest one of each slot is held
            latest = n_sink + offsets + ring * torch.div(ring_seen - 1 - offsets, ring, rounding_mode="floor")
            self.positions = torch.cat([torch.where(sinks < seen, sinks, -1), torch.where(offsets < ring_seen, latest, -1)])
        self.seen, self.base = seen, base

    def held_blocks(self):
        n_sink, _ = self.layout
        held_sinks = min(n_sink, self.seen)
        return [
            (self.sink_keys[:, :, :held_sinks], self.values[:, :, :held_sinks], self.positions[:held_sinks]),
            (self.keys[:, :, n_sink:], self.values[:, :, n_sink:], self.positions[n_sink:]),
        ]

    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        n_sink, ring = self.layout
        return torch.where(positions < n_sink, positions, n_sink + (positions - n_sink) % ring)

    def store(self, keys, values, positions):
        n_sink, ring = self.layout
        last = self.seen + positions.shape[0]
        keep = (positions < n_sink) | (positions >= last - ring)
        positions, keys, values = positions[keep], keys[:, :, keep], values[:, :, keep]
        slots = self._slots(positions)
        self.keys.index_copy_(2, slots, keys)
        self.values.index_copy_(2, slots, values)
        self.positions.index_copy_(0, slots, positions)
        is_sink = positions < n_sink
        if bool(is_sink.any()):
            self.sink_keys.index_copy_(2, positions[is_sink], keys[:, :, is_sink])

    def shift_window_keys(self, delta, rotary):
        # A sliding ring shifts its every slot: a sink j it still holds sits at j, not j - base, but the frame first
        # moves after token C, when no sink is within its window (t - j >= window_size + 1 >= W).
        window = self.keys[:, :, self.layout[0] :]
        window.copy_(rerotate_keys(window, delta, rotary.inv_freq))

    def attend(self, query, rotary, scaling, softcap=None, sliding_window=None, s_aux=None):
        if self.keys.shape[-2] == 0:
            self._allocate(sliding_window)
        if query.shape[-2] != 1:
            return super().attend(query, rotary, scaling, softcap, sliding_window, s_aux)
        # A sliding ring holds exactly the keys its token sees: no mask.
        hiding = None if self.sliding else self.hiding_window(sliding_window, query)
        return self._decode_step(query, rotary, scaling, hiding, softcap, s_aux)

    def _decode_step(self, query: torch.Tensor, rotary: RotaryParams, scaling: float,
                     sliding_window: int | None = None, softcap: float | None = None,
                     s_aux: torch.Tensor | None = None) -> torch.Tensor:
        """One token: rotate q, k (one matmul each), write k/v into its slot, one SDPA over the buffer (masked by
        the layer's sliding window, given where it hides a key); with soft-capping or sink logits, which SDPA does
        not apply, the same attention as matmuls over the buffer."""
        step, self.pending = self.pending, None
        t = self.seen
        (n_sink, ring), slots = self.layout, self.keys.shape[-2]
        to_window_frame, sinks_to_window = self._decode_rotations(step, rotary, query.dtype)
        keys = step["keys"] @ to_window_frame
        query = query @ to_window_frame
        slot = t if t < n_sink else n_sink + (t - n_sink) % ring
        self.keys[:, :, slot] = keys[:, :, 0]
        self.values[:, :, slot] = step["values"][:, :, 0]
        self.positions[slot] = t
        held_sinks = min(n_sink, t + 1)
        if t < n_sink:
            self.sink_keys[:, :, t] = keys[:, :, 0]
        if held_sinks and sinks_to_window is not None:
            self.keys[:, :, :held_sinks] = self.sink_keys[:, :, :held_sinks] @ sinks_to_window
        elif held_sinks:
            self.keys[:, :, :held_sinks] = self.sink_keys[:, :, :held_sinks]
        filled = min(t + 1, slots)
        keys, values, mask = self.keys[:, :, :filled], self.values[:, :, :filled], None
        if sliding_window is not None:
            mask = self._window_mask(sliding_window, filled)
        if softcap is None and s_aux is None:
            output = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                                                      scale=scaling, enable_gqa=True)
        else:
            output = grouped_attention(query, keys, values, scaling, mask, softcap, s_aux)
        self.seen += 1
        self.advance_frame(rotary)
        return output

    def _window_mask(self, sliding_window: int, filled: int) -> torch.Tensor:
        """Boolean [1, filled]: which of the buffer's filled slots (every one holds a key of SEMANTICS.md §1 for
        this token) a layer with this sliding window sees; once per step and window, shared by the layers."""

        def compute():
            query = torch.tensor([self.seen], device=self.positions.device)
            return self.policy.distances(query, self.positions[:filled]) < sliding_window

        return self._per_step(("window_mask", sliding_window), self.seen, compute)

    def _decode_rotations(self, step, rotary: RotaryParams, dtype: torch.dtype):
        """Per-step [head_dim, head_dim] matrices, computed by the first layer of each forward pass (the
        cache clears `shared` when layer 0 updates) and reused by the rest:
        the model's rotation undone and the window frame t - base applied (for q and the new k; [d, d], or
        [batch, 1, d, d] where the model rotated them), and
        the sink keys' move from position j to j + (window frame - sink frame). One pair per RoPE (Gemma 3's
        sliding and full-attention layers rotate with different frequencies)."""
        t, base = self.seen, self.base

        def compute():
            head_dim = step["keys"].shape[-1]
            position = torch.tensor([t], device=step["keys"].device)
            sink_frame, window_frame = self.policy.query_frames(position, base)
            cos, sin = rotary.angles(window_frame)
            to_window = rotation_matrix(cos[0], sin[0], head_dim)
            model_sin = None if step["sin"] is None else step["sin"][:, 0].float()  # [batch, rotary_ndims]
            if model_sin is not None and not rotary.is_identity(model_sin):
                # each row's own: callers may give the rows of a batch different positions (docs/semantics.md §7)
                scale = 1.0 / rotary.attention_scaling**2
                model_cos = step["cos"][:, 0].float()
                to_window = (rotation_matrix(model_cos * scale, -model_sin * scale, head_dim) @ to_window)[:, None]
            offset = int(window_frame[0] - sink_frame[0])
            sinks_to_window = None
            if offset:
                cos, sin = cos_sin(torch.tensor([offset], device=position.device), rotary.inv_freq)
                sinks_to_window = rotation_matrix(cos[0], sin[0], head_dim).to(dtype)
            return to_window.to(dtype), sinks_to_window

        return self._per_step(("decode_rotations", id(rotary)), (t, base, dtype), compute)


class ContiguousLayer(StreamingLayer):
    """streaming_mode="mit": one tensor per layer in stream order, cut by StartRecentKVCache after
    every step (a copy of the kept cache per step, as MIT's code does). With pos_shift it also keeps
    MIT's key handling: keys stored un-rotated and rotated at their cache index on every step."""

    def __init__(self, policy: PositionPolicy, shared: dict):
        super().__init__(policy, shared)
        self.mit = StartRecentKVCache(policy.n_sink, policy.window_size, k_seq_dim=2, v_seq_dim=2)
        self.stores_raw_keys = policy.mode == "pos_shift"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def held_blocks(self):
        return [(self.keys, self.values, self.positions)]

    def store(self, keys, values, positions):
        ((self.keys, self.values),) = self.mit([(torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2))])
        all_positions = torch.cat([self.positions, positions])
        if all_positions.shape[0] > self.policy.capacity:
            all_positions = torch.cat([all_positions[: self.policy.n_sink], all_positions[-self.policy.window_size :]])
        self.positions = all_positions

    def shift_window_keys(self, delta, rotary):
        is_window = (self.positions >= self.policy.n_sink)[:, None]
        self.keys = torch.where(is_window, rerotate_keys(self.keys, delta, rotary.inv_freq), self.keys)


class StreamingKVCache(Cache):
    """Fixed-capacity KV cache: the first `n_sink` tokens plus the most recent `window_size` tokens.

    Hand it to a prepared model (`prepare_model(model)`) as `past_key_values`, in `model(...)` or
    `model.generate(...)`; the stream can run far past `cache_capacity`. `get_seq_length()` is the
    number of tokens seen (so generate() feeds only the new part of a growing conversation);
    `get_cache_length()` is the number held now.
    """

    def __init__(
        self,
        n_sink: int = 4,
        window_size: int = 1020,
        position_mode: str = "pos_shift",
        streaming_mode: str = "ours",
        num_layers: int | None = None,
    ):
        n_sink, window_size = validate_config(n_sink, window_size, position_mode, streaming_mode)
        if num_layers is not None:
            num_layers = check_int("num_layers", num_layers, 1, " (or None: grow with the model)")
        self.policy = PositionPolicy(position_mode, n_sink, window_size)
        self.n_sink, self.window_size = n_sink, window_size
        self.position_mode, self.streaming_mode = position_mode, streaming_mode
        self._shared: dict = {}
        self._warned_autograd = False
        # The deepest layer a forward pass has reached: the model's last one once a pass has run to its end (a cache
        # made for more layers, num_layers, keeps the rest empty).
        self._depth = -1
        layers = None if num_layers is None else [self._new_layer() for _ in range(num_layers)]
        super().__init__(layers=layers, layer_class_to_replicate=None if layers is not None else self._layer_factory())

    def _layer_factory(self) -> functools.partial:
        """What makes a layer of this cache: its layer class with the cache's policy and per-step values. Given to
        transformers as `layer_class_to_replicate` (a layer for each one the model reaches), it holds no reference to the
        cache: the bound method `self._new_layer` did, a reference cycle that left every dropped or reset() stream, its
        keys and values with it, to Python's cyclic garbage collector (40 streams of 4,094 tokens alive at once in a loop
        of StreamingLLMWrapper resets on the tiny Llama; on a GPU, memory the next stream could not have)."""
        layer_class = RingLayer if self.streaming_mode == "ours" else ContiguousLayer
        return functools.partial(layer_class, self.policy, self._shared)

    def _new_layer(self) -> StreamingLayer:
        return self._layer_factory()()

    def __repr__(self) -> str:
        return (
            f"StreamingKVCache(n_sink={self.n_sink}, window_size={self.window_size}, "
            f"position_mode={self.position_mode!r}, streaming_mode={self.streaming_mode!r}, "
            f"seen={self.get_seq_length()}, held={self.get_cache_length()})"
        )

    @property
    def cache_capacity(self) -> int:
        return self.n_sink + self.window_size

    @property
    def max_batch_size(self) -> int:
        """The number of streams held (0 before the first tokens; transformers' own property failed there)."""
        return next((layer.values.shape[0] for layer in self.layers if layer.is_initialized), 0)

    @property
    def max_cache_len(self) -> int:
        """The most tokens the cache holds: its capacity."""
        return self.cache_capacity

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx >= len(self.layers) and self.layer_class_to_replicate is None:
            raise ValueError(f"this cache was made for {len(self.layers)} layers (num_layers); the model has more: "
                             "leave num_layers out, or give the model's number of layers")
        if layer_idx == 0:  # a new forward pass: per-step values shared across layers are recomputed
            self._shared.clear()
            if key_states.requires_grad and not self._warned_autograd:
                self._warned_autograd = True
                warn_at_caller("StreamingKVCache is run with autograd on: the cache is for inference, no gradient "
                               "flows through its buffers (backward fails) and the autograd graph grows with the "
                               "stream; run the model under torch.no_grad() or torch.inference_mode()")
            # Passes run the layers in order: one that stopped part-way left the deepest layer behind the first.
            if self._depth > 0 and self.layers[self._depth].seen != self.layers[0].seen:
                raise stopped_pass_error(self.layers[0].seen, self.layers[self._depth].seen)
        elif layer_idx > self._depth and self.layers[0].seen > key_states.shape[-2]:
            # a layer no pass reached before, after the first pass: that pass stopped before this layer
            raise stopped_pass_error(self.layers[0].seen - key_states.shape[-2], 0)
        if layer_idx > self._depth:
            self._depth = layer_idx
        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        expect_streaming_attention(self, layer_idx)
        return keys, values

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        expect_streaming_mask(self, cache_position)  # the mask transformers builds next is this step's (attention.py)
        return super().get_mask_sizes(cache_position, layer_idx)

    def get_cache_length(self, layer_idx: int | None = None) -> int:
        """Number of tokens a layer holds now; without `layer_idx` the most any layer holds (a layer that keeps only
        its own sliding window holds fewer: `RingLayer.sliding`)."""
        layer_idx = self._fullest_layer() if layer_idx is None else layer_idx
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_cache_length()

    def _fullest_layer(self) -> int:
        """The first layer that holds the most tokens: the sinks and the window, not a sliding ring (0 without
        layers)."""
        return max(range(len(self.layers)), key=lambda index: self.layers[index].get_cache_length(), default=0)

    def compress(self, layer_idx: int = 0, rotary: RotaryParams | None = None):
        """The kept sink + recent (keys, values) of one layer, in stream order, keys at their cache slots (in the
        model's own feature order: interleaved rotary pairs as the model rotates them).

        Shapes [batch, kv_heads, held, head_dim]; `rotary` (the layer's RoPE, `describe(model).layer_rotaries[i]`)
        defaults to the one the layer's last step used.
        """
        if layer_idx >= len(self.layers) or self.layers[layer_idx].positions is None:
            raise ValueError(f"layer {layer_idx} of this cache holds nothing yet: feed tokens through it first")
        rotary = rotary or self.layers[layer_idx].rotary
        if rotary is None:
            raise ValueError("compress needs the layer's rotary parameters: pass rotary= "
                             "(describe(model).layer_rotaries[layer_idx])")
        keys, values, _ = self.layers[layer_idx].compress(rotary)
        return rotary.to_model_layout(keys), values

    def kept_positions(self, layer_idx: int | None = None) -> torch.Tensor:
        """Stream positions of the tokens a layer holds, in stream order; without `layer_idx`, of the first layer that
        holds the most (the sinks and the window: not a layer that keeps only its own sliding window)."""
        layer_idx = self._fullest_layer() if layer_idx is None else layer_idx
        if layer_idx >= len(self.layers) or self.layers[layer_idx].positions is None:
            return torch.zeros(0, dtype=torch.long)
        layer = self.layers[layer_idx]
        return torch.sort(layer.positions[layer.held_mask()]).values

    @property
    def is_compileable(self) -> bool:
        return False
