"""Per-token decode latency and memory of every KV-cache strategy, measured side by side in one run.

Each method is a *decoder*: `prepare(capacity)` brings it to steady state (a full cache of
`capacity` tokens) and `step()` decodes one more token at that state. Methods are timed round-robin,
a few steps each per round, so that whatever else the machine is doing hits them all alike; the
numbers that matter are the ratios within one run.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from streaming_llm.attention import prepare_model
from streaming_llm.bench import METHODS
from streaming_llm.bench.memory import cache_bytes, release_free_memory, resident_memory_kind, resident_memory_mib, tensor_bytes
from streaming_llm.eval.baselines import RecomputeStepper
from streaming_llm.models import attention_shape, check_capacity
from streaming_llm.wrapper import StreamingLLMWrapper

# A 2-layer Llama with grouped-query attention, for soak runs and tests; vocab and special ids set by the caller.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0, initializer_range=0.2)

MODEL_SHAPES = {
    # name: (config class name, config kwargs); random weights, timing does not depend on them.
    "smollm2-135m": (
        "LlamaConfig",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
             rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5),
    ),
    "pythia-70m": (
        "GPTNeoXConfig",
        dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
             vocab_size=50304, max_position_embeddings=2048, rotary_pct=0.25, rotary_emb_base=10000,
             use_parallel_residual=True),
    ),
    "llama-2-7b": (
        "LlamaConfig",
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, vocab_size=32000, rope_theta=10000.0,
             # Llama-2 has 4096 positions; a cache of 4096 tokens attends to 4097 (dense and streaming alike),
             # so the limit is raised for timing at the paper's cache size 4096 (weights are random anyway).
             max_position_embeddings=8192),
    ),
    # Gemma 3 1B's attention (26 layers, every sixth full attention, the rest sliding with a 512-token window; 1 kv
    # head of 256; its two RoPEs) with the MLP (1,152 instead of 6,912) and vocabulary (4,096 instead of 262,144) cut so
    # that a CPU times it: a hybrid model, whose sliding layers keep only their window (RingLayer.sliding).
    "gemma3-1b-attention": (
        "Gemma3TextConfig",
        dict(vocab_size=4096, hidden_size=1152, intermediate_size=1152, num_hidden_layers=26, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
             layer_types=["full_attention" if (index + 1) % 6 == 0 else "sliding_attention" for index in range(26)],
             max_position_embeddings=32768,
             rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                              "full_attention": dict(rope_type="default", rope_theta=1000000.0)}),
    ),
}


def shape_config(shape: str, **overrides):
    """The config of a named shape (MODEL_SHAPES), fields replaced by `overrides`: no weights are built."""
    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose embedded or one of {', '.join(MODEL_SHAPES)}")
    import transformers

    config_name, kwargs = MODEL_SHAPES[shape]
    config = getattr(transformers, config_name)(**{**kwargs, **overrides})
    config._attn_implementation = "sdpa"
    return config


def build_model(shape: str, dtype: torch.dtype, device: str, **overrides) -> nn.Module:
    """A randomly initialised model of a named shape (config fields replaced by `overrides`), or the embedded
    model for shape="embedded"."""
    if shape == "embedded":
        from streaming_llm.loading import load_model

        model, _ = load_model(None, dtype=dtype, device=device)
        return model
    import transformers

    config = shape_config(shape, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _random_ids(model: nn.Module, n: int, device) -> torch.Tensor:
    return torch.randint(0, model.config.get_text_config().vocab_size, (1, n), device=device)


class Decoder:
    """One method's decode step at a fixed cache size."""

    name = "?"

    def __init__(self, model: nn.Module, n_sink: int, capacity: int):
        self.model, self.n_sink, self.capacity = model, n_sink, capacity
        self.device = next(model.parameters()).device
        self.token = _random_ids(model, 1, self.device)

    def prepare(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        return 0

    def cache_length(self) -> int:
        return self.capacity


class DenseStaticDecoder(Decoder):
    """transformers' StaticCache holding `capacity` tokens; each timed step attends to capacity + 1 (a hybrid model's
    sliding layers get StaticCache's own sliding layers of `sliding_window` slots, so they attend to fewer)."""

    name = "dense_static"

    def prepare(self):
        from transformers import StaticCache

        self.check_fits()
        self.model.set_attn_implementation("sdpa")
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.capacity + 1)
        with torch.no_grad():
            self.model(_random_ids(self.model, self.capacity, self.device), past_key_values=self.cache,
                       cache_position=torch.arange(self.capacity, device=self.device))
        self.position = torch.tensor([self.capacity], device=self.device)

    @torch.no_grad()
    def step(self):
        # The same slot every step: the cost of a step at a constant cache length.
        self.model(self.token, past_key_values=self.cache, cache_position=self.position,
                   position_ids=self.position[None])

    def check_fits(self) -> None:
        """ValueError (the method is skipped) where capacity + 1 keys exceed the model's positions or, for a model whose
        every layer slides, its sliding window,
        as for the streaming methods: the model never attends to that many (a DynamicCache cannot even be cropped)."""
        check_capacity(self.model.config, self.capacity)

    def cache_bytes(self):
        return tensor_bytes(t for layer in self.cache.layers for t in (layer.keys, layer.values))


class DenseStaticCompiledDecoder(DenseStaticDecoder):
    """The same StaticCache step under torch.compile(mode="reduce-overhead"): CUDA graphs on GPU."""

    name = "dense_static_compiled"

    def prepare(self):
        from streaming_llm.fast import own_code

        super().prepare()
        # On a code object of its own, as FastStreamingWrapper compiles its step: torch.compile keeps compiled graphs
        # per code object, and its guards do not cover inductor's config, so a model.forward compiled before (by
        # another decoder, frozen or not) would be reused as it was compiled.
        self.forward = torch.compile(own_code(self.model.forward), mode="reduce-overhead", fullgraph=True)

    @torch.no_grad()
    def step(self):
        torch.compiler.cudagraph_mark_step_begin()
        self.forward(input_ids=self.token, past_key_values=self.cache, cache_position=self.position,
                     position_ids=self.position[None])


class DenseStaticFrozenDecoder(DenseStaticCompiledDecoder):
    """The compiled StaticCache step with inductor freezing (fast.frozen): the weights are constants of the graph,
    the projections that read the same input one matmul each; the dense counterpart of streaming_compiled_frozen."""

    name = "dense_static_compiled_frozen"

    def prepare(self):
        from streaming_llm.fast import frozen

        super().prepare()
        self.forward = frozen(self.forward)  # compiled at its first call, under freezing


class DenseDynamicDecoder(DenseStaticDecoder):
    """A DynamicCache of `capacity` tokens, cropped back after every step (so the length is constant)."""

    name = "dense_dynamic"

    def prepare(self):
        from transformers import DynamicCache

        self.check_fits()
        self.model.set_attn_implementation("sdpa")
        # Plain layers, which keep all `capacity` tokens: a sliding-window layer made from the config drops its old
        # keys itself and cannot be cropped once it has seen more than its window (a hybrid model's cache may). A
        # hybrid's sliding layers then hold and mask `capacity` keys (MIT mode's do too; the streaming cache's keep
        # only their window where it is at most window_size + 1, RingLayer.sliding).
        self.cache = DynamicCache()
        with torch.no_grad():
            self.model(_random_ids(self.model, self.capacity, self.device), past_key_values=self.cache)
        self.position = torch.tensor([self.capacity], device=self.device)

    @torch.no_grad()
    def step(self):
        self.model(self.token, past_key_values=self.cache, cache_position=self.position, position_ids=self.position[None])
        self.cache.crop(self.capacity)

    def cache_length(self):
        return self.cache.get_seq_length()


class StreamingDecoder(Decoder):
    """Our StreamingKVCache (ring buffer); stream 2 * capacity tokens first so eviction is in steady state."""

    def __init__(self, model, n_sink, capacity, position_mode="pos_shift", streaming_mode="ours"):
        super().__init__(model, n_sink, capacity)
        self.position_mode, self.streaming_mode = position_mode, streaming_mode
        self.name = "mit" if streaming_mode == "mit" else f"streaming_{position_mode}"

    def prepare(self):
        self.wrapper = StreamingLLMWrapper(self.model, self.n_sink, self.capacity - self.n_sink,
                                           self.position_mode, self.streaming_mode)
        self.wrapper(_random_ids(self.model, 2 * self.capacity, self.device))

    def step(self):
        self.wrapper(self.token)

    def cache_bytes(self):
        return cache_bytes(self.wrapper.cache)

    def cache_length(self):
        return self.wrapper.cache.get_cache_length()


class FastStreamingDecoder(Decoder):
    """FastStreamingWrapper's static decode step (pos_shift): eager ("streaming_static"), compiled with CUDA graphs
    ("streaming_compiled"), and so with its weights frozen into the graph ("streaming_compiled_frozen")."""

    def __init__(self, model, n_sink, capacity, compile: str, decode_attention: str = "auto",
                 freeze_weights: bool = False):
        super().__init__(model, n_sink, capacity)
        self.compile, self.decode_attention, self.freeze_weights = compile, decode_attention, freeze_weights
        self.name = ("streaming_static" if compile == "never" else
                     "streaming_compiled_frozen" if freeze_weights else "streaming_compiled")

    def prepare(self):
        from streaming_llm.fast import FastStreamingWrapper

        self.wrapper = FastStreamingWrapper(self.model, self.n_sink, self.capacity - self.n_sink, "pos_shift",
                                            compile=self.compile, decode_attention=self.decode_attention,
                                            freeze_weights=self.freeze_weights)
        self.wrapper(_random_ids(self.model, 2 * self.capacity, self.device))

    def step(self):
        self.wrapper.step(self.token)

    def cache_bytes(self):
        return tensor_bytes((*self.wrapper.keys, *self.wrapper.values, *self.wrapper.sink_keys))

    def cache_length(self):
        return self.wrapper.cache.get_cache_length()


class RecomputeDecoder(Decoder):
    """Sliding window with re-computation: a forward pass over capacity + 1 tokens per token."""

    name = "recompute"

    def prepare(self):
        self.model.set_attn_implementation("sdpa")
        self.stepper = RecomputeStepper(self.model, self.capacity, batch_windows=1)
        self.stepper.history = _random_ids(self.model, self.capacity + 1, self.device)

    def step(self):
        self.stepper(self.token)


class KvpressDecoder(Decoder):
    """kvpress's DecodingPress + StreamingLLMPress (compression every step), corrected variant."""

    name = "kvpress_decode"

    def prepare(self):
        from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

        self.model.set_attn_implementation("sdpa")
        # Unobserved: kvpress as its users run it, without our record of the positions it keeps.
        self.stepper = KvpressDecodeStepper(self.model, self.n_sink, self.capacity - self.n_sink, variant="corrected",
                                            record_positions=False)
        self.stepper.reset()
        self.stepper.prefill(_random_ids(self.model, self.capacity, self.device))
        self.stepper(_random_ids(self.model, 8, self.device))  # eight compressed steps: steady state

    def step(self):
        with torch.no_grad():
            self.stepper(self.token)

    def cache_bytes(self):
        return tensor_bytes(t for layer in self.stepper.cache.layers for t in (layer.keys, layer.values))

    def cache_length(self):
        return self.stepper.cache.get_seq_length()


def make_decoder(method: str, model: nn.Module, n_sink: int, capacity: int, decode_attention: str = "auto") -> Decoder:
    if method == "dense_static":
        return DenseStaticDecoder(model, n_sink, capacity)
    if method == "dense_static_compiled":
        return DenseStaticCompiledDecoder(model, n_sink, capacity)
    if method == "dense_static_compiled_frozen":
        return DenseStaticFrozenDecoder(model, n_sink, capacity)
    if method in ("streaming_static", "streaming_compiled", "streaming_compiled_frozen"):
        compile = "never" if method == "streaming_static" else "always"
        return FastStreamingDecoder(model, n_sink, capacity, compile, decode_attention,
                                    freeze_weights=method == "streaming_compiled_frozen")
    if method == "dense_dynamic":
        return DenseDynamicDecoder(model, n_sink, capacity)
    if method.startswith("streaming_"):
        return StreamingDecoder(model, n_sink, capacity, position_mode=method.removeprefix("streaming_"))
    if method == "mit":
        return StreamingDecoder(model, n_sink, capacity, "pos_shift", "mit")
    if method == "recompute":
        return RecomputeDecoder(model, n_sink, capacity)
    if method == "kvpress_decode":
        return KvpressDecoder(model, n_sink, capacity)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass
class LatencyRow:
    method: str
    capacity: int
    step_ms: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    cache_length: int = 0
    setup_s: float = 0.0  # building the state and the warm-up steps (compilation included)
    step_peak_bytes: int | None = None  # CUDA only: what one step allocates on top of what is held
    # CUDA only: per step when steps are queued back to back, no host synchronisation in between, so the host's
    # own time per step (Python, guards, launches) is hidden while the device is busy: the device's cost.
    device_ms: float | None = None
    step_kind: str | None = None  # FastStreamingWrapper's: cuda_graph, cuda_graph_trees, compiled or eager

    def summary(self) -> dict:
        """Median and nearest-rank p10/p90 (the ceil(q n)-th smallest of n steps) of the step times, in ms."""
        ordered = sorted(self.step_ms)

        def quantile(q: float) -> float:
            # - 1e-9: q n computed in floats (0.1 * 30 = 3.0000000000000004) must not round up a whole rank
            return ordered[max(0, math.ceil(q * len(ordered) - 1e-9) - 1)]

        return {
            "method": self.method, "capacity": self.capacity, "steps": len(ordered),
            "median_ms": statistics.median(ordered), "p10_ms": quantile(0.1), "p90_ms": quantile(0.9),
            "cache_bytes": self.cache_bytes, "cache_length": self.cache_length, "setup_s": round(self.setup_s, 2),
            "step_peak_bytes": self.step_peak_bytes, "device_ms": self.device_ms, "step_kind": self.step_kind,
        }


def synchronize(device) -> None:
    """Wait for the work queued on `device` (CUDA and MPS run it asynchronously: a step returns before it is done)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def measure_latency(model: nn.Module, methods: list[str], capacity: int, n_sink: int = 4, rounds: int = 5,
                    steps_per_round: int = 6, warmup: int = 3, progress=None,
                    decode_attention: str = "auto", skipped: list[dict] | None = None) -> list[LatencyRow]:
    """Round-robin timing of each method's decode step at one cache size; returns a row per method timed. A method
    that cannot run (this model, or an optional package missing) is skipped with one line on stderr (not repeated
    for the next cache size where `skipped` already holds the method and reason), and
    {"method", "capacity", "reason"} is appended to `skipped` where a list is given."""
    device = next(model.parameters()).device
    decoders = []
    for method in methods:
        decoder = make_decoder(method, model, n_sink, capacity, decode_attention)
        prepare_attn(decoder)
        started = time.perf_counter()
        try:
            decoder.prepare()
        except (ValueError, ImportError) as error:  # cannot run this model / optional package missing: reported
            if not any((entry["method"], entry["reason"]) == (method, str(error)) for entry in skipped or ()):
                print(f"bench: skipping {method}: {error}", file=sys.stderr)
            if skipped is not None:
                skipped.append({"method": method, "capacity": capacity, "reason": str(error)})
            if progress is not None:  # its rounds will not come: the bar still ends at 100%
                progress.total -= rounds
                progress.refresh()
            continue
        for _ in range(warmup):  # >= 3: a CUDA-graph step is compiled, then recorded, then replayed
            decoder.step()
        synchronize(device)
        decoders.append((decoder, LatencyRow(method, capacity, setup_s=time.perf_counter() - started)))
    for _ in range(rounds):
        for decoder, row in decoders:
            prepare_attn(decoder)
            for _ in range(steps_per_round):
                row.step_ms.append(synchronized_ms(decoder.step, device))
            if progress is not None:
                progress.update(1)
    for decoder, row in decoders:
        row.cache_bytes, row.cache_length = decoder.cache_bytes(), decoder.cache_length()
        prepare_attn(decoder)
        row.step_peak_bytes = step_peak_bytes(decoder, device)
        row.device_ms = queued_step_ms(decoder, device, steps_per_round)
        row.step_kind = getattr(getattr(decoder, "wrapper", None), "step_kind", None)
    return [row for _, row in decoders]


def synchronized_ms(function, device) -> float:
    """Milliseconds of one call, the device synchronised before and after (what a caller waiting for it sees)."""
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return 1000 * (time.perf_counter() - started)


def queued_step_ms(decoder: Decoder, device, steps: int) -> float | None:
    """Milliseconds per step over `steps` steps queued back to back, timed with CUDA events; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        decoder.step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def step_peak_bytes(decoder: Decoder, device) -> int | None:
    """Device memory one decode step allocates beyond what is already held (its transient peak: a copied
    cache, re-computed activations), on CUDA; None elsewhere (CPU allocations are not tracked per step)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    decoder.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - held


def prepare_attn(decoder: Decoder) -> None:
    """Methods share one model: switch its attention implementation to what the method needs."""
    if isinstance(decoder, StreamingDecoder):
        prepare_model(decoder.model)
    else:
        decoder.model.set_attn_implementation("sdpa")


def measure_stream(model: nn.Module, capacity: int, n_sink: int, checkpoints: list[int], block: int = 512,
                   steps: int = 8, progress=None) -> list[dict]:
    """Stream up to max(checkpoints) tokens through our cache (blocks: exact and fast), and at each
    checkpoint time `steps` decode steps and record resident memory and the cache length."""
    prepare_model(model)
    device = next(model.parameters()).device
    wrapper = StreamingLLMWrapper(model, n_sink, capacity - n_sink)
    token = _random_ids(model, 1, device)
    rows = []
    for checkpoint in sorted(checkpoints):
        while wrapper.tokens_seen < checkpoint:
            n = min(block, checkpoint - wrapper.tokens_seen)
            wrapper(_random_ids(model, n, device))
            if progress is not None:
                progress.update(n)
        release_free_memory()
        times = [synchronized_ms(lambda: wrapper(token), device) for _ in range(steps)]
        rss = resident_memory_mib()  # None where the platform reports none (environment's rss_kind "unavailable")
        rows.append({
            "tokens_streamed": wrapper.tokens_seen, "median_ms": statistics.median(times),
            "rss_bytes": None if rss is None else int(rss * 2**20), "cache_length": wrapper.cache.get_cache_length(),
            "cuda_allocated_bytes": torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None,
        })
    return rows


def measure_copy_bandwidth(device, size_bytes: int = 2**30, repeats: int = 20) -> float | None:
    """Device memory bandwidth in bytes/s as a device-to-device copy achieves it (bytes read + bytes written),
    the denominator of the decode step's floor; None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del source, target
    torch.cuda.empty_cache()
    return 2 * size_bytes * repeats / seconds


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (tied ones once): what a decode step reads, the input embedding's rows aside."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dense_kv_bytes(model: nn.Module, capacity: int) -> int:
    """Bytes of a dense KV cache holding `capacity + 1` tokens (what a step at that length reads)."""
    shape = attention_shape(model.config)
    element = next(model.parameters()).element_size()
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * (capacity + 1) * element


def environment(device: str) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "rss_kind": resident_memory_kind()}  # what the stream's rss_bytes are (bench.memory.resident_memory)
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info
