"""What the package does on the platforms CI does not run (macOS, Windows, musl), simulated here by monkeypatching:
sys.platform, a missing /proc, a missing `resource` module (Windows has none), a C library that is not glibc, MPS
said to be available. Each test names the platform it stands for."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest


from streaming_llm.eval import results


class _NoProc:
    """Stands in for pathlib.Path in a module, on a system without /proc (macOS, Windows): every access fails."""

    def __init__(self, name):
        self.name = str(name)

    def write_text(self, text):
        raise FileNotFoundError(2, "No such file or directory", self.name)

    def read_text(self):
        raise FileNotFoundError(2, "No such file or directory", self.name)


def _fresh_copy(module):
    """`module` executed again as a new module object (the loaded one untouched)."""
    spec = importlib.util.spec_from_file_location(f"{module.__name__}_fresh_copy", module.__file__)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


# --- Windows: no `resource` module ------------------------------------------------------------------------------


def test_results_module_loads_and_peak_memory_degrades_without_resource(monkeypatch):
    """Windows: `import resource` fails. The results module (which the CLI imports for every command) still loads,
    and PeakMemory, with neither /proc nor getrusage, reports no number, marked unavailable."""
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    windows_results = _fresh_copy(results)
    monkeypatch.setattr(windows_results, "Path", _NoProc)
    with windows_results.PeakMemory("cpu") as peak:
        pass
    assert (peak.peak_mib, peak.kind) == (None, "unavailable")


# --- macOS: no /proc, ru_maxrss in bytes ------------------------------------------------------------------------


def test_peak_memory_reads_macos_ru_maxrss_as_bytes(monkeypatch):
    """macOS: no /proc (clear_refs cannot be written), and getrusage's ru_maxrss is in bytes, not KiB as on Linux:
    3 GiB of peak RSS is 3,072 MiB, not 3 MiB x 1024."""
    import resource

    monkeypatch.setattr(results, "Path", _NoProc)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**30))
    with results.PeakMemory("cpu") as peak:
        pass
    assert (peak.peak_mib, peak.kind) == (3 * 1024, "rss_process")


# --- macOS with an Apple GPU: --device mps --------------------------------------------------------------------------


def test_peak_memory_on_mps_reads_the_mps_allocator(monkeypatch):
    """A run on mps (the device eval passes is 'mps:0') measures the Metal memory torch's MPS allocator holds (its
    cache emptied on entry), not the process's RSS, which need not count GPU buffers."""
    import torch

    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 640 * 2**20)
    monkeypatch.setattr(results, "Path", _NoProc)
    with results.PeakMemory("mps:0") as peak:
        assert calls == ["synchronize", "empty_cache"]
    assert (peak.peak_mib, peak.kind) == (640.0, "mps_driver_allocated") and calls[-1] == "synchronize"


def test_float64_on_mps_is_refused_before_loading(monkeypatch):
    """MPS has no float64: --dtype float64 --device mps is a one-line error before the model is read (torch would
    raise a TypeError, a traceback, when the loaded model is moved there)."""
    import torch

    from streaming_llm.loading import load_model, resolve_dtype

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for dtype in ("float64", torch.float64):
        with pytest.raises(ValueError, match="float64 is not supported on mps"):
            resolve_dtype(dtype, "mps")
    with pytest.raises(ValueError, match="float64 is not supported on mps"):
        load_model("/no/such/model", dtype="float64", device="mps")
    assert resolve_dtype("float32", "mps") == torch.float32
