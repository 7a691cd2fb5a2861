"""Chunked evaluation (the seed's `eval_streaming_llm.py`) and its sliding-window baseline.

Neither is the decode loop, and both are kept to measure how far such protocols are from it; the decode
loop, and the exact parallel evaluator that equals it, are what every committed comparison uses.

- `chunked_streaming_perplexity`: the stream is cut into chunks of `chunk_size` tokens. A chunk is fed in
  one forward pass against the cache left by the chunks before it, then the cache is cut to the first
  `n_sink` + the last `window_size` tokens and the kept keys are re-rotated to their cache slots (the
  seed's rerotation, pos-shift positions). Inside a chunk every token also attends to all earlier tokens
  of the same chunk, so token t sees up to C + chunk_size - 1 keys instead of the decode loop's C + 1, at
  positions up to C + chunk_size - 1 (C = n_sink + window_size). chunk_size=1 *is* the decode loop.
  This is not our block path: `compute_perplexity(wrapper, ids, block_size=n)` evicts per token inside a
  block and equals the decode loop exactly; this protocol evicts only between chunks.
- `strided_window_perplexity`: the usual "sliding window with stride" (Hugging Face's perplexity recipe):
  windows of `context_size` tokens moved by `stride`, positions 0..n-1 in each, only the last `stride`
  predictions of a window scored. stride=1 with context_size = C + 1 is `recompute`.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import DynamicCache

from streaming_llm.checks import check_token_ids
from streaming_llm.eval.perplexity import PerplexityResult, token_nlls
from streaming_llm.models import describe
from streaming_llm.rope import RotaryParams


def _progress(total: int, enabled: bool, description: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="tok", leave=False)


def _cut_and_rerotate(cache: DynamicCache, n_sink: int, window_size: int, rotary: RotaryParams) -> None:
    """Keep slots [0, n_sink) and the last window_size of every layer; move the window keys to slots
    n_sink.. by re-rotating them by (new slot - old slot), in the model's own feature order."""
    for layer in cache.layers:
        length = layer.keys.shape[-2]
        if length <= n_sink + window_size:
            continue
        first_window = length - window_size
        window_keys = rotary.rerotate(layer.keys[:, :, first_window:], n_sink - first_window)
        layer.keys = torch.cat([layer.keys[:, :, :n_sink], window_keys], dim=-2)
        layer.values = torch.cat([layer.values[:, :, :n_sink], layer.values[:, :, first_window:]], dim=-2)


@torch.no_grad()
def chunked_streaming_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    n_sink: int,
    window_size: int,
    chunk_size: int,
    progress: bool = False,
) -> PerplexityResult:
    """Seed-style chunked perplexity of input_ids [1, T]: nlls[t] scores token t+1, as compute_perplexity."""
    check_token_ids("input_ids", input_ids, min_length=2)  # one stream, as compute_perplexity scores
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if n_sink < 0 or window_size < 1:
        raise ValueError(f"need n_sink >= 0 and window_size >= 1, got {n_sink}, {window_size}")
    rotary = describe(model).single_rotary("the chunked evaluation's re-rotation")
    steps = input_ids.shape[1] - 1
    nlls = torch.empty(steps, dtype=torch.float64)
    # Plain layers that keep what they are given (a sliding-window layer made from the config would drop keys itself,
    # and its length would no longer match the cut); the model's sliding-window mask then falls on cache slots, the
    # positions it sees.
    cache = DynamicCache()
    bar = _progress(steps, progress, f"chunked{chunk_size}")
    started = time.perf_counter()
    for start in range(0, steps, chunk_size):
        end = min(start + chunk_size, steps)
        held = cache.get_seq_length()
        chunk = input_ids[:, start:end]
        positions = torch.arange(held, held + chunk.shape[1], device=chunk.device)[None]
        mask = torch.ones(1, held + chunk.shape[1], dtype=torch.long, device=chunk.device)
        logits = model(chunk, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
        nlls[start:end] = token_nlls(logits[0], input_ids[0, start + 1 : end + 1])
        _cut_and_rerotate(cache, n_sink, window_size, rotary)
        if bar is not None:
            bar.update(end - start)
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return PerplexityResult(float(torch.exp(nlls.mean())), nlls, input_ids.shape[1], wall, {"chunk_size": chunk_size})


@torch.no_grad()
def strided_window_perplexity(
    model: nn.Module, input_ids: torch.Tensor, context_size: int, stride: int, progress: bool = False
) -> PerplexityResult:
    """Sliding window with stride over input_ids [1, T]: every prediction made from a fresh window of at most
    `context_size` tokens ending at the predicting token, positions 0..n-1; nlls[t] scores token t+1."""
    check_token_ids("input_ids", input_ids, min_length=2)
    if not 1 <= stride <= context_size:
        raise ValueError(f"need 1 <= stride <= context_size, got stride={stride}, context_size={context_size}")
    steps = input_ids.shape[1] - 1
    nlls = torch.empty(steps, dtype=torch.float64)
    bar = _progress(steps, progress, f"strided{stride}")
    started = time.perf_counter()
    for start in range(0, steps, stride):
        end = min(start + stride, steps)  # predictions from tokens start..end-1
        first = max(0, end - context_size)
        window = input_ids[:, first:end]
        positions = torch.arange(window.shape[1], device=window.device)[None]
        # Explicit all-ones mask: transformers 5 reads position resets without one as packed sequences.
        logits = model(window, attention_mask=torch.ones_like(window), position_ids=positions, use_cache=False).logits
        scored = logits[0, start - first :]
        nlls[start:end] = token_nlls(scored, input_ids[0, start + 1 : end + 1])
        if bar is not None:
            bar.update(end - start)
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return PerplexityResult(
        float(torch.exp(nlls.mean())), nlls, input_ids.shape[1], wall, {"context_size": context_size, "stride": stride}
    )


def deviation(nlls: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far per-token NLLs are from a reference run on the same ids: max and mean |Δ|, Δ of the mean
    NLL, and the perplexity ratio."""
    if nlls.shape != reference.shape:
        raise ValueError(f"NLLs of shape {tuple(nlls.shape)} and {tuple(reference.shape)} cannot be compared")
    difference = nlls.double() - reference.double()
    return {
        "max_abs_delta_nll": float(difference.abs().max()),
        "mean_abs_delta_nll": float(difference.abs().mean()),
        "delta_mean_nll": float(difference.mean()),
        "perplexity_ratio": float(torch.exp(difference.mean())),
    }
