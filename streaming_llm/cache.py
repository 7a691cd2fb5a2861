"""StreamingKVCache: attention sinks + a recent window, behind transformers' `Cache` contract.

One `StreamingLayer` per model layer holds that layer's kept keys and values; `StreamingKVCache`
holds the layers. The model's attention code calls `cache.update(...)` as it does for any cache;
the attention itself runs in `streaming_llm.attention` (registered as the attention implementation
"streaming_llm" by `prepare_model`), which asks the layer to `attend` and then to evict.

Keys arrive rotated at whatever positions the caller used (the wrapper passes position 0, generate()
passes stream positions); the layer undoes that rotation with the very cos/sin the model used and
applies the positions of SEMANTICS.md itself, so the caller's positions never matter.

Storage, streaming_mode="ours": a sink buffer [batch, kv_heads, n_sink, head_dim] and a ring buffer
[batch, kv_heads, window_size, head_dim] preallocated on first use; a token at stream position
p >= n_sink lives in ring slot (p - n_sink) % window_size, so a step writes only its new tokens and
never copies the kept ones. streaming_mode="mit": one tensor per layer in stream order, cut after
every step by `StartRecentKVCache`, as MIT's code does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from streaming_llm.mit_cache import StartRecentKVCache
from streaming_llm.positions import POSITION_MODES, PositionPolicy, visible
from streaming_llm.rope import RotaryParams, rerotate_keys

STREAMING_MODES = ("ours", "mit")


def validate_config(n_sink: int, window_size: int, position_mode: str, streaming_mode: str) -> None:
    """Raise ValueError with the reason for any configuration SEMANTICS.md does not define."""
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an integer >= 0, got {n_sink!r}")
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an integer >= 1, got {window_size!r}")
    if position_mode not in POSITION_MODES:
        raise ValueError(f"position_mode must be one of {', '.join(POSITION_MODES)}; got {position_mode!r}")
    if streaming_mode not in STREAMING_MODES:
        raise ValueError(f"streaming_mode must be one of {', '.join(STREAMING_MODES)}; got {streaming_mode!r}")


class StreamingLayer(CacheLayerMixin):
    """One layer's kept keys/values and the streaming attention over them."""

    def __init__(self, policy: PositionPolicy, streaming_mode: str):
        super().__init__()
        self.policy = policy
        self.streaming_mode = streaming_mode
        self.seen = 0  # tokens of the stream this layer has processed
        self.base = 0  # frame offset of the stored window keys (rerotate mode)
        self.pending: dict[str, Any] | None = None
        self.positions: torch.Tensor | None = None  # stream position of every stored slot, -1 = empty
        if streaming_mode == "mit":
            self.mit = StartRecentKVCache(policy.n_sink, policy.window_size, k_seq_dim=2, v_seq_dim=2)

    # -- transformers' CacheLayerMixin contract ------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.streaming_mode == "ours":
            slots = self.policy.capacity
            self.keys = key_states.new_zeros(batch, kv_heads, slots, head_dim)
            self.values = value_states.new_zeros(batch, kv_heads, slots, value_states.shape[-1])
            self.positions = torch.full((slots,), -1, dtype=torch.long, device=self.device)
        else:
            self.keys = key_states[:, :, :0]
            self.values = value_states[:, :, :0]
            self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None):
        """Record the step's new keys/values; the attention function consumes them (see attention.py)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"this cache holds a batch of {self.keys.shape[0]} streams; got {key_states.shape[0]} (call reset())"
            )
        cache_kwargs = cache_kwargs or {}
        if "cos" not in cache_kwargs or "sin" not in cache_kwargs:
            raise ValueError("StreamingKVCache needs the rotary cos/sin in cache_kwargs (RoPE models only)")
        self.pending = {"keys": key_states, "values": value_states, "cos": cache_kwargs["cos"], "sin": cache_kwargs["sin"]}
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_cache_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1  # unbounded stream; the kept length is bounded by `capacity`

    @property
    def max_batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def max_cache_len(self) -> int:
        return self.policy.capacity

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.is_initialized = False
        self.seen = self.base = 0
        self.pending = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))
            self.values = self.values.index_select(0, beam_idx.to(self.values.device))

    # -- streaming ------------------------------------------------------------------------------------
    def get_cache_length(self) -> int:
        """Tokens held now (<= capacity after every step)."""
        if self.positions is None:
            return 0
        return int((self.positions >= 0).sum())

    def attend(self, query: torch.Tensor, rotary: RotaryParams, scaling: float) -> torch.Tensor:
        """Streaming attention of this step's queries over the kept and the new keys, then eviction.

        query: [batch, heads, n, head_dim] as rotated by the model; returns [batch, heads, n, head_dim].
        """
        step = self.pending
        self.pending = None
        policy = self.policy
        n = query.shape[-2]
        groups = query.shape[1] // step["keys"].shape[1]
        new_positions = torch.arange(self.seen, self.seen + n, device=query.device)
        base = self.base if policy.mode == "rerotate" else policy.step_base(self.seen + n - 1)

        query_raw = rotary.unrotate(query, step["cos"], step["sin"])
        keys_raw = rotary.unrotate(step["keys"], step["cos"], step["sin"])
        new_keys = keys_raw if policy.stores_raw_keys else rotary.rotate(keys_raw, policy.key_frame(new_positions, base))

        sink_frame, window_frame = policy.query_frames(new_positions, base)
        query_window = rotary.rotate(query_raw, window_frame)
        query_sink = rotary.rotate(query_raw, sink_frame) if policy.mode != "absolute" else query_window

        blocks = [(self.keys, self.values, self.positions), (new_keys, step["values"], new_positions)]
        scores, values = [], []
        for keys, block_values, positions in blocks:
            if keys.shape[-2] == 0:
                continue
            if policy.stores_raw_keys:
                keys = rotary.rotate(keys, policy.key_frame(positions, base))
            block_scores = _grouped_scores(query_window, keys)
            if policy.n_sink > 0 and policy.mode != "absolute":
                is_sink = positions < policy.n_sink
                if bool(is_sink.any()):
                    block_scores = torch.where(is_sink, _grouped_scores(query_sink, keys), block_scores)
            mask = visible(new_positions, positions, policy.n_sink, policy.window_size).repeat(groups, 1)
            scores.append(block_scores.masked_fill(~mask, float("-inf")))
            values.append(block_values)
        probabilities = torch.softmax(torch.cat(scores, dim=-1).float() * scaling, dim=-1).to(query.dtype)
        output = _grouped_output(probabilities, values, query.shape[1])

        self._store(new_keys, step["values"], new_positions, rotary)
        return output

    def _store(self, new_keys: torch.Tensor, new_values: torch.Tensor, new_positions: torch.Tensor, rotary: RotaryParams):
        """Keep the first n_sink and the most recent window_size tokens (eviction after attention)."""
        policy = self.policy
        self.seen += new_keys.shape[-2]
        if self.streaming_mode == "ours":
            keep = (new_positions < policy.n_sink) | (new_positions >= self.seen - policy.window_size)
            positions = new_positions[keep]
            slots = torch.where(
                positions < policy.n_sink, positions, policy.n_sink + (positions - policy.n_sink) % policy.window_size
            )
            self.keys.index_copy_(2, slots, new_keys[:, :, keep])
            self.values.index_copy_(2, slots, new_values[:, :, keep])
            self.positions.index_copy_(0, slots, positions)
        else:
            (self.keys, self.values), = self.mit([(torch.cat([self.keys, new_keys], 2), torch.cat([self.values, new_values], 2))])
            all_positions = torch.cat([self.positions, new_positions])
            self.positions = all_positions if all_positions.shape[0] <= policy.capacity else torch.cat(
                [all_positions[: policy.n_sink], all_positions[-policy.window_size :]]
            )
        if policy.mode == "rerotate":
            new_base = policy.kept_base(self.seen)
            if new_base != self.base:
                is_window = self.positions >= policy.n_sink
                moved = rerotate_keys(self.keys, self.base - new_base, rotary.inv_freq)
                self.keys = torch.where(is_window[:, None], moved, self.keys)
                self.base = new_base

    def compress(self, rotary: RotaryParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kept (keys, values, positions) in stream order, keys rotated at their cache slots 0..len-1."""
        held = self.positions >= 0
        order = torch.argsort(torch.where(held, self.positions, torch.iinfo(torch.long).max))[: int(held.sum())]
        positions = self.positions[order]
        keys, values = self.keys[:, :, order], self.values[:, :, order]
        slots = torch.arange(positions.shape[0], device=positions.device)
        if self.policy.stores_raw_keys:
            keys = rotary.rotate(keys, slots)
        else:
            stored_frame = self.policy.key_frame(positions, self.base)
            keys = rerotate_keys(keys, slots - stored_frame, rotary.inv_freq)
        return keys, values, positions


def _grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q·k for grouped-query attention without repeating keys.

    query [b, heads, n, d], keys [b, kv_heads, m, d] -> [b, kv_heads, groups * n, m]; query head i
    uses kv head i // groups, as transformers' repeat_kv does.
    """
    batch, heads, n, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, (heads // kv_heads) * n, dim)
    return grouped @ keys.transpose(-1, -2)


def _grouped_output(probabilities: torch.Tensor, values: list[torch.Tensor], heads: int) -> torch.Tensor:
    """Sum over key blocks of P_block @ V_block, back to [b, heads, n, d]."""
    output, start = None, 0
    for block_values in values:
        width = block_values.shape[-2]
        part = probabilities[..., start : start + width] @ block_values
        output = part if output is None else output + part
        start += width
    batch, kv_heads, grouped_n, dim = output.shape
    return output.reshape(batch, heads, grouped_n * kv_heads // heads, dim)


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
        validate_config(n_sink, window_size, position_mode, streaming_mode)
        self.policy = PositionPolicy(position_mode, n_sink, window_size)
        self.n_sink, self.window_size = n_sink, window_size
        self.position_mode, self.streaming_mode = position_mode, streaming_mode
        layers = None if num_layers is None else [self._new_layer() for _ in range(num_layers)]
        super().__init__(layers=layers, layer_class_to_replicate=None if layers is not None else self._new_layer)

    def _new_layer(self) -> StreamingLayer:
        return StreamingLayer(self.policy, self.streaming_mode)

    def __repr__(self) -> str:
        return (
            f"StreamingKVCache(n_sink={self.n_sink}, window_size={self.window_size}, "
            f"position_mode={self.position_mode!r}, streaming_mode={self.streaming_mode!r}, "
            f"seen={self.get_seq_length()}, held={self.get_cache_length()})"
        )

    @property
    def cache_capacity(self) -> int:
        return self.n_sink + self.window_size

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        from streaming_llm.attention import expect_streaming_attention

        keys, values = super().update(key_states, value_states, layer_idx, cache_kwargs)
        expect_streaming_attention(self, layer_idx)
        return keys, values

    def get_cache_length(self, layer_idx: int = 0) -> int:
        """Number of tokens the layer holds now."""
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[layer_idx].get_cache_length()

    def compress(self, layer_idx: int = 0, rotary: RotaryParams | None = None):
        """The kept sink + recent (keys, values) of one layer, in stream order, keys at their cache slots.

        Shapes [batch, kv_heads, held, head_dim]; `rotary` defaults to the one the last step used.
        """
        layer = self.layers[layer_idx]
        return layer.compress(rotary or self.rotary)[:2]

    def kept_positions(self, layer_idx: int = 0) -> torch.Tensor:
        """Stream positions of the held tokens, in stream order."""
        positions = self.layers[layer_idx].positions
        if positions is None:
            return torch.zeros(0, dtype=torch.long)
        return torch.sort(positions[positions >= 0]).values

    @property
    def is_compileable(self) -> bool:
        return False
