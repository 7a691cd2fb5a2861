"""Baselines of SEMANTICS.md §3 as steppers: dense, and sliding window with re-computation."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from streaming_llm.eval.perplexity import token_nlls


class DenseStepper:
    """The unmodified model with a growing DynamicCache (w = infinity): exact in blocks too."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        positions = torch.arange(self.seen, self.seen + n, device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        logits = self.model(input_ids, position_ids=positions, past_key_values=self.cache, use_cache=True).logits
        self.seen += n
        return logits


class RecomputeStepper:
    """Sliding window with re-computation: for each token t, a fresh forward pass over tokens
    [max(0, t - capacity), t] with positions 0..n-1; the last logit predicts t+1.

    The quality oracle; cost O(T * capacity^2). Windows of one block are batched, `batch_windows` at a
    time (all windows of a batch have the same length once the stream is longer than the capacity); the
    windows of the first `capacity` tokens all start at token 0, so one causal forward scores them together.
    """

    def __init__(self, model: nn.Module, capacity: int, batch_windows: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.model, self.capacity, self.batch_windows = model, capacity, batch_windows
        self.reset()

    def reset(self) -> None:
        self.history = None  # [1, seen] token ids of the stream so far

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != 1:
            raise ValueError("RecomputeStepper scores one stream at a time")
        self.history = input_ids if self.history is None else torch.cat([self.history, input_ids], dim=1)
        seen = self.history.shape[1]
        targets = list(range(seen - input_ids.shape[1], seen))
        logits = []
        # While the stream is within the capacity every window starts at token 0: one causal forward over the
        # longest of them gives each window's last logit at once.
        prefixes = [t for t in targets if t < self.capacity]
        if prefixes:
            window = self.history[:, : prefixes[-1] + 1]
            out = self.model(window, attention_mask=torch.ones_like(window), use_cache=False).logits[0]
            logits.extend((t, out[t]) for t in prefixes)
        targets = [t for t in targets if t >= self.capacity]
        for group_start in range(0, len(targets), self.batch_windows):
            group = targets[group_start : group_start + self.batch_windows]
            lengths = {min(t, self.capacity) + 1 for t in group}
            for length in sorted(lengths):
                ts = [t for t in group if min(t, self.capacity) + 1 == length]
                windows = torch.stack([self.history[0, t + 1 - length : t + 1] for t in ts])
                # Explicit all-ones mask: transformers 5 would otherwise read fresh positions as packed sequences.
                mask = torch.ones_like(windows)
                positions = torch.arange(length, device=windows.device)[None].expand(len(ts), -1)
                # logits_to_keep=1: only the last position's logits are needed (saves most of the lm_head).
                out = self.model(windows, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1).logits
                logits.extend(zip(ts, out[:, -1]))
        logits.sort(key=lambda item: item[0])
        keep = self.history.shape[1] - self.capacity - 1
        if keep > 0:
            self.history = self.history[:, keep:]
        return torch.stack([row for _, row in logits])[None]


@torch.no_grad()
def recompute_nlls_at(
    model: nn.Module, input_ids: torch.Tensor, capacity: int, steps: list[int], batch_windows: int = 8, progress: bool = False
) -> torch.Tensor:
    """The recompute baseline at chosen steps only: float64 [len(steps)], entry i = the NLL of token steps[i] + 1
    from a fresh forward over tokens [max(0, t - capacity), t] (t = steps[i]) at positions 0..n-1.

    Equals RecomputeStepper's nlls[t] at those steps; lets the O(capacity)-per-token oracle be sampled across a
    long stream instead of run on a short prefix.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if any(not 0 <= t < input_ids.shape[1] - 1 for t in steps):
        raise ValueError(f"steps must lie in [0, {input_ids.shape[1] - 2}]")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="recompute (sampled)", unit="tok", leave=False)
    nlls = torch.empty(len(steps), dtype=torch.float64)
    by_length: dict[int, list[int]] = {}
    for index, t in enumerate(steps):
        by_length.setdefault(min(t, capacity) + 1, []).append(index)
    for length, indices in sorted(by_length.items()):
        for group_start in range(0, len(indices), batch_windows):
            group = indices[group_start : group_start + batch_windows]
            windows = torch.stack([input_ids[0, steps[i] + 1 - length : steps[i] + 1] for i in group])
            positions = torch.arange(length, device=windows.device)[None].expand(len(group), -1)
            # Explicit all-ones mask: transformers 5 would otherwise read fresh positions as packed sequences.
            logits = model(
                windows, attention_mask=torch.ones_like(windows), position_ids=positions, use_cache=False, logits_to_keep=1
            ).logits[:, -1]
            nlls[group] = token_nlls(logits, torch.stack([input_ids[0, steps[i] + 1] for i in group]))
            if bar is not None:
                bar.update(len(group))
    if bar is not None:
        bar.close()
    return nlls
