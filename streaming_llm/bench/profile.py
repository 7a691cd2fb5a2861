"""torch.profiler over streaming decode steps: which operators the cache update and rotation cost."""

from __future__ import annotations

import torch
from torch import nn

from streaming_llm.bench.latency import StreamingDecoder


def profile_decode(model: nn.Module, capacity: int, n_sink: int, steps: int = 10, row_limit: int = 15,
                   position_mode: str = "pos_shift", trace_path: str | None = None) -> str:
    """Profile `steps` decode steps of our cache at `capacity`; return the top operators by self time."""
    decoder = StreamingDecoder(model, n_sink, capacity, position_mode=position_mode)
    decoder.prepare()
    decoder.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if next(model.parameters()).is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            with torch.profiler.record_function("streaming_decode_step"):
                decoder.step()
    if trace_path:
        profiler.export_chrome_trace(trace_path)
    sort_key = "self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_key, row_limit=row_limit)
