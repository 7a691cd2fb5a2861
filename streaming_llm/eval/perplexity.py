"""compute_perplexity: score a stream with any stepper, one token per step or in exact blocks (SEMANTICS.md §4).

A *stepper* is anything with `reset()` and `__call__(input_ids [1, n]) -> logits [1, n, vocab]` that
feeds the next n tokens of one stream: StreamingLLMWrapper, the baselines in `baselines.py`, the
kvpress adapters. Every method is scored by this one function on the same token ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from streaming_llm.checks import check_int, check_token_ids


class Stepper(Protocol):
    def reset(self) -> None: ...

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor: ...


@dataclass
class PerplexityResult:
    """perplexity = exp(mean NLL) over the T-1 predictions; nlls[t] scores token t+1 from step t."""

    perplexity: float
    nlls: torch.Tensor  # [T-1] float64, natural log
    num_tokens: int
    wall_s: float
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return (self.num_tokens - 1) / self.wall_s if self.wall_s > 0 else float("inf")


def _check_logits(logits, n: int, largest_id: int) -> None:
    """ValueError unless a stepper's output is float logits [1, n, vocab] that score every id of the text."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.ndim != 3 or logits.shape[:2] != (1, n):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        dtype = f" {logits.dtype}" if isinstance(logits, torch.Tensor) else ""
        raise ValueError(f"the stepper must return float logits [1, {n}, vocab] for {n} tokens; got{dtype} {shape}")
    if logits.shape[-1] <= largest_id:
        raise ValueError(f"the stepper's logits cover {logits.shape[-1]} token ids; the text holds id {largest_id}")


# Logits a CPU scores at a time in token_nlls (4 MiB in float64).
NLL_CHUNK_VALUES = 2**19


def token_nlls(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) of each row of `logits` [n, vocab] (targets [n] on any device): float64 [n], on the CPU. The
    softmax is taken in float64 on the logits' device; on mps, which has no float64, on the CPU.

    On the CPU the rows go a few at a time (each row's softmax is its own, so the values are the same): a whole
    block in float64, and its log-softmax, were two fresh allocations of 100 MB each for 256 rows of SmolLM2's
    49,152 logits, page-faulted in at every block (~0.14 s a block, ~10% of `streaming-llm eval`)."""
    if logits.device.type == "mps":
        logits = logits.cpu()
    targets = targets.to(logits.device)
    rows = max(1, NLL_CHUNK_VALUES // logits.shape[-1]) if logits.device.type == "cpu" else max(1, logits.shape[0])
    return torch.cat([F.cross_entropy(part.double(), part_targets, reduction="none")
                      for part, part_targets in zip(logits.split(rows), targets.split(rows))]).cpu()


def compute_perplexity(
    stepper: Stepper,
    input_ids: torch.Tensor,
    block_size: int = 1,
    progress: bool = False,
    description: str = "perplexity",
    on_block=None,
    resume_nlls: torch.Tensor | None = None,
) -> PerplexityResult:
    """Feed tokens 0..T-2 of `input_ids` [1, T] through `stepper` and score tokens 1..T-1.

    block_size=1 is the decode loop; a larger block is the exact parallel evaluator for steppers whose
    block path equals their token path (streaming and dense). `on_block(end, nlls_so_far)` is called
    after each block (for checkpoints).

    `resume_nlls` (the first `end` NLLs of an interrupted run with the same block_size, `end` a block
    boundary) resumes it: the stepper is fed tokens 0..end-1 again in the same blocks without scoring,
    which rebuilds exactly the cache the interrupted run had, and scoring continues from `end`.
    """
    check_token_ids("input_ids", input_ids, min_length=2)  # 2 tokens: one prediction to score
    total = input_ids.shape[1]
    block_size = check_int("block_size", block_size, 1)
    steps = total - 1
    nlls = torch.empty(steps, dtype=torch.float64)
    first = 0 if resume_nlls is None else resume_nlls.shape[0]
    if first and (first > steps or (first % block_size and first != steps)):
        raise ValueError(f"cannot resume at step {first}: not a block boundary of {block_size} within {steps} steps")
    largest_id = int(input_ids.max())  # every block's logits must score it (_check_logits)
    stepper.reset()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=first, desc=description, unit="tok", leave=False)
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, first, block_size):  # replay the interrupted run's blocks, unscored
            stepper(input_ids[:, start : min(start + block_size, first)])
        if first:
            nlls[:first] = resume_nlls.to(torch.float64)
        for start in range(first, steps, block_size):
            end = min(start + block_size, steps)
            logits = stepper(input_ids[:, start:end])
            _check_logits(logits, end - start, largest_id)
            nlls[start:end] = token_nlls(logits[0], input_ids[0, start + 1 : end + 1])
            if bar is not None:
                bar.update(end - start)
            if on_block is not None:
                on_block(end, nlls[:end])
    wall = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return PerplexityResult(float(torch.exp(nlls.mean())), nlls, total, wall)
