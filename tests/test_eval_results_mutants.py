"""Behaviour of streaming_llm/eval/results.py that no other test pinned down (found by mutation testing): where a long
result name is cut, an output folder that already exists, the exact text of a result file, and the refusals of
check_result_fields at each field's limit. Everything is checked on exact values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streaming_llm.eval import results
from streaming_llm.eval.results import prepare_output_dir, read_result, result_stem, write_json_atomically, write_result
from test_eval_results import git

DATA = {"name": "random", "kind": "test", "sha256": "0123456789abcdef"}


# --- long names ------------------------------------------------------------------------------------------------


def _stem_of_length(length: int) -> tuple[str, str]:
    """(model name, its result stem) where the stem, whole, has `length` characters; the model name is one slug."""
    rest = len(result_stem("", DATA, 100, 4, 60, "dense", "block8"))  # (an empty name is slugged to "none")
    model_name = "m" * (length - rest + len("none"))
    return model_name, result_stem(model_name, DATA, 100, 4, 60, "dense", "block8")


def test_a_result_name_is_kept_whole_up_to_the_longest_a_checkpoints_temporary_file_allows():
    """The checkpoint's temporary file, ".<stem>.checkpoint.npz.<pid>.tmp" with the largest pid Linux gives, must fit
    a file name's 255 bytes: a stem of 227 characters is kept whole (earlier results keep their names), one of 228 is
    cut, each long part to 64 characters."""
    model_name, stem = _stem_of_length(227)
    assert len(stem) == 227 and stem.startswith(model_name + "__")
    assert len(f".{stem}.checkpoint.npz.4194304.tmp") == 255
    model_name, stem = _stem_of_length(228)
    assert len(model_name) > 64 and len(stem) < 228
    assert stem.split("__")[0] == model_name[:47] + "-" + results.hashlib.sha256(model_name.encode()).hexdigest()[:16]


def test_a_cut_name_keeps_parts_of_64_characters_and_cuts_longer_ones_to_64():
    parts = {length: "p" * length for length in (64, 65, 300)}
    cut = {length: results._fitting(part) for length, part in parts.items()}
    assert cut[64] == parts[64]
    assert len(cut[65]) == len(cut[300]) == 64 and cut[65] != cut[300]
    assert cut[65] == "p" * 47 + "-" + results.hashlib.sha256(parts[65].encode()).hexdigest()[:16]


# --- output folders ----------------------------------------------------------------------------------------------


def test_an_output_folder_that_exists_is_taken_as_it_is(tmp_path):
    """The usual case (results/ already there, with earlier results in it): checked, not refused, left untouched."""
    (tmp_path / "earlier.json").write_text("{}")
    assert prepare_output_dir(tmp_path) == tmp_path
    assert [path.name for path in tmp_path.iterdir()] == ["earlier.json"]


# --- the text of a result file -----------------------------------------------------------------------------------


def test_a_result_json_is_indented_by_two_in_the_records_order_and_ends_with_a_newline(tmp_path):
    """Committed results are read and diffed by people: the record's own order (build_record's, not sorted), two
    spaces, one newline at the end; likewise for summaries."""
    record = {"model": "m", "data": DATA, "extra": {"b": 1, "a": [2]}}
    json_path = write_result(tmp_path, "stem", record, torch.tensor([0.5]))
    expected = dict(record, nlls_file="stem.nlls.npy")
    assert json_path.read_text() == json.dumps(expected, indent=2) + "\n"
    assert json_path.read_text().startswith('{\n  "model": "m",\n  "data": {\n    "name": "random",')
    assert list(json.loads(json_path.read_text())) == ["model", "data", "extra", "nlls_file"]
    summary = write_json_atomically(tmp_path / "summary.json", {"z": [1], "a": 2})
    assert summary.read_text() == '{\n  "z": [\n    1\n  ],\n  "a": 2\n}\n'


# --- what read_result accepts at each field's limit --------------------------------------------------------------


def _record(**fields) -> dict:
    return {"model": "m", "data": {"kind": "file"}, "num_tokens": 9, "n_sink": 1, "window_size": 3, "method": "dense",
            "evaluator": "decode", "perplexity": 1.0} | fields


def test_a_one_token_result_without_num_predictions_makes_none(tmp_path):
    """A record without num_predictions (hand-written, or older) makes num_tokens - 1 predictions, and none for a
    stream of one token: its empty NLL file is read, and no step of it can have been sampled."""
    path = write_result(tmp_path, "one", _record(num_tokens=1), torch.zeros(0))
    record, nlls = read_result(path)
    assert "num_predictions" not in record and nlls.shape == (0,)
    path.write_text(json.dumps(record | {"extra": {"sampled_steps": [0]}}))
    with pytest.raises(ValueError) as error:
        read_result(path)
    assert str(error.value) == f"{path}: not a result file (extra.sampled_steps is [0], not a list of steps below 0)"


def test_a_prefix_fingerprint_of_the_first_token_is_accepted():
    """tokens_prefix_fingerprints may hold any prefix length from 1 below num_tokens (eval writes 16, 32, ...)."""
    fingerprint = "0123456789abcdef"
    results.check_result_fields("r.json", _record(tokens_prefix_fingerprints={"1": fingerprint, "8": fingerprint}),
                                np.zeros(8, np.float32))


# --- the model fingerprint ---------------------------------------------------------------------------------------


class _OneParameter(torch.nn.Module):
    """The least a fingerprint reads: a config and one flat parameter of `size` zeros."""

    def __init__(self, size: int):
        from transformers import PretrainedConfig

        super().__init__()
        self.config = PretrainedConfig()
        self.weight = torch.nn.Parameter(torch.zeros(size))


def _fingerprint_after_change(size: int, index: int) -> tuple[str, str]:
    model = _OneParameter(size)
    before = results.model_fingerprint(model)
    with torch.no_grad():
        model.weight[index] = 1.0
    return before, results.model_fingerprint(model)


def test_a_fingerprint_hashes_the_first_and_last_1024_values_of_a_parameter_and_only_them():
    """Up to 2,048 values every value is hashed; past that the first and last 1,024 only, so that a change in between
    (index 1,024 of 2,049 values) leaves the fingerprint as it was (the documented cost bound), and a change at either
    end of the middle does not."""
    before, after = _fingerprint_after_change(2048, 1024)
    assert before != after
    for index in (1023, 1025):
        before, after = _fingerprint_after_change(2049, index)
        assert before != after, index
    before, after = _fingerprint_after_change(2049, 1024)
    assert before == after


def test_a_fingerprint_does_not_depend_on_the_order_of_the_config_fields(llama_model):
    """The config is hashed with its keys sorted: a config.json written in another order (another transformers
    version, a hand edit) is the same model."""
    import copy

    first, second = copy.deepcopy(llama_model), copy.deepcopy(llama_model)
    first.config.alpha, first.config.beta = 1, 2
    second.config.beta, second.config.alpha = 2, 1
    assert list(first.config.to_dict()).index("alpha") < list(first.config.to_dict()).index("beta")
    assert list(second.config.to_dict()).index("beta") < list(second.config.to_dict()).index("alpha")
    assert results.model_fingerprint(first) == results.model_fingerprint(second)


# --- what a record says about where it was made -------------------------------------------------------------------


def test_a_repository_without_a_commit_has_no_commit_to_record(tmp_path):
    """`git rev-parse HEAD` fails there (and prints "HEAD"): the record says null, not "HEAD+dirty"."""
    (tmp_path / "f.txt").write_text("a")
    git(tmp_path, ["init", "-q"], ["add", "f.txt"])
    assert results.git_commit(tmp_path) is None


def test_git_commit_prints_nothing_of_gits_own_output(tmp_path, capfd):
    """The git commands' output and errors (a file list, "did not match any file(s) known to git") are read, never
    shown to the user of eval."""
    (tmp_path / ".gitignore").write_text("untracked/\n")
    (tmp_path / "untracked").mkdir()
    git(tmp_path, ["init", "-q"], ["add", ".gitignore"], ["commit", "-q", "-m", "x"])
    capfd.readouterr()
    assert results.git_commit(tmp_path) is not None and results.git_commit(tmp_path / "untracked") is None
    assert capfd.readouterr() == ("", "")


def test_the_device_of_a_cpu_run_on_a_machine_with_a_gpu_is_the_cpu(monkeypatch):
    """Only a cuda device is described by the GPU's name; a CPU run on a GPU machine describes the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Fake GPU")
    assert results.device_description("cuda:0") == "cuda:0 (Fake GPU)"
    description = results.device_description("cpu")
    assert description.startswith("cpu (") and "Fake GPU" not in description


def test_the_cuda_peak_is_the_allocators_peak_in_mib(monkeypatch):
    """PeakMemory on CUDA resets torch's peak on entry and reads max_memory_allocated (bytes) as MiB on exit."""
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20 + 2**19)
    with results.PeakMemory("cuda:0") as peak:
        assert resets == ["cuda:0"]
    assert peak.peak_mib == 3.5 and peak.kind == "cuda_max_memory_allocated"
