"""The methods compared by the evaluation harness: each one a configuration of the same code path.

Every method builds a *stepper* (see perplexity.py) for one model and one cache budget, and is scored by
`compute_perplexity` on the same token ids. A method also says how it may be fed:

- "exact":   its block path equals its token path (SEMANTICS.md §5), so the stream is fed in large blocks
             (the exact parallel evaluator); block_size=1 is the decode loop and gives the same NLLs.
- "decode":  one token per step only (kvpress compresses its cache after every step).
- "batched": recompute runs one fresh forward per token whatever the block; a block only sets how many
             windows are batched together.

Budget: `n_sink` sinks + `window_size` recent tokens, capacity C = n_sink + window_size. `window` keeps
the same capacity without sinks (n_sink=0, window C), `recompute` re-encodes the last C+1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

FEEDS = ("exact", "decode", "batched")


@dataclass(frozen=True)
class Method:
    """One evaluated configuration: a name, how it may be fed, and how to build its stepper."""

    name: str
    feed: str  # one of FEEDS
    description: str
    build: Callable[..., object]  # build(model, n_sink, window_size) -> stepper

    def block_size(self, requested: int) -> int:
        """The block size this method is actually fed with when `requested` is asked for."""
        return 1 if self.feed == "decode" else requested

    def evaluator(self, requested: int) -> str:
        """A label for the file name and the table: 'decode' (one token a step) or 'block<N>'."""
        size = self.block_size(requested)
        if self.feed == "batched":
            return f"recompute{size}"
        return "decode" if size == 1 else f"block{size}"


def _streaming(position_mode: str = "pos_shift", streaming_mode: str = "ours", sinks: bool = True):
    def build(model: nn.Module, n_sink: int, window_size: int):
        from streaming_llm.wrapper import StreamingLLMWrapper

        if not sinks:  # window attention: the same capacity, all of it recent tokens
            return StreamingLLMWrapper(model, 0, n_sink + window_size, position_mode, streaming_mode)
        return StreamingLLMWrapper(model, n_sink, window_size, position_mode, streaming_mode)

    return build


def _dense(model: nn.Module, n_sink: int, window_size: int):
    from streaming_llm.eval.baselines import DenseStepper

    return DenseStepper(model)


def _recompute(model: nn.Module, n_sink: int, window_size: int):
    from streaming_llm.eval.baselines import RecomputeStepper

    return RecomputeStepper(model, n_sink + window_size)


def _kvpress(variant: str):
    def build(model: nn.Module, n_sink: int, window_size: int):
        from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

        stepper = KvpressDecodeStepper(model, n_sink, window_size, variant=variant)
        return stepper if callable(stepper) else _CallableStepper(stepper)

    return build


class _CallableStepper:
    """Gives a stepper that only has `step(input_ids)` the `__call__` compute_perplexity uses."""

    def __init__(self, stepper):
        self.stepper = stepper

    def reset(self) -> None:
        self.stepper.reset()

    def __call__(self, input_ids):
        return self.stepper.step(input_ids)

    def kept_positions(self, *args):
        return self.stepper.kept_positions(*args)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("dense", "exact", "no eviction (window = infinity), stream positions", _dense),
        Method("window", "exact", "window attention: n_sink=0, window = capacity, pos-shift", _streaming(sinks=False)),
        Method("streaming_pos_shift", "exact", "sinks + window, positions inside the cache (the paper)", _streaming()),
        Method("streaming_rerotate", "exact", "sinks + window, stored keys re-rotated on eviction", _streaming("rerotate")),
        Method("streaming_absolute", "exact", "sinks + window, every key keeps its stream position", _streaming("absolute")),
        Method("mit", "exact", "MIT's StartRecentKVCache slicing, pos-shift positions", _streaming(streaming_mode="mit")),
        Method("recompute", "batched", "sliding window with re-computation of the last capacity+1 tokens", _recompute),
        Method(
            "kvpress_decode_shipped", "decode", "kvpress 0.5.5 DecodingPress(StreamingLLMPress), as shipped", _kvpress("shipped")
        ),
        Method(
            "kvpress_decode_corrected",
            "decode",
            "kvpress DecodingPress(StreamingLLMPress) with kept indices sorted (true sinks kept)",
            _kvpress("corrected"),
        ),
    )
}

# What `streaming-llm eval` runs by default: everything that finishes in minutes on a CPU.
DEFAULT_METHODS = ("dense", "window", "streaming_pos_shift", "streaming_rerotate", "streaming_absolute", "mit")


def get_methods(names: str | list[str] | tuple[str, ...] | None) -> list[Method]:
    """Methods by name (a list, or one comma-separated string; 'all' for every method); ValueError if unknown."""
    if names is None:
        names = list(DEFAULT_METHODS)
    elif isinstance(names, str):
        names = [name.strip() for name in names.split(",") if name.strip()]
    if list(names) == ["all"]:
        names = list(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}, or all")
    if not names:
        raise ValueError("no method given")
    return [METHODS[name] for name in dict.fromkeys(names)]
