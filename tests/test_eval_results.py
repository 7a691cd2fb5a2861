"""Result files: deterministic names, atomic writes, skip on re-run, nothing left by an interrupted run, plots."""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import pytest
import torch

from streaming_llm.eval.command import format_table, register, run_plot
from streaming_llm.eval.harness import run_method
from streaming_llm.eval.methods import METHODS
from streaming_llm.eval.plots import moving_average
from streaming_llm.eval.results import list_results, read_result, result_stem, write_result
from tiny_models import random_ids

DATA = {"name": "random", "kind": "test", "sha256": "0123456789abcdef"}


def _run(model, tmp_path, method_name="streaming_pos_shift", force=False, on_block=None, num_tokens=30):
    return run_method(
        METHODS[method_name],
        copy.deepcopy(model),
        random_ids(num_tokens, seed=7)[None],
        model_name="tiny-llama",
        data=DATA,
        n_sink=2,
        window_size=8,
        block_size=8,
        output_dir=tmp_path,
        force=force,
        on_block=on_block,
    )


def test_result_json_and_nlls_are_written(llama_model, tmp_path):
    run = _run(llama_model, tmp_path)
    assert not run.skipped
    assert run.json_path.name == "tiny-llama__random-01234567__T30__s2_w8__streaming_pos_shift__block8.json"
    record, nlls = read_result(run.json_path)
    assert nlls.shape == (29,) and nlls.dtype == np.float32
    assert record["perplexity"] == pytest.approx(float(np.exp(nlls.astype(np.float64).mean())), rel=1e-6)
    for key in ("model", "data", "num_tokens", "n_sink", "window_size", "method", "evaluator", "block_size",
                "perplexity", "tokens_per_s", "wall_s", "peak_memory_mib", "versions", "git_commit", "device"):
        assert key in record, key
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert record["peak_memory_mib"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [run.json_path.name, run.json_path.name[:-5] + ".nlls.npy"]


def test_rerun_is_skipped_unless_forced(llama_model, tmp_path):
    first = _run(llama_model, tmp_path)
    again = _run(llama_model, tmp_path)
    assert again.skipped and again.record == json.loads(first.json_path.read_text())
    forced = _run(llama_model, tmp_path, force=True)
    assert not forced.skipped and forced.record["finished_at"] >= first.record["finished_at"]


def test_interrupted_run_leaves_no_results_file(llama_model, tmp_path):
    def interrupt(end, nlls):
        if end >= 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(llama_model, tmp_path, on_block=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_write_result_failure_leaves_no_file(tmp_path):
    """A record that cannot be serialised fails before the JSON exists; no temporary file stays behind."""
    with pytest.raises(TypeError):
        write_result(tmp_path, "stem", {"bad": object()}, torch.zeros(3))
    assert not (tmp_path / "stem.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_run_in_another_dtype_is_not_taken_for_the_float32_one(llama_model, tmp_path):
    """Same model, text and method in bfloat16: its own result (and checkpoint), not the float32 run skipped."""
    float32 = _run(llama_model, tmp_path)
    bfloat16 = run_method(METHODS["streaming_pos_shift"], copy.deepcopy(llama_model).to(torch.bfloat16),
                          random_ids(30, seed=7)[None], model_name="tiny-llama", data=DATA, n_sink=2, window_size=8,
                          block_size=8, output_dir=tmp_path, dtype="bfloat16")
    assert not bfloat16.skipped and bfloat16.json_path.name.endswith("__block8__bfloat16.json")
    assert bfloat16.record["dtype"] == "bfloat16" and bfloat16.record["perplexity"] != float32.record["perplexity"]
    assert _run(llama_model, tmp_path).skipped


def test_stem_is_deterministic_and_safe():
    stem = result_stem("my model/v1", DATA, 100, 4, 1020, "dense", "block256")
    assert stem == result_stem("my model/v1", DATA, 100, 4, 1020, "dense", "block256")
    assert "/" not in stem and " " not in stem


def test_plot_file_is_produced(llama_model, tmp_path):
    for name in ("dense", "window", "streaming_pos_shift"):
        _run(llama_model, tmp_path, method_name=name)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    png = tmp_path / "curves.png"
    args = parser.parse_args(["plot", str(tmp_path), "--output", str(png), "--smooth", "4"])
    assert args.handler is run_plot
    assert args.handler(args) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table([read_result(path)[0] for path in list_results(tmp_path)])
    assert table.count("\n") == 4 and "streaming_pos_shift" in table


def test_plot_of_nothing_is_a_clear_error(tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["plot", str(tmp_path)])
    with pytest.raises(ValueError, match="no result JSON"):
        args.handler(args)


def test_moving_average():
    values = np.array([1.0, 3.0, 5.0, 7.0])
    assert moving_average(values, 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    assert moving_average(values, 1).tolist() == values.tolist()
