"""SamplingConfig, how the next token is chosen, in a module that imports nothing heavy: the command line checks
--temperature, --top-p and the rest with it before torch and transformers load (the sampler itself, TokenSampler, is in
generation.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from streaming_llm.checks import check_int, is_int, is_number

SEED_LIMIT = 2**63
REPETITION_WINDOW_LIMIT = 2**31  # a window as long as any stream; deque and tensor slices take it


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits of the last fed token.

    temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature).
    top_k: sample among the k most likely tokens only, and those tied with the k-th (0 = no limit).
    top_p: nucleus sampling, the smallest set of tokens whose probability reaches top_p (1 = no limit).
    repetition_penalty: CTRL-style (Keskar et al. 2019), > 1 discourages repeats: a positive logit is
      divided by it, a negative one multiplied; applied to the distinct ids among the last
      `repetition_window` tokens of the stream (prompt included), so its cost does not grow with the stream.
    seed: seeds the sampler's own torch.Generator, an integer in [0, 2**63) (None: non-deterministic): once per
      generate_stream call, once per StreamingChat conversation (its turns draw on; reset() seeds it again).
    Every accepted value samples without NaN: a temperature too small to divide by acts as greedy.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        check_int("top_k", self.top_k, 0, " (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0 and finite (1 = off), got {self.repetition_penalty}")
        check_int("repetition_window", self.repetition_window, 1)
        if self.repetition_window >= REPETITION_WINDOW_LIMIT:
            raise ValueError(f"repetition_window must be < 2**31, got {self.repetition_window}")
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
