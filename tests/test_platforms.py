"""What the package does on the platforms CI does not run (macOS, Windows, musl), simulated here by monkeypatching:
sys.platform, a missing /proc, a missing `resource` module (Windows has none), a C library that is not glibc, MPS
said to be available. Each test names the platform it stands for."""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch


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


class _OnMPS(torch.Tensor):
    """A CPU tensor taken for one on mps by the moves eval makes: .to(mps) is itself, .to('cpu') and .cpu() give the
    plain tensor. Its device stays cpu (so that tensors made with device=... are made), as token ids may."""

    reports_mps = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__ and cls.reports_mps:
            return torch.device("mps", 0)
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        float64 = func is torch.Tensor.double or (func is torch.Tensor.to and torch.float64 in (*args[1:], *kwargs.values()))
        if float64 and cls.reports_mps:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64.")
        if func is torch.Tensor.to:
            target = next((a for a in (*args[1:], *kwargs.values()) if isinstance(a, (str, torch.device))), None)
            if target is not None:
                return args[0] if torch.device(target).type == "mps" else args[0].as_subclass(torch.Tensor).clone()
        return super().__torch_function__(func, types, args, kwargs)


class _MPSLike(_OnMPS):
    """A CPU tensor that behaves as an MPS one does for the scorers: its device is mps:0, float64 is refused with
    MPS's TypeError."""

    reports_mps = True


def test_the_scorers_take_logits_on_mps():
    """eval --device mps: the model's logits are on mps, which has no float64; each scorer (the block evaluator, the
    sampled recompute baseline, the strided window) takes the float64 softmax on the CPU, where it used to fail with
    torch's TypeError, and scores exactly what it scores on the CPU."""
    from streaming_llm.eval.baselines import recompute_nlls_at
    from streaming_llm.eval.chunked import strided_window_perplexity
    from streaming_llm.eval.perplexity import compute_perplexity

    generator = torch.Generator().manual_seed(0)
    table = torch.randn(16, 16, generator=generator)  # logits of the next token = a row per current token
    ids = torch.randint(0, 16, (1, 12), generator=generator)

    class Stepper:
        def __init__(self, mps):
            self.mps = mps

        def reset(self):
            pass

        def __call__(self, input_ids):
            logits = table[input_ids.as_subclass(torch.Tensor)]
            return logits.as_subclass(_MPSLike) if self.mps else logits

    class Model(Stepper):
        def __call__(self, input_ids, logits_to_keep=0, **kwargs):
            logits = super().__call__(input_ids)
            return types.SimpleNamespace(logits=logits[:, -logits_to_keep:])

    mps_ids = ids.as_subclass(_OnMPS)  # eval moves the ids to the model's device
    for run in (lambda mps, ids: compute_perplexity(Stepper(mps), ids, block_size=4).nlls,
                lambda mps, ids: recompute_nlls_at(Model(mps), ids, capacity=4, steps=[3, 7, 10]),
                lambda mps, ids: strided_window_perplexity(Model(mps), ids, context_size=5, stride=2).nlls):
        assert torch.equal(run(True, mps_ids), run(False, ids))


def test_bench_waits_for_the_mps_queue(monkeypatch):
    """bench --device mps: MPS, like CUDA, queues work and returns; a step is timed from a synchronised device to a
    synchronised device, or the time is that of queueing it."""
    from streaming_llm.bench import latency

    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("synchronize"))
    latency.synchronized_ms(lambda: calls.append("step"), torch.device("mps", 0))
    assert calls == ["synchronize", "step", "synchronize"]


def test_resident_memory_without_proc_is_the_peak_in_mib_and_says_so(monkeypatch):
    """macOS: no /proc/self/status, so bench's stream and the soak read getrusage's ru_maxrss, which is bytes
    there: 3 GiB is 3,072 MiB (not 3 MiB x 1024), and the reading says it is the process's peak, not VmRSS."""
    import resource

    from streaming_llm.bench import latency, memory

    monkeypatch.setattr(memory, "Path", _NoProc)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=3 * 2**30))
    assert memory.resident_memory_mib() == 3072.0
    assert memory.resident_memory() == (3072.0, "peak_rss_process")
    assert latency.environment("cpu")["rss_kind"] == "peak_rss_process"


def test_bench_stream_and_soak_without_any_rss_reading(llama_model, monkeypatch, tmp_path):
    """Windows: neither /proc nor getrusage. bench --stream-tokens records rss_bytes null (rss_kind unavailable), its
    table and figure leave the memory out, and the soak runs, its RSS check not measured (passed null), not failed;
    each used to end in a traceback (ImportError, or arithmetic on None) after the streaming was done."""
    from streaming_llm.bench import latency, memory, soak
    from streaming_llm.bench.command import format_stream
    from streaming_llm.bench.plots import plot_latency

    monkeypatch.setattr(memory, "Path", _NoProc)
    monkeypatch.setitem(sys.modules, "resource", None)
    assert memory.resident_memory() == (None, "unavailable")
    rows = latency.measure_stream(copy.deepcopy(llama_model), 12, 2, checkpoints=[12, 20], block=8, steps=1)
    assert [row["rss_bytes"] for row in rows] == [None, None] and "n/a" in format_stream(rows)
    report = {"rows": [{"method": "streaming", "capacity": 12, "median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0}],
              "stream": rows, "environment": latency.environment("cpu")}
    assert report["environment"]["rss_kind"] == "unavailable"
    plot_latency(report, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").stat().st_size > 0

    from streaming_llm import StreamingLLMWrapper

    wrapper = StreamingLLMWrapper(soak.build_tiny_llama(seed=0), 2, 6)
    outcome = soak.run_soak(wrapper, soak.random_token_source(soak.TINY_VOCAB_SIZE, seed=1), num_tokens=60, every=20,
                            block_size=16, warmup_tokens=20)
    assert all(record["rss_mib"] is None for record in outcome["records"])
    assert outcome["checks"]["rss_growth"]["passed"] is None and outcome["passed"]


def _load_experiment(name: str):
    """experiments/<name>.py as a fresh module, not run as a script."""
    path = Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_on_another_platform", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_long_prompt_memory_on_macos_and_windows(monkeypatch, capsys):
    """experiments/long_prompt_memory.py read ru_maxrss as KiB (on macOS it is bytes: 1,024 times the growth) and
    imported `resource` at its top (on Windows a traceback); its growth is in MiB on both, and Windows is refused in
    one line before the model is built."""
    import resource

    readings = iter([2 * 2**30, 2 * 2**30 + 5 * 2**20])  # bytes, as macOS reports them: 5 MiB of growth
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=next(readings)))
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _load_experiment("long_prompt_memory").measure(20)["peak_rss_growth_mib"] == 5.0
    monkeypatch.setitem(sys.modules, "resource", None)
    windows = _load_experiment("long_prompt_memory")
    with pytest.raises(SystemExit):
        windows.main(["--prompt-tokens", "20"])
    assert "does not report (Windows)" in capsys.readouterr().err


def _character_model(tmp_path, characters: str):
    """A model folder any command takes: the tiny random Llama with a tokenizer of a token per character of
    `characters` (others are [UNK]), no special token added."""
    from tokenizers import Regex, pre_tokenizers
    from tiny_models import build_llama, tokenizer_of

    model = build_llama()
    vocab = ["[UNK]", "<s>", *sorted(set(characters))]
    vocab += [f"<unused{i}>" for i in range(model.config.vocab_size - len(vocab))]
    tokenizer = tokenizer_of(vocab, bos=None, pre_tokenizer=pre_tokenizers.Split(Regex("."), behavior="isolated"))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_piped_prompt_and_output_are_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """Windows: a pipe's encoding is the locale's (cp1252), not UTF-8. generate --prompt-file - read a piped UTF-8
    prompt as cp1252 (other characters, no error) and wrote '?' for every character cp1252 lacks; both are UTF-8."""
    import io
    import json

    from streaming_llm import cli

    prompt = "Grüße → 世界"
    folder = _character_model(tmp_path, prompt)
    stdout_bytes = io.BytesIO()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(prompt.encode("utf-8")), encoding="cp1252"))
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout_bytes, encoding="cp1252", write_through=True))
    status = cli.main(["generate", "--model", str(folder), "--prompt-file", "-", "--chat-template", "off",
                       "--max-new-tokens", "2", "--json", "--n-sink", "2", "--window-size", "8", "--quiet"])
    sys.stdout.flush()
    assert status == 0
    record = json.loads(stdout_bytes.getvalue().decode("utf-8"))
    assert record["prompt_tokens"] == len(prompt)  # read as cp1252, its 18 bytes were 18 other characters
    print("→ 世界", flush=True)
    assert stdout_bytes.getvalue().decode("utf-8").endswith("→ 世界\n")


def test_examples_and_scripts_print_model_text_to_a_pipe(monkeypatch, capsys):
    """Windows: an example or experiment script printing a model's text to a pipe (cp1252) stopped at its first
    character cp1252 lacks ("<script>: error: 'charmap' codec can't encode ...", exit status 2); run_script writes
    pipes as UTF-8, as the command line does."""
    import io

    from streaming_llm.cli_common import run_script

    stdout_bytes = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(stdout_bytes, encoding="cp1252", write_through=True))
    assert run_script(lambda: print("世界 →", flush=True)) == 0
    assert stdout_bytes.getvalue().decode("utf-8") == "世界 →\n" and capsys.readouterr().err == ""


def test_generate_stats_without_a_peak_rss(tmp_path, monkeypatch, capsys):
    """Windows: no getrusage, so peak_rss_mib is null; generate --stats formatted it as a number (a TypeError
    traceback once the text was written); the line says n/a."""
    from streaming_llm import cli

    folder = _character_model(tmp_path, "abc ")
    monkeypatch.setitem(sys.modules, "resource", None)
    status = cli.main(["generate", "--model", str(folder), "--prompt", "abc", "--chat-template", "off",
                       "--max-new-tokens", "2", "--stats", "--n-sink", "2", "--window-size", "8", "--quiet"])
    assert status == 0 and "peak RSS n/a" in capsys.readouterr().err
