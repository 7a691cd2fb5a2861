"""StartRecentKVCache: the public form of MIT's cache (mit-han-lab/streaming-llm, kv_cache.py).

It works on a transformers-4.33-style `past_key_values`: a list, one entry per layer, of (keys, values)
tensors whose sequence dimension is `k_seq_dim` / `v_seq_dim`. Selected with streaming_mode="mit",
where the streaming cache hands its per-layer tensors to it after every step.
"""

from __future__ import annotations

import torch

from streaming_llm.checks import check_int

PastKeyValues = list[tuple[torch.Tensor, torch.Tensor]]
USE_STREAMING_CACHE = ("For a transformers Cache (what model(...) returns), and as past_key_values of model(...) or "
                       "model.generate(...), use StreamingKVCache(n_sink, window_size, streaming_mode='mit') on a "
                       "prepare_model(model)")


def _slice(x: torch.Tensor, dim: int, start: int, end: int | None) -> torch.Tensor:
    """x[start:end] along `dim`, clamped to its size as a Python slice is (MIT's code slices; fewer entries than
    start_size are all kept)."""
    size = x.size(dim)
    start, end = min(start, size), size if end is None else min(end, size)
    return x.narrow(dim, start, max(0, end - start))


class StartRecentKVCache:
    """Keep the first `start_size` and the last `recent_size` entries of every layer's keys and values."""

    def __init__(self, start_size: int = 4, recent_size: int = 512, k_seq_dim: int = 2, v_seq_dim: int = 2):
        self.start_size = check_int("start_size", start_size, 0)
        self.recent_size = check_int("recent_size", recent_size, 1)
        self.cache_size = self.start_size + self.recent_size
        self.k_seq_dim = check_int("k_seq_dim", k_seq_dim, 0)
        self.v_seq_dim = check_int("v_seq_dim", v_seq_dim, 0)

    # What transformers asks first of the past_key_values it is given (model(...) and generate() alike): this is no
    # Cache, and it says so rather than with an AttributeError from inside transformers.
    def get_seq_length(self, *args, **kwargs):
        raise TypeError(f"StartRecentKVCache is MIT's eviction policy for a list of (keys, values), not a transformers "
                        f"Cache. {USE_STREAMING_CACHE}")

    get_mask_sizes = get_seq_length

    def _seq_len(self, past: PastKeyValues) -> int:
        """The entries every layer holds; TypeError for a past of another form (a transformers Cache), ValueError when
        keys and values (or layers) disagree."""
        if not isinstance(past, (list, tuple)) or not all(isinstance(layer, (list, tuple)) and len(layer) == 2
                                                          for layer in past):
            raise TypeError(f"past_key_values must be a list of (keys, values) per layer, as transformers 4.33 returned "
                            f"it; got {type(past).__name__}. {USE_STREAMING_CACHE}")
        lengths = {(k.size(self.k_seq_dim), v.size(self.v_seq_dim)) for k, v in past}
        if len(lengths) != 1 or len(set(next(iter(lengths)))) != 1:
            raise ValueError(f"past_key_values must hold as many keys as values in every layer (along k_seq_dim="
                             f"{self.k_seq_dim}, v_seq_dim={self.v_seq_dim}); got (keys, values) lengths {sorted(lengths)}")
        return next(iter(lengths))[0]

    def _keep(self, past: PastKeyValues, recent_from_end: int) -> PastKeyValues:
        """Concatenate [0, start_size) with the `recent_from_end` last entries of every layer."""
        kept = []
        for k, v in past:
            seq_len = k.size(self.k_seq_dim)
            k_kept = torch.cat(
                [_slice(k, self.k_seq_dim, 0, self.start_size), _slice(k, self.k_seq_dim, seq_len - recent_from_end, None)],
                dim=self.k_seq_dim,
            )
            v_kept = torch.cat(
                [_slice(v, self.v_seq_dim, 0, self.start_size), _slice(v, self.v_seq_dim, seq_len - recent_from_end, None)],
                dim=self.v_seq_dim,
            )
            kept.append((k_kept, v_kept))
        return kept

    def __call__(self, past: PastKeyValues | None) -> PastKeyValues | None:
        """Cut every layer to start + recent entries (a no-op while it still fits)."""
        if past is None:
            return None
        if self._seq_len(past) <= self.cache_size:
            return past
        return self._keep(past, self.recent_size)

    def evict_for_space(self, past: PastKeyValues | None, num_coming: int) -> PastKeyValues | None:
        """Evict before a step so that `num_coming` new entries fit within start + recent."""
        num_coming = check_int("num_coming", num_coming, 0)
        if past is None:
            return None
        seq_len = self._seq_len(past)
        if seq_len + num_coming <= self.cache_size:
            return past
        return self._keep(past, max(0, self.recent_size - num_coming))

    def evict_range(self, past: PastKeyValues | None, start: int, end: int) -> PastKeyValues | None:
        """Drop entries [start, end) of every layer."""
        if past is None:
            return None
        seq_len = self._seq_len(past)
        if not 0 <= start <= end <= seq_len:
            raise ValueError(f"evict_range needs 0 <= start <= end <= {seq_len}, got start={start}, end={end}")
        return [
            (
                torch.cat([_slice(k, self.k_seq_dim, 0, start), _slice(k, self.k_seq_dim, end, None)], dim=self.k_seq_dim),
                torch.cat([_slice(v, self.v_seq_dim, 0, start), _slice(v, self.v_seq_dim, end, None)], dim=self.v_seq_dim),
            )
            for k, v in past
        ]
