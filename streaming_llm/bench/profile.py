"""torch.profiler over streaming decode steps: which operators the cache update and rotation cost.

While profiling (only then), the cache's own stages are wrapped in `record_function` labels, so the report can say
how much of a step the cache spends writing tokens, building the per-step rotations, moving its frame (re-rotating
stored keys) and attending, next to the model's operators.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from streaming_llm.bench.latency import StreamingDecoder
from streaming_llm.cache import RingLayer, StreamingLayer

STEP_LABEL = "streaming_decode_step"
# kineto's own log lines, e.g. "USDT:2026-11-27 02:34:43 21903:21903 SyncActivityProfilerHandler.cpp:52] profiler_start"
KINETO_NOTICE = re.compile(rb"^(USDT|INFO):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\.cpp:\d+\]")
# (class, method) -> label; the methods run inside a decode step of the general path (cache.py).
CACHE_STAGES = {
    (RingLayer, "_decode_step"): "cache: decode step of one layer (rotate q/k, write, sinks, SDPA)",
    (RingLayer, "_decode_rotations"): "cache: per-step rotation matrices",
    (RingLayer, "shift_window_keys"): "cache: frame move (re-rotate stored window keys)",
    (StreamingLayer, "advance_frame"): "cache: frame bookkeeping",
}


@dataclass
class ProfileReport:
    position_mode: str
    top_operators: str  # torch.profiler's table, by self time
    stages: list[dict]  # label, calls, total_ms, share of the profiled steps

    def text(self) -> str:
        lines = [f"position_mode={self.position_mode}: cache stages (inclusive time, share of the decode steps)"]
        for stage in self.stages:
            lines.append(f"  {stage['label']:<70}{stage['calls']:>6} calls{stage['total_ms']:>10.2f} ms"
                         f"{100 * stage['share']:>7.1f}%")
        return "\n".join(lines)


@contextlib.contextmanager
def _labelled_cache_stages():
    """Wrap the cache stages in record_function labels for the duration of the block."""
    originals = {}
    try:
        for (owner, name), label in CACHE_STAGES.items():
            original = owner.__dict__[name]

            def labelled(*args, _original=original, _label=label, **kwargs):
                with torch.profiler.record_function(_label):
                    return _original(*args, **kwargs)

            originals[(owner, name)] = original
            setattr(owner, name, labelled)
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


@contextlib.contextmanager
def _without_profiler_notices():
    """Drop the lines torch's profiler library (kineto) prints to the process's stderr at each start and stop
    ("USDT:... profiler_start"), which KINETO_LOG_LEVEL does not turn off; everything else written to stderr meanwhile is kept."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to filter
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not KINETO_NOTICE.match(line)]
            if kept:
                sys.stderr.write(b"".join(kept).decode("utf-8", errors="replace"))
                sys.stderr.flush()


def profile_decode(model: nn.Module, capacity: int, n_sink: int, steps: int = 10, row_limit: int = 15,
                   position_mode: str = "pos_shift", trace_path: str | None = None) -> ProfileReport:
    """Profile `steps` decode steps of our cache (general path) at `capacity`: the top operators by self time and
    the time of each cache stage; a Chrome trace is written to `trace_path` if given."""
    decoder = StreamingDecoder(model, n_sink, capacity, position_mode=position_mode)
    decoder.prepare()
    decoder.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if next(model.parameters()).is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _labelled_cache_stages(), _without_profiler_notices(), torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            with torch.profiler.record_function(STEP_LABEL):
                decoder.step()
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    averages = profiler.key_averages()
    sort_key = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    by_key = {event.key: event for event in averages}
    step_us = by_key[STEP_LABEL].cpu_time_total if STEP_LABEL in by_key else float("nan")
    stages = []
    for label in CACHE_STAGES.values():
        event = by_key.get(label)
        total_us = event.cpu_time_total if event is not None else 0.0
        stages.append({"label": label, "calls": event.count if event is not None else 0,
                       "total_ms": total_us / 1000, "share": total_us / step_us})
    return ProfileReport(position_mode, averages.table(sort_by=sort_key, row_limit=row_limit), stages)
