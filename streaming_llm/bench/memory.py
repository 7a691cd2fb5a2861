"""Memory readings shared by the benchmarks: resident set size, allocator trimming, cache bytes."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path

import torch


def resident_memory() -> tuple[float | None, str]:
    """(MiB, kind) of this process's resident memory. Linux: VmRSS of /proc/self/status, the memory resident now
    (kind "vmrss"). Without /proc (macOS): the process's peak RSS since it started, getrusage's ru_maxrss (KiB on
    Linux, bytes on macOS), an upper bound that never comes down (kind "peak_rss_process"). Without either
    (Windows: no `resource` module): (None, "unavailable")."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024, "vmrss"  # the line is "VmRSS:   123456 kB"
    from streaming_llm.cli_common import peak_memory_mb

    peak = peak_memory_mb()
    return (None, "unavailable") if peak is None else (peak, "peak_rss_process")


def resident_memory_mib() -> float | None:
    """The MiB of resident_memory()."""
    return resident_memory()[0]


def resident_memory_kind() -> str:
    """The kind of resident_memory() on this platform."""
    return resident_memory()[1]


def release_free_memory() -> None:
    """Collect garbage and hand the C allocator's free pages back to the OS (glibc malloc_trim; a no-op
    elsewhere), so that the next RSS reading counts live memory, not pages the allocator keeps for reuse."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def tensor_bytes(objects) -> int:
    """Bytes of the tensors among `objects` (anything else is skipped)."""
    return sum(t.numel() * t.element_size() for t in objects if isinstance(t, torch.Tensor))


def cache_bytes(cache) -> int:
    """Bytes of every tensor held by the cache's layers (keys, values, sink keys, positions)."""
    return tensor_bytes(value for layer in cache.layers for value in vars(layer).values())
