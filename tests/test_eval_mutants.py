"""Behaviour of the evaluation harness that no other test pinned down (found by mutation testing): result names,
the finished-result rule, the write order of a result's two files, what read_result accepts, the model
fingerprint's coverage, peak memory units, every field of a record, checkpoint rules, the recompute sample's NLL
file, the report's edge cases and the method table. Everything is checked on exact values, never on timings."""

from __future__ import annotations

import copy
import json
import math
import types

import numpy as np
import pytest
import torch

from streaming_llm.eval import harness, results
from streaming_llm.eval.harness import Checkpoint, _stepper_extra, perplexity_at, run_method, run_recompute_sample, sample_steps
from streaming_llm.eval.methods import DEFAULT_METHODS, METHODS, Method, _CallableStepper, _streaming, get_methods
from streaming_llm.eval.report import markdown_table, segment_label, summary_rows
from streaming_llm.eval.results import (
    PeakMemory,
    build_record,
    data_label,
    is_finished,
    list_results,
    model_fingerprint,
    prepare_output_dir,
    read_result,
    result_paths,
    result_stem,
    write_result,
)
from tiny_models import TableStepper, random_ids

DATA = {"name": "random", "kind": "test", "sha256": "0123456789abcdef"}


def _run(model, output_dir, method=None, **options):
    """A 30-token run of `method` (default streaming_pos_shift) with 2 sinks + a window of 8, blocks of 8."""
    settings = dict(model_name="tiny-llama", data=DATA, n_sink=2, window_size=8, block_size=8, output_dir=output_dir)
    return run_method(method or METHODS["streaming_pos_shift"], copy.deepcopy(model), random_ids(30, seed=7)[None],
                      **(settings | options))


# --- names -----------------------------------------------------------------------------------------------------


def test_data_label_is_the_file_stem_plus_8_hex_digits_or_the_name_alone():
    """A file's extension is not part of the label; a description without a digest is labelled by its name only
    (no dangling '-')."""
    assert data_label({"name": "/texts/Hamlet Act 1.txt", "sha256": "abcdef0123456789"}) == "Hamlet-Act-1-abcdef01"
    assert data_label({"name": "wikitext"}) == "wikitext"
    assert data_label({}) == "data"
    # a dataset spec is a name, not a path: its owner and dotted parts stay (they were cut as a file's folder and suffix)
    assert data_label({"name": "allenai/c4:en.noblocklist", "kind": "datasets", "sha256": "abcdef0123"}) == \
        "allenai-c4-en.noblocklist-abcdef01"
    assert data_label({"name": "emozilla/pg19-test", "kind": "datasets"}) == "emozilla-pg19-test"


def test_result_stem_parts_in_order():
    """model, data, T, sinks and window (in that order), method, evaluator; a non-float32 dtype last."""
    assert result_stem("m", DATA, 100, 4, 1020, "dense", "block256") == "m__random-01234567__T100__s4_w1020__dense__block256"
    assert result_stem("m", DATA, 100, 4, 1020, "dense", "decode", "bfloat16").endswith("__dense__decode__bfloat16")


def test_is_finished_needs_both_files(tmp_path):
    """A result is finished only when its JSON and its NLL file both exist."""
    json_path, nlls_path = result_paths(tmp_path, "stem")
    assert not is_finished(tmp_path, "stem")
    nlls_path.write_bytes(b"")
    assert not is_finished(tmp_path, "stem")  # the NLLs only: interrupted before the JSON
    nlls_path.unlink()
    json_path.write_text("{}")
    assert not is_finished(tmp_path, "stem")  # the JSON only: its NLLs went missing
    nlls_path.write_bytes(b"")
    assert is_finished(tmp_path, "stem")


# --- writing and reading ---------------------------------------------------------------------------------------


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """atomic_write: a write that fails halfway leaves the previous content and no temporary file."""
    path = tmp_path / "out.json"
    results.atomic_write(path, lambda handle: handle.write(b"old"))

    def fail(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        results.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_writing_over_a_folder_names_the_folder_not_the_temporary_file(tmp_path):
    """A figure or table path that is a folder failed as "Is a directory: .../.nll_curves__T300__s4_w60.png.797.tmp",
    naming a hidden temporary file the user never gave, after writing it in full. The folder is named, and nothing
    is written."""
    folder = tmp_path / "curves.png"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as error:
        results.atomic_write(folder, lambda handle: handle.write(b"png"))
    assert error.value.filename == str(folder) and ".tmp" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"] and list(folder.iterdir()) == []


def test_prepare_output_dir_refuses_a_blank_name_and_a_file(tmp_path):
    """A name of spaces is no folder (it would create one named '  '); a file is named as not a folder."""
    with pytest.raises(ValueError, match="--output-dir is empty"):
        prepare_output_dir("  ")
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        prepare_output_dir(afile, option="--out")
    assert prepare_output_dir(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"


def test_prepare_output_dir_leaves_no_folder_it_created(tmp_path):
    """It created the folder (and those above it) when checking it, so a run refused afterwards (a bad --model or
    --data) left an empty new folder behind: it is created for the check and removed again, the first write creates
    it; a folder that was there stays, and the check still finds one that cannot be created."""
    assert prepare_output_dir(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    prepare_output_dir(tmp_path / "old" / "sub")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and list((tmp_path / "old").iterdir()) == []
    results.write_json_atomically(tmp_path / "new" / "sub" / "r.json", {})  # the write makes the folders
    assert (tmp_path / "new" / "sub" / "r.json").is_file()
    with pytest.raises(ValueError, match="cannot create it"):
        prepare_output_dir(tmp_path / "new" / "sub" / "r.json" / "x")


def test_the_nlls_are_written_before_the_json(tmp_path, monkeypatch):
    """When the NLL file cannot be written, no JSON exists (a JSON is the mark of a finished result)."""
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(results.np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_result(tmp_path, "stem", {"a": 1}, torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_a_json_names_its_nll_file_and_read_result_follows_it(tmp_path):
    """The record holds `nlls_file`; a copy of the JSON under another name still reads the NLLs it names."""
    record = {key: 1 for key in results.RECORD_KEYS} | {"model": "m", "data": {}, "num_tokens": 3, "method": "dense",
                                                         "evaluator": "decode"}
    json_path = write_result(tmp_path, "a", record, torch.tensor([0.5, 1.5]))
    written = json.loads(json_path.read_text())
    assert written["nlls_file"] == "a.nlls.npy" and written | {"nlls_file": None} == record | {"nlls_file": None}
    copy_path = tmp_path / "b.json"
    copy_path.write_text(json_path.read_text())
    record, nlls = read_result(copy_path)
    assert nlls.tolist() == [0.5, 1.5]


def test_read_result_requires_every_record_key(tmp_path):
    """A record missing any of RECORD_KEYS (here the last, perplexity) is not a result."""
    for key in results.RECORD_KEYS:
        path = tmp_path / f"no_{key}.json"
        path.write_text(json.dumps({k: 1 for k in results.RECORD_KEYS if k != key}))
        with pytest.raises(ValueError, match=f"is not a result file of streaming-llm eval \\(no {key}\\)"):
            read_result(path)
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a result file of streaming-llm eval"):
        read_result(path)


def test_read_result_names_an_nll_file_that_is_not_one(tmp_path):
    """A companion file that np.load refuses (not an .npy at all) is named, not a raw numpy error."""
    json_path = write_result(tmp_path, "a", {key: 1 for key in results.RECORD_KEYS}, torch.zeros(2))
    (tmp_path / "a.nlls.npy").write_bytes(b"this is not numpy")
    with pytest.raises(ValueError, match="a.nlls.npy is not a readable NLL file"):
        read_result(json_path)


def test_list_results_is_sorted_by_name(tmp_path):
    """Results are listed in name order whatever order the folder gives them in."""
    names = [f"{letter}.json" for letter in "qzamxbky"]
    for name in names:
        (tmp_path / name).write_text("{}")
    (tmp_path / "n.txt").write_text("")
    assert [p.name for p in list_results(tmp_path)] == sorted(names)


# --- fingerprint -----------------------------------------------------------------------------------------------


def test_fingerprint_covers_the_first_and_last_1024_values_and_the_config(llama_model):
    """16 hex digits; a change at index 1,023 or at index -1,024 of a large parameter changes it, and so does a
    config field the weights do not show."""
    model = copy.deepcopy(llama_model)
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    largest = max(model.parameters(), key=lambda parameter: parameter.numel())
    assert largest.numel() > 4096
    for index in (1023, largest.numel() - 1024):
        original = largest.view(-1)[index].item()
        with torch.no_grad():
            largest.view(-1)[index] = original + 1.0
            assert model_fingerprint(model) != fingerprint, index
            largest.view(-1)[index] = original
        assert model_fingerprint(model) == fingerprint
    model.config.rms_norm_eps = model.config.rms_norm_eps * 2
    assert model_fingerprint(model) != fingerprint


def test_fingerprint_ignores_the_recorded_dtype_and_path(llama_model):
    """The config's dtype and name_or_path fields say how and where a model was loaded, not what it is."""
    model = copy.deepcopy(llama_model)
    fingerprint = model_fingerprint(model)
    model.config.dtype = torch.bfloat16
    model.config.name_or_path = "/somewhere/else"
    assert model_fingerprint(model) == fingerprint


# --- peak memory -----------------------------------------------------------------------------------------------


class _FakePath:
    """Stands in for pathlib.Path in a module: records writes, serves `status` as /proc/self/status."""

    writes: list = []
    status = ""
    refuse_writes = False

    def __init__(self, name):
        self.name = str(name)

    def write_text(self, text):
        if self.refuse_writes:
            raise PermissionError(self.name)
        type(self).writes.append((self.name, text))

    def read_text(self):
        return self.status


def test_peak_memory_resets_the_block_peak_and_reads_vmhwm_in_mib(monkeypatch):
    """Linux: peak RSS reset on entry (5 written to clear_refs), VmHWM (KiB) read on exit as MiB."""
    fake = type("P", (_FakePath,), {"writes": [], "status": "VmRSS:\t 1024 kB\nVmHWM:\t 3072 kB\n"})
    monkeypatch.setattr(results, "Path", fake)
    with PeakMemory("cpu") as peak:
        assert fake.writes == [("/proc/self/clear_refs", "5")]
    assert peak.kind == "rss_block" and peak.peak_mib == 3.0


def test_peak_memory_falls_back_to_the_process_peak(monkeypatch):
    """Where clear_refs is refused, the process's ru_maxrss (KiB) in MiB, marked rss_process."""
    fake = type("P", (_FakePath,), {"writes": [], "refuse_writes": True, "status": "VmHWM:\t 1 kB\n"})
    monkeypatch.setattr(results, "Path", fake)
    import resource

    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=5120))
    with PeakMemory("cpu") as peak:
        pass
    assert peak.kind == "rss_process" and peak.peak_mib == 5.0


# --- records -----------------------------------------------------------------------------------------------------


def test_build_record_fields():
    """Every derived and passed-through field of a record holds what its name says."""
    peak = PeakMemory("cpu")
    peak.peak_mib, peak.kind = 12.5, "rss_block"
    record = build_record(model_name="m", data=DATA, num_tokens=30, n_sink=2, window_size=8, method="dense",
                          method_description="d", evaluator="block8", block_size=8, perplexity=3.0, mean_nll=1.1,
                          wall_s=2.0, tokens_per_s=14.5, peak_memory=peak, device="cpu", dtype="float32",
                          fingerprint="00ff")
    assert record["num_predictions"] == 29 and record["cache_capacity"] == 10 and record["block_size"] == 8
    assert (record["perplexity"], record["mean_nll"], record["wall_s"], record["tokens_per_s"]) == (3.0, 1.1, 2.0, 14.5)
    assert (record["peak_memory_mib"], record["peak_memory_kind"]) == (12.5, "rss_block")
    assert record["model_fingerprint"] == "00ff" and record["extra"] == {} and record["schema_version"] == 1


def test_run_method_records_mean_nll_extra_and_the_model_fingerprint(llama_model, tmp_path):
    """mean_nll is the mean of the written NLLs, the caller's `extra` and the stepper's own report are kept, the
    fingerprint is the model's."""
    def build(model, n_sink, window_size):
        stepper = _streaming()(model, n_sink, window_size)
        stepper.kept_positions = lambda: torch.tensor([0, 1, 5, 6, 7])
        return stepper

    method = Method("reporting", "exact", "streaming that reports what it keeps", build)
    run = _run(llama_model, tmp_path, method, extra={"data_offset": 3})
    record, nlls = read_result(run.json_path)
    assert record["mean_nll"] == pytest.approx(float(nlls.astype(np.float64).mean()), rel=1e-6)
    assert math.exp(record["mean_nll"]) == pytest.approx(record["perplexity"], rel=1e-9)
    assert record["extra"]["data_offset"] == 3 and record["extra"]["final_kept_count"] == 5
    assert record["model_fingerprint"] == model_fingerprint(llama_model)


def test_a_decode_method_records_block_size_1_and_resumes_under_any_requested_block(llama_model, tmp_path):
    """A decode-only method is fed one token a step whatever --block-size says: its record says block_size 1, and
    its checkpoint (same file name) is resumed by a run asked for another block size."""
    decode = Method("decode_only", "decode", "streaming, one token a step", _streaming())

    def interrupt(end, nlls):
        if end >= 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(llama_model, tmp_path, decode, on_block=interrupt, checkpoint_every=4)
    run = _run(llama_model, tmp_path, decode, block_size=16, checkpoint_every=4)
    assert run.record["block_size"] == 1 and run.record["evaluator"] == "decode"
    assert run.record["resumed_from_step"] == 20


def test_a_finished_result_of_another_model_is_refused(llama_model, tmp_path):
    """The same name, another fingerprint: a ValueError instead of the other model's numbers as skipped."""
    first = _run(llama_model, tmp_path)
    record = json.loads(first.json_path.read_text())
    first.json_path.write_text(json.dumps(record | {"model_fingerprint": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="made with another model of the same name"):
        _run(llama_model, tmp_path)


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_model_is_refused_and_an_incomplete_one_named(tmp_path):
    """Load refuses a checkpoint with another fingerprint; a file without its block size is named unreadable."""
    path = tmp_path / "run.checkpoint.npz"
    Checkpoint(path, 8, 16, "f1").maybe_save(16, torch.ones(20))
    with pytest.raises(ValueError, match="made with another model of the same name"):
        Checkpoint(path, 8, 16, "f2").load()
    np.savez(path, nlls=np.ones(16), fingerprint=np.array("f1"))
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        Checkpoint(path, 8, 16, "f1").load()


def test_checkpoint_every_0_never_saves_and_saves_wait_a_whole_interval(tmp_path):
    """every=0: no checkpoint at all; otherwise a save happens once `every` tokens were scored since the last."""
    path = tmp_path / "run.checkpoint.npz"
    Checkpoint(path, 8, 0, "f1").maybe_save(64, torch.ones(64))
    assert not path.exists()
    checkpoint = Checkpoint(path, 8, 16, "f1")
    checkpoint.maybe_save(8, torch.ones(64))
    assert not path.exists()
    checkpoint.maybe_save(16, torch.ones(64))
    checkpoint.maybe_save(24, torch.ones(64))  # 8 after the last save: not yet
    assert Checkpoint(path, 8, 16, "f1").load().shape == (16,)
    checkpoint.maybe_save(32, torch.ones(64))
    assert Checkpoint(path, 8, 16, "f1").load().shape == (32,)


# --- recompute samples -----------------------------------------------------------------------------------------


def test_sample_steps_needs_one_sample():
    with pytest.raises(ValueError, match="need at least one sample"):
        sample_steps(100, 10, 0)
    assert sample_steps(100, 10, 1) == [10]


def test_recompute_sample_writes_nan_off_the_samples_and_counts_sampled_tokens_per_second(llama_model, tmp_path,
                                                                                          monkeypatch):
    """The NLL file holds the oracle's NLLs at the sampled steps and NaN elsewhere; tokens/s counts the sampled
    steps over the (here injected) wall time."""
    clock = iter([10.0, 12.0])
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(clock), process_time=lambda: 0.0)
    monkeypatch.setattr(harness, "time", fake_time)
    ids = random_ids(30, seed=13)[None]
    run = run_recompute_sample(llama_model, ids, num_samples=5, model_name="tiny", data=DATA, n_sink=2, window_size=6,
                               output_dir=tmp_path)
    record, nlls = read_result(run.json_path)
    steps = [8, 13, 18, 23, 28]
    assert record["extra"]["sampled_steps"] == steps and nlls.shape == (29,)
    assert np.isfinite(nlls[steps]).all() and np.isnan(np.delete(nlls, steps)).all()
    assert record["wall_s"] == 2.0 and record["tokens_per_s"] == 2.5
    assert record["mean_nll"] == pytest.approx(float(nlls[steps].astype(np.float64).mean()), rel=1e-6)
    assert record["perplexity"] == pytest.approx(math.exp(record["mean_nll"]), rel=1e-12)


def test_perplexity_at_is_computed_in_float64():
    values = np.array([0.1, 0.25, 0.3, 1e-9])
    assert perplexity_at(values, [0, 2, 3]) == pytest.approx(math.exp((0.1 + 0.3 + 1e-9) / 3), rel=1e-14)


# --- stepper reports -----------------------------------------------------------------------------------------------


def test_stepper_extra_of_a_stepper_that_cannot_say_is_empty():
    """A stepper whose kept_positions fails (any exception), or that has none, reports nothing."""
    class Failing:
        def kept_positions(self):
            raise RuntimeError("no cache yet")

    assert _stepper_extra(Failing()) == {} and _stepper_extra(object()) == {}
    one_head = types.SimpleNamespace(kept_positions=lambda: torch.arange(3))
    assert _stepper_extra(one_head) == {"final_kept_positions_head": [0, 1, 2], "final_kept_count": 3}


def test_callable_stepper_forwards_reset_step_and_kept_positions():
    calls = []

    class StepOnly:
        def reset(self):
            calls.append("reset")

        def step(self, input_ids):
            calls.append(("step", input_ids))
            return "logits"

        def kept_positions(self, *args):
            return ("kept", args)

    stepper = _CallableStepper(StepOnly())
    stepper.reset()
    assert stepper(7) == "logits" and stepper.kept_positions(1) == ("kept", (1,))
    assert calls == ["reset", ("step", 7)]


# --- methods -----------------------------------------------------------------------------------------------------


def test_window_and_recompute_get_the_whole_capacity(llama_model):
    """window: no sinks and a window of n_sink + window_size; recompute re-encodes n_sink + window_size tokens."""
    window = METHODS["window"].build(copy.deepcopy(llama_model), 2, 8)
    assert (window.n_sink, window.window_size) == (0, 10)
    streaming = METHODS["streaming_pos_shift"].build(copy.deepcopy(llama_model), 2, 8)
    assert (streaming.n_sink, streaming.window_size) == (2, 8)
    assert METHODS["recompute"].build(copy.deepcopy(llama_model), 2, 8).capacity == 10


def test_method_labels():
    assert METHODS["recompute"].evaluator(16) == "recompute16" and METHODS["recompute"].block_size(16) == 16
    assert METHODS["dense"].evaluator(1) == "decode" and METHODS["dense"].evaluator(64) == "block64"


def test_get_methods_defaults_blanks_and_nothing():
    """None is the default set; blanks between commas are ignored; nothing at all is an error."""
    assert [m.name for m in get_methods(None)] == list(DEFAULT_METHODS)
    assert [m.name for m in get_methods(" dense, ,mit,")] == ["dense", "mit"]
    for nothing in ("", " , ", []):
        with pytest.raises(ValueError, match="no method given"):
            get_methods(nothing)
    with pytest.raises(ValueError, match="unknown method"):
        get_methods("all,dense")


# --- report ------------------------------------------------------------------------------------------------------


def _result(folder, method, nlls, **fields):
    record = {"model": "m", "data": {"kind": "file"}, "num_tokens": len(nlls) + 1, "n_sink": 1, "window_size": 3,
              "method": method, "evaluator": "decode", "perplexity": 2.0, "tokens_per_s": 12.5, "wall_s": 0.5} | fields
    return write_result(folder, method, record, torch.tensor(nlls, dtype=torch.float32))


def test_report_is_exact_in_float64_and_handles_missing_fields(tmp_path):
    """Segment means are taken in float64 of the stored float32 NLLs; an empty segment has no number; no sample
    steps: no sample column value; a record without extra or peak memory (older files) shows '–'."""
    nlls = [0.1, 0.2, 0.7, 1.3, 0.05, 2.2]
    path = _result(tmp_path, "a", nlls)
    row = summary_rows([path], boundaries=[0, 3, 3, 6])[0]
    stored = np.array(nlls, dtype=np.float32).astype(np.float64)
    assert row["segments"] == {segment_label(0, 3): math.exp(stored[:3].mean()), segment_label(3, 3): None,
                               segment_label(3, 6): math.exp(stored[3:].mean())}
    assert row["ppl_at_recompute_samples"] is None and row["cpu_s"] is None and row["peak_memory_mib"] is None
    assert row["evaluator"] == "decode" and row["wall_s"] == 0.5
    assert markdown_table([row]).splitlines()[-1].endswith("| – | 12.5 | – | – |")
    assert markdown_table([]).splitlines()[1] == "|---|---|---:|---:|---:|---:|---:|---:|"


def test_report_sample_column_at_the_last_step(tmp_path):
    """A sample at the run's last step is in range (nlls.size - 1)."""
    path = _result(tmp_path, "a", [1.0, 2.0, 3.0])
    assert summary_rows([path], [0, 3], sample_steps=[2])[0]["ppl_at_recompute_samples"] == pytest.approx(math.exp(3.0))
    assert summary_rows([path], [0, 3], sample_steps=[3])[0]["ppl_at_recompute_samples"] is None


def test_a_checkpoint_every_token_saves_at_every_token(tmp_path):
    path = tmp_path / "run.checkpoint.npz"
    checkpoint = Checkpoint(path, 1, 1, "f1")
    checkpoint.maybe_save(1, torch.ones(4))
    assert Checkpoint(path, 1, 1, "f1").load().shape == (1,)


def test_run_method_by_default_saves_every_1024_tokens_and_shows_no_bar(llama_model, tmp_path, capsys):
    """The command line relies on these defaults (it passes no checkpoint interval); every argument is passed by
    name."""
    def interrupt(end, nlls):
        if end >= 1024:
            raise KeyboardInterrupt

    method = Method("table", "exact", "a fixed table of logits", lambda model, n_sink, window_size: TableStepper())
    with pytest.raises(KeyboardInterrupt):
        run_method(method=method, model=llama_model, input_ids=(torch.arange(1100) % 16)[None], model_name="tiny-llama",
                   data=DATA, n_sink=2, window_size=8, block_size=512, output_dir=tmp_path, on_block=interrupt)
    (checkpoint,) = tmp_path.glob(f"*{harness.CHECKPOINT_SUFFIX}")
    with np.load(checkpoint) as saved:
        assert saved["nlls"].shape == (1024,)
    assert capsys.readouterr().err == ""


def test_two_samples_are_the_first_and_last_step_past_the_capacity():
    assert sample_steps(30, capacity=8, num_samples=2) == [8, 28]
    assert sample_steps(30, capacity=8, num_samples=1) == [8]


def test_run_recompute_sample_times_its_scoring_shows_no_bar_by_default_and_takes_arguments_by_name(
        llama_model, tmp_path, capsys, monkeypatch):
    wall, cpu = iter([5.0, 5.5]), iter([1.0, 1.25])
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: next(wall),
                                                               process_time=lambda: next(cpu)))
    run = run_recompute_sample(model=llama_model, input_ids=random_ids(30, seed=7)[None], num_samples=3,
                               model_name="tiny-llama", data=DATA, n_sink=2, window_size=6, output_dir=tmp_path)
    assert run.record["extra"]["sampled_steps"] == [8, 18, 28] and run.record["extra"]["cpu_s"] == 0.25
    assert run.record["wall_s"] == 0.5 and run.record["tokens_per_s"] == 6.0
    assert run.record["block_size"] == 8  # the windows batched per forward (recompute_nlls_at's default)
    assert capsys.readouterr().err == ""


def test_a_checkpoint_holding_pickled_objects_is_refused_never_unpickled(tmp_path):
    path = tmp_path / "run.checkpoint.npz"
    np.savez(path, nlls=np.array([1.0, 2.0], dtype=object), block_size=np.int64(8), fingerprint=np.array("f1"),
             tokens_fingerprint=np.array("t1"))
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        Checkpoint(path, 8, 16, "f1", "t1").load()


def test_run_method_records_the_cpu_seconds_of_its_scoring(llama_model, tmp_path, monkeypatch):
    cpu = iter([2.0, 2.75])
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(process_time=lambda: next(cpu)))
    assert _run(llama_model, tmp_path).record["extra"]["cpu_s"] == 0.75


def test_a_recompute_sample_timed_at_zero_seconds_has_infinite_speed(llama_model, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: 5.0, process_time=lambda: 1.0))
    run = run_recompute_sample(llama_model, random_ids(30, seed=7)[None], num_samples=2, model_name="tiny-llama",
                               data=DATA, n_sink=2, window_size=6, output_dir=tmp_path)
    assert run.record["wall_s"] == 0.0 and run.record["tokens_per_s"] == float("inf")


def test_a_registered_method_cannot_be_changed_by_a_caller():
    """METHODS is one registry for every run in the process: a Method is frozen, so no caller can change how another
    run's method is fed or built."""
    import dataclasses

    from streaming_llm.eval.methods import METHODS

    for method in METHODS.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            method.feed = "decode"
