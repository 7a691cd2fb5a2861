"""Behaviour of the benchmark's statistics and records that no other test pinned down (found by mutation testing):
round-robin order, warm-up and skips of measure_latency, the units of every reading, the streamed checkpoints, byte
counts and latency ratios. Timings and memory readings are injected: every number is asserted exactly."""

from __future__ import annotations

import gc
import itertools
import types
import weakref

import pytest
import torch

from streaming_llm.bench import latency, memory
from streaming_llm.bench.command import _ratios, format_table
from streaming_llm.bench.latency import LatencyRow
from tiny_models import build_llama


@pytest.fixture(scope="module")
def model():
    return build_llama()


class _Progress:
    """tqdm's interface: `n` done of `total` planned."""

    def __init__(self, total=None):
        self.n, self.total, self.refreshed = 0, total, 0

    def update(self, n):
        self.n += n

    def refresh(self):
        self.refreshed += 1


class _FakeDecoder:
    """Counts its steps; its cache length and bytes are read from that count (so when they are read shows)."""

    def __init__(self, name, capacity, fail=None, reason=None):
        self.name, self.capacity, self.fail, self.steps = name, capacity, fail, 0
        self.reason = reason or f"{name} cannot run here"
        if name == "a":
            self.wrapper = types.SimpleNamespace(step_kind="cuda_graph")

    def prepare(self):
        if self.fail is not None:
            raise self.fail(self.reason)

    def step(self):
        self.steps += 1

    def cache_bytes(self):
        return 100 * self.steps

    def cache_length(self):
        return self.steps


def test_measure_latency_round_robin_warmup_skips_and_readings(monkeypatch, capsys):
    """Methods are timed in turns of `steps_per_round` steps, round after round; each gets `warmup` untimed steps
    first; a method that raises ValueError or ImportError in prepare is skipped with one line; cache bytes and
    length are read after the timed steps; setup time and progress (one per method per round) are recorded."""
    decoders = {}

    def make_decoder(method, model, n_sink, capacity, decode_attention="auto"):
        fail = {"no_value": ValueError, "no_import": ImportError}.get(method)
        decoders[method] = _FakeDecoder(method, capacity, fail)
        return decoders[method]

    ticks = itertools.count(1)
    clock = itertools.count(0.0, 0.25)
    monkeypatch.setattr(latency, "make_decoder", make_decoder)
    monkeypatch.setattr(latency, "prepare_attn", lambda decoder: None)
    monkeypatch.setattr(latency, "synchronized_ms", lambda function, device: (function(), float(next(ticks)))[1])
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    progress, skipped = _Progress(total=2 * 4), []
    rows = latency.measure_latency(torch.nn.Linear(1, 1), ["a", "no_value", "b", "no_import"], capacity=16,
                                   rounds=2, steps_per_round=3, warmup=2, progress=progress, skipped=skipped)
    assert [row.method for row in rows] == ["a", "b"]
    assert rows[0].step_ms == [1.0, 2.0, 3.0, 7.0, 8.0, 9.0] and rows[1].step_ms == [4.0, 5.0, 6.0, 10.0, 11.0, 12.0]
    assert decoders["a"].steps == decoders["b"].steps == 2 + 2 * 3
    assert [(row.cache_length, row.cache_bytes) for row in rows] == [(8, 800), (8, 800)]
    assert [row.setup_s for row in rows] == [0.25, 0.25]
    assert [row.step_kind for row in rows] == ["cuda_graph", None]
    assert [(row.step_peak_bytes, row.device_ms) for row in rows] == [(None, None), (None, None)]  # CPU
    assert progress.n == progress.total == 2 * 2 and progress.refreshed == 2  # a skipped method's rounds are not planned
    assert capsys.readouterr().err.splitlines() == ["bench: skipping no_value: no_value cannot run here",
                                                    "bench: skipping no_import: no_import cannot run here"]
    assert skipped == [{"method": "no_value", "capacity": 16, "reason": "no_value cannot run here"},
                       {"method": "no_import", "capacity": 16, "reason": "no_import cannot run here"}]


def test_a_method_skipped_for_the_same_reason_at_the_next_cache_size_is_named_once(monkeypatch, capsys):
    """kvpress_decode on a model kvpress does not support printed the same line for every cache size; `skipped`
    (what the JSON and the final "not timed" line report) still gets one entry per size."""
    def make_decoder(method, model, n_sink, capacity, decode_attention="auto"):
        reason = "unsupported" if method == "no_model" else f"too big for {capacity}"
        return _FakeDecoder(method, capacity, ValueError if method != "a" else None, reason=reason)

    monkeypatch.setattr(latency, "make_decoder", make_decoder)
    monkeypatch.setattr(latency, "prepare_attn", lambda decoder: None)
    skipped = []
    for capacity in (16, 32):
        latency.measure_latency(torch.nn.Linear(1, 1), ["a", "no_model", "no_size"], capacity=capacity, rounds=1,
                                steps_per_round=1, warmup=0, skipped=skipped)
    assert capsys.readouterr().err.splitlines() == ["bench: skipping no_model: unsupported",
                                                    "bench: skipping no_size: too big for 16",
                                                    "bench: skipping no_size: too big for 32"]
    assert [(entry["method"], entry["capacity"]) for entry in skipped] == [
        ("no_model", 16), ("no_size", 16), ("no_model", 32), ("no_size", 32)]


def test_summary_passes_the_row_through_and_rounds_setup_to_centiseconds():
    summary = LatencyRow("mit", 16, step_ms=[2.0, 1.0, 3.0], cache_bytes=5, cache_length=7, setup_s=1.23456,
                         step_peak_bytes=11, device_ms=0.5, step_kind="eager").summary()
    assert summary == {"method": "mit", "capacity": 16, "steps": 3, "median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 3.0,
                       "cache_bytes": 5, "cache_length": 7, "setup_s": 1.23, "step_peak_bytes": 11, "device_ms": 0.5,
                       "step_kind": "eager"}


def test_synchronized_ms_is_in_milliseconds(monkeypatch):
    clock = iter([1.0, 1.25])
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert latency.synchronized_ms(lambda: calls.append(1), "cpu") == 250.0 and calls == [1]


def test_measure_stream_checkpoints_in_order_with_median_and_rss_in_bytes(model, monkeypatch):
    """Checkpoints are taken in increasing order whatever order they are given in, each reached exactly (the last
    block is cut short) before its timed steps; the median of those steps and RSS in bytes are recorded; progress
    counts the streamed tokens."""
    times = itertools.cycle([3.0, 1.0, 2.0])
    monkeypatch.setattr(latency, "synchronized_ms", lambda function, device: (function(), next(times))[1])
    monkeypatch.setattr(latency, "resident_memory_mib", lambda: 1.5)
    progress = _Progress()
    rows = latency.measure_stream(model, 24, 4, checkpoints=[60, 30], block=16, steps=3, progress=progress)
    assert [row["tokens_streamed"] for row in rows] == [33, 63]
    assert [row["median_ms"] for row in rows] == [2.0, 2.0]
    assert [row["rss_bytes"] for row in rows] == [1572864, 1572864]
    assert [row["cache_length"] for row in rows] == [24, 24] and progress.n == 30 + 27


def test_byte_counts(model):
    """Dense KV bytes of capacity + 1 tokens (keys and values), parameter bytes and tensor bytes by element size."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert latency.dense_kv_bytes(model, 24) == 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 25 * 4
    numel = sum(parameter.numel() for parameter in model.parameters())
    assert latency.weight_bytes(model) == 4 * numel
    assert memory.tensor_bytes([torch.zeros(3, dtype=torch.float16), None, 7, torch.zeros(2, 2)]) == 6 + 16
    layer = types.SimpleNamespace(keys=torch.zeros(2, 3), values=torch.zeros(5, dtype=torch.bfloat16), n_sink=4)
    assert memory.cache_bytes(types.SimpleNamespace(layers=[layer, layer])) == 2 * (24 + 10)


def test_resident_memory_reads_vmrss_in_mib(monkeypatch):
    class FakePath:
        def __init__(self, name):
            assert name == "/proc/self/status"

        def read_text(self):
            return "VmHWM:\t 4096 kB\nVmRSS:\t 2048 kB\n"

    monkeypatch.setattr(memory, "Path", FakePath)
    assert memory.resident_memory_mib() == 2.0


def test_release_free_memory_collects_cycles():
    """Garbage in reference cycles is gone after release_free_memory, even with the automatic collector off."""
    class Node:
        pass

    node = Node()
    node.self = node
    ref = weakref.ref(node)
    gc.disable()
    try:
        del node
        assert ref() is not None
        memory.release_free_memory()
        assert ref() is None
    finally:
        gc.enable()


def test_ratios_divide_each_median_by_the_baselines_at_the_same_capacity():
    """ratio = median / baseline median (the baseline itself 1.0); capacities the baseline lacks are left out."""
    rows = [
        {"method": "dense_static", "capacity": 16, "median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 4.0, "cache_bytes": 2**20},
        {"method": "mit", "capacity": 16, "median_ms": 3.0, "p10_ms": 2.5, "p90_ms": 3.5, "cache_bytes": 2**21},
        {"method": "mit", "capacity": 32, "median_ms": 5.0, "p10_ms": 4.0, "p90_ms": 6.0, "cache_bytes": 2**21},
    ]
    assert _ratios(rows, "dense_static") == [{"method": "dense_static", "capacity": 16, "ratio": 1.0},
                                             {"method": "mit", "capacity": 16, "ratio": 1.5}]
    assert _ratios(rows, "dense_static_compiled") == []
    lines = format_table(rows).splitlines()
    assert "vs static" in lines[0] and "vs compiled" not in lines[0]
    assert lines[2].split() == ["mit", "16", "3.00", "2.50", "3.50", "1.50x", "2.0"]
    assert lines[3].split() == ["mit", "32", "5.00", "4.00", "6.00", "2.0"]


def test_table_columns_stay_aligned_under_long_method_names():
    """The method column is as wide as the longest name: 'dense_static_compiled_frozen' pushed its row's numbers two
    columns right of the header's."""
    rows = [{"method": name, "capacity": 1024, "median_ms": 2.0, "p10_ms": 1.0, "p90_ms": 4.0, "cache_bytes": 2**20}
            for name in ("dense_static_compiled", "dense_static_compiled_frozen", "mit")]
    header, *lines = format_table(rows).splitlines()
    end = header.index("capacity") + len("capacity")
    assert [line[:end].split() for line in lines] == [[row["method"], "1024"] for row in rows]
    assert {line.index("1024") + 4 for line in lines} == {end}


class _FakeCuda:
    """torch.cuda as the CUDA-only readings use it, on a machine without CUDA (CI). `work` counts the device work
    queued so far (decode steps, copies); an event records it, and the time between two events is 2 ms per unit of
    work in between. The allocator holds 1000 bytes; its peak starts at a stale 5000, and a step raises it to 1500."""

    def __init__(self):
        self.work, self.allocated, self.peak, self.calls = 0, 1000, 5000, []
        cuda = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.work = None

            def record(self):
                self.work = cuda.work

            def elapsed_time(self, end):
                return 2.0 * (end.work - self.work)

        self.Event = Event

    def synchronize(self):
        self.calls.append("synchronize")

    def memory_allocated(self):
        return self.allocated

    def reset_peak_memory_stats(self):
        self.peak = self.allocated

    def max_memory_allocated(self):
        return self.peak

    def empty_cache(self):
        self.calls.append("empty_cache")


def test_the_cuda_only_readings_and_their_units(monkeypatch):
    """queued_step_ms (ms per queued step), step_peak_bytes (what one step allocates above what is held) and
    measure_copy_bandwidth (bytes read + written per second, warm-up copy untimed) run on CUDA only, so no test
    ever ran them in CI: dropping the `/ steps`, the `- held` or the factor 2 passed every test. torch.cuda is faked."""
    cuda = _FakeCuda()

    class Buffer:
        def copy_(self, source):
            cuda.work += 1

    fake_torch = types.SimpleNamespace(device=torch.device, uint8=torch.uint8, cuda=cuda,
                                       empty=lambda size, dtype, device: Buffer(), empty_like=lambda source: Buffer())
    monkeypatch.setattr(latency, "torch", fake_torch)

    class Decoder:
        steps = 0

        def step(self):
            self.steps += 1
            cuda.work += 1
            cuda.peak = max(cuda.peak, cuda.allocated + 500)

    decoder = Decoder()
    assert latency.queued_step_ms(decoder, "cuda:0", 4) == 2.0 and decoder.steps == 4
    assert latency.step_peak_bytes(decoder, "cuda") == 500 and decoder.steps == 5
    assert latency.measure_copy_bandwidth("cuda", size_bytes=3 * 2**20, repeats=5) == 2 * 3 * 2**20 * 5 / (2.0 * 5 / 1000)
    assert cuda.work == 5 + 1 + 5 and cuda.calls[-1] == "empty_cache"
    for reading in (lambda: latency.queued_step_ms(decoder, "cpu", 4), lambda: latency.step_peak_bytes(decoder, "cpu"),
                    lambda: latency.measure_copy_bandwidth("cpu")):
        assert reading() is None
    assert decoder.steps == 5


def test_a_cpu_profile_lists_its_top_15_operators_by_self_cpu_time(model, monkeypatch):
    """Without CUDA there is no CUDA time to sort by: the table is of the operators' own CPU time."""
    from torch.autograd.profiler_util import EventList

    from streaming_llm.bench import profile

    monkeypatch.setattr(EventList, "table", lambda self, sort_by=None, row_limit=100, **options: (sort_by, row_limit))
    report = profile.profile_decode(model, capacity=8, n_sink=2, steps=2)
    assert report.top_operators == ("self_cpu_time_total", 15)
