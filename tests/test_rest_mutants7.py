"""Behaviour that no other test pinned down, found by the seventh mutation round (the generation.py mutants no
earlier round ran, the console script's entry point, the profiler and the tiny test model's shape)."""

from __future__ import annotations

import importlib.abc
import sys

from streaming_llm import entry


class _InterruptedImport(importlib.abc.MetaPathFinder):
    """A finder that stands for a Ctrl-C arriving while `name` is imported."""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_the_command_line_imports_exits_130_after_a_line_break(monkeypatch, capsys):
    """The console script imports the command line inside its interrupt guard: a Ctrl-C during that import is
    status 130 (128 + SIGINT, as a Ctrl-C during a command) with only a line break on stderr (after the shell's ^C),
    no traceback. (test_entry.py sends a real SIGINT, which the command line itself may be the one to catch.)"""
    monkeypatch.delitem(sys.modules, "streaming_llm.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedImport("streaming_llm.cli"), *sys.meta_path])
    assert entry.main() == 130
    assert capsys.readouterr() == ("", "\n")


# -- the profiler's report (bench/profile.py), on a stand-in profiler whose times are known --------------------


class _Event:
    def __init__(self, key: str, cpu_time_total: float, count: int):
        self.key, self.cpu_time_total, self.count = key, cpu_time_total, count


class _Averages(list):
    def table(self, sort_by=None, row_limit=100, **options):
        return (sort_by, row_limit)


class _Profiler:
    """torch.profiler.profile as profile_decode uses it: the activities asked for, and key_averages() of `events`."""

    def __init__(self, events):
        self.events, self.activities = events, None

    def __call__(self, activities):
        self.activities = list(activities)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def key_averages(self):
        return _Averages(self.events)


class _Decoder:
    def __init__(self, model, n_sink, capacity, position_mode="pos_shift"):
        self.steps = 0

    def prepare(self):
        pass

    def step(self):
        self.steps += 1


class _Parameter:
    def __init__(self, is_cuda: bool):
        self.is_cuda = is_cuda


class _Model:
    def __init__(self, is_cuda: bool):
        self.is_cuda = is_cuda

    def parameters(self):
        return iter([_Parameter(self.is_cuda)])


def _profiled(monkeypatch, events, is_cuda=False):
    import torch

    from streaming_llm.bench import profile

    profiler = _Profiler(events)
    monkeypatch.setattr(torch.profiler, "profile", profiler)
    monkeypatch.setattr(profile, "StreamingDecoder", _Decoder)
    return profile.profile_decode(_Model(is_cuda), capacity=8, n_sink=2, steps=2), profiler


def test_each_cache_stage_reports_its_calls_milliseconds_and_share_of_the_steps(monkeypatch):
    """A stage's total_ms is the profiler's microseconds over 1000 and its share is of the profiled steps' time; a
    stage that never ran (pos_shift moves no frame in a short profile, say) has 0 calls, 0 ms and a share of 0."""
    from streaming_llm.bench.profile import CACHE_STAGES, STEP_LABEL

    decode, rotations, move, bookkeeping = CACHE_STAGES.values()
    events = [_Event(STEP_LABEL, 8000.0, 2), _Event(decode, 2000.0, 4), _Event(rotations, 500.0, 4),
              _Event(bookkeeping, 40.0, 2), _Event("aten::mm", 1234.0, 12)]
    report, _ = _profiled(monkeypatch, events)
    assert report.stages == [
        {"label": decode, "calls": 4, "total_ms": 2.0, "share": 0.25},
        {"label": rotations, "calls": 4, "total_ms": 0.5, "share": 0.0625},
        {"label": move, "calls": 0, "total_ms": 0.0, "share": 0.0},
        {"label": bookkeeping, "calls": 2, "total_ms": 0.04, "share": 0.005},
    ]


def test_a_cuda_profile_lists_its_top_15_operators_by_self_cuda_time(monkeypatch):
    """A model on CUDA is profiled on the CPU and the GPU, and its operators are ranked by their own GPU time (the
    step's cost there), not by the CPU time that launched them (the CPU case: test_bench_mutants.py)."""
    import torch

    from streaming_llm.bench.profile import STEP_LABEL

    report, profiler = _profiled(monkeypatch, [_Event(STEP_LABEL, 100.0, 2)], is_cuda=True)
    assert profiler.activities == [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    assert report.top_operators == ("self_cuda_time_total", 15)
