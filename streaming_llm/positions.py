"""The three position modes of SEMANTICS.md §2, each a small policy over one frame of reference.

Every mode places a kept key at a frame position phi(p) (p = its stream position) and gives each
query t two positions: psi_sink(t) for the sink keys and psi_window(t) for all other keys. Attention
scores then depend on the differences only:

- pos_shift / rerotate:  psi_window(t) - phi(p) = t - p                (true distance to window keys)
                         psi_sink(t)   - phi(j) = min(t, C) - j         (sinks sit at the cache start)
- absolute:              both differences are t - p (every key keeps its first position).

Sinks always sit at phi(j) = j. Window keys sit at phi(p) = p - base, where `base` is the frame
offset: 0 for absolute; for pos_shift and rerotate it is chosen so that positions stay within the
cache capacity however long the stream gets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

POSITION_MODES = ("pos_shift", "rerotate", "absolute")


@dataclass(frozen=True)
class PositionPolicy:
    """Which positions a step uses, and the frame offset of stored keys; mode is one of POSITION_MODES."""

    mode: str
    n_sink: int
    window_size: int

    @property
    def capacity(self) -> int:
        return self.n_sink + self.window_size

    def step_base(self, last_position: int) -> int:
        """Frame offset for a step whose newest token has stream position `last_position`, for keys
        rotated afresh every step (MIT's pos-shift): the newest query sits at slot min(t, C)."""
        if self.mode == "absolute":
            return 0
        return max(0, last_position - self.capacity)

    def kept_base(self, seen: int) -> int:
        """Offset that puts the kept window keys at their cache slots after `seen` tokens: the number
        of tokens evicted so far (the kept window starts at seen - window_size, slot n_sink)."""
        if self.mode == "absolute":
            return 0
        return max(0, seen - self.capacity)

    def next_base(self, base: int, seen: int) -> int:
        """Frame offset of stored (rotated) window keys after a step, given the current one.

        rerotate: every eviction moves the kept keys back to their cache slots (the seed's method).
        pos_shift: the same frame change, deferred until the newest position would pass 2 * capacity,
        so keys are re-rotated once per ~capacity tokens instead of every step; distances, and hence
        attention, are identical, and positions stay below 2 * capacity + 1.
        """
        if self.mode == "absolute":
            return 0
        if self.mode == "rerotate" or seen - base > 2 * self.capacity:
            return self.kept_base(seen)
        return base

    def key_frame(self, positions: torch.Tensor, base: int) -> torch.Tensor:
        """phi(p): sinks at their index, every other key at p - base."""
        return torch.where(positions < self.n_sink, positions, positions - base)

    def query_frames(self, positions: torch.Tensor, base: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(psi_sink(t), psi_window(t)) for query stream positions t."""
        if self.mode == "absolute":
            return positions, positions
        return positions.clamp(max=self.capacity), positions - base

    def distances(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """[n_query, n_key]: query position minus key position in this mode's positions (the distance RoPE sees),
        psi(t) - phi(p) in any frame: t - p, except from query t to sink j under pos_shift / rerotate: min(t, C) - j."""
        sink_frame, window_frame = self.query_frames(query_positions, 0)
        is_sink = (key_positions < self.n_sink)[None, :]
        return torch.where(is_sink, sink_frame[:, None], window_frame[:, None]) - self.key_frame(key_positions, 0)[None, :]

    def window_hides(self, sliding_window: int | None, last_position: int) -> bool:
        """Whether a layer with its own sliding window (it sees a key at distance < sliding_window, as transformers'
        sliding-window mask) hides any of the keys of SEMANTICS.md §1 from a query at stream position
        <= last_position. The farthest such key is at distance min(t, C) (sink 0, or the window's oldest key when
        there are no sinks), or t for a sink in absolute mode."""
        if sliding_window is None:
            return False
        farthest = last_position if self.mode == "absolute" and self.n_sink else min(last_position, self.capacity)
        return farthest >= sliding_window


def visible(query_positions: torch.Tensor, key_positions: torch.Tensor, n_sink: int, window_size: int) -> torch.Tensor:
    """Boolean [n_query, n_key]: which keys each query attends to (SEMANTICS.md §1).

    Query t sees sinks {j < n_sink, j <= t} and the window {max(n_sink, t - window_size) <= p <= t}.
    Key positions < 0 mark empty slots and are never visible.
    """
    t = query_positions[:, None]
    p = key_positions[None, :]
    causal = (p >= 0) & (p <= t)
    in_window = p >= torch.clamp(t - window_size, min=n_sink)
    return causal & ((p < n_sink) | in_window)


def visible_in_layer(policy: PositionPolicy, query_positions: torch.Tensor, key_positions: torch.Tensor,
                     sliding_window: int | None = None) -> torch.Tensor:
    """`visible`, for a layer that attends within its own sliding window (Gemma 2 and 3, Cohere 2, ...: the model
    hides keys at distance >= sliding_window from it): of those keys, the ones nearer than the window, distances
    taken in the mode's positions (docs/semantics.md)."""
    mask = visible(query_positions, key_positions, policy.n_sink, policy.window_size)
    if sliding_window is not None:
        mask &= policy.distances(query_positions, key_positions) < sliding_window
    return mask
