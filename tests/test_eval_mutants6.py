"""Gaps the sixth mutation round found in eval/kvpress_compare.py and eval/command.py (docs/reliability.md §8)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import test_plots
import torch
from test_cli import assert_one_line_error, run_main, tiny_checkpoint
from test_plots import _result, _sampled
from tiny_models import build_llama_family, random_ids

from streaming_llm.eval import kvpress_compare
from streaming_llm.eval.plots import moving_average, plot_nll_curves

figures = test_plots.figures  # the fixture: the figures plot_nll_curves closes, kept open


def test_kept_stream_positions_of_a_context_that_fits_are_all_of_them():
    """StreamingLLM keeps a context no longer than n_sink + window_size whole; past it, the sinks and the last window."""
    assert torch.equal(kvpress_compare.kept_stream_positions(5, 2, 6), torch.arange(5))
    assert torch.equal(kvpress_compare.kept_stream_positions(8, 2, 6), torch.arange(8))
    assert kvpress_compare.kept_stream_positions(12, 2, 6).tolist() == [0, 1, 6, 7, 8, 9, 10, 11]


def test_the_rerotation_timing_is_the_median_of_the_timed_calls(monkeypatch):
    """One untimed warm-up call, then `repeats` timed ones; the median of their durations (a fake clock)."""
    ticks = iter([10.0, 10.5, 20.0, 20.1, 30.0, 30.3])
    monkeypatch.setattr(kvpress_compare, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    calls = []
    assert kvpress_compare._median_seconds(lambda: calls.append(None), 3) == pytest.approx(0.3)
    assert len(calls) == 4


def test_the_layer0_comparison_sees_a_streamed_key_that_is_off(llama_model, monkeypatch):
    """The layer-0 keys of our streaming cache are compared with kvpress's by their largest difference: one feature of
    one kept key off by 0.1 is reported as 0.1 in both storing modes. Without timing_repeats the rerotations are timed
    20 times, as eval_kvpress.py's --timing-repeats default."""
    pytest.importorskip("kvpress")
    from streaming_llm.cache import StreamingKVCache

    compress = StreamingKVCache.compress

    def off_compress(self, layer_idx=0):
        keys, values = compress(self, layer_idx)
        keys = keys.clone()
        keys[..., 3, 0] += 0.1
        return keys, values

    monkeypatch.setattr(StreamingKVCache, "compress", off_compress)
    ids = random_ids(52, seed=12)[None]
    report = kvpress_compare.compare_prefill_protocol(copy.deepcopy(llama_model), ids, 40, 12, 2, 8)
    for mode in ("rerotate", "pos_shift"):
        layer0 = report["keys"]["layer0_streaming_cache_compress"][mode]
        assert layer0["kept_positions_equal"]
        assert layer0["max_abs_delta_keys_vs_kvpress"] == pytest.approx(0.1, abs=1e-5)
    assert report["rerotation_timing"]["repeats"] == 20


def test_the_comparison_reports_the_largest_key_and_nlls_to_six_decimals(llama_model):
    """max_abs_key, the scale the key differences are read against, is the largest |key| kvpress keeps in any layer;
    the per-token NLLs are written rounded to 6 decimals."""
    pytest.importorskip("kvpress")
    from streaming_llm.eval.kvpress_adapters import kvpress_prefill_compress

    ids = random_ids(52, seed=12)[None]
    report = kvpress_compare.compare_prefill_protocol(copy.deepcopy(llama_model), ids, 40, 12, 2, 8, timing_repeats=1)
    layers = kvpress_prefill_compress(copy.deepcopy(llama_model), ids[:, :40], 2, 8).cache.layers
    per_layer = [float(layer.keys.abs().max()) for layer in layers]
    assert per_layer[0] != per_layer[1]
    assert report["keys"]["max_abs_key"] == max(per_layer)
    nlls = report["continuation_nlls"]
    assert set(nlls) == {"kvpress_rerotate", "kvpress_no_rerotate", "dense", "ours_same_protocol", "ours_streaming"}
    for values in nlls.values():
        assert len(values) == 12 and all(value == round(value, 6) for value in values)
    assert any(value != round(value, 5) for values in nlls.values() for value in values)


def test_the_layer0_comparison_reads_layer_0_of_a_hybrid_model():
    """A Qwen2 whose second layer slides within 6 at capacity 10: that layer keeps other positions than layer 0, which
    the layer-0 comparison is about (its kept positions equal kvpress's)."""
    pytest.importorskip("kvpress")
    model = build_llama_family("qwen2", sliding_window=6, use_sliding_window=True, max_window_layers=1)
    report = kvpress_compare.compare_prefill_protocol(model, random_ids(52, seed=1)[None], 40, 12, 2, 8, timing_repeats=1)
    for mode in ("rerotate", "pos_shift"):
        assert report["keys"]["layer0_streaming_cache_compress"][mode]["kept_positions_equal"], mode


def test_the_smallest_accepted_eval_counts_pass_the_usage_checks(tmp_path, capsys):
    """--num-tokens, --recompute-tokens and --decode-tokens of 2, --block-size 1 (the decode loop) and
    --recompute-samples 1 pass the bounds: the next check (an unknown method) answers."""
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"),
            "--num-tokens", "2", "--recompute-tokens", "2", "--decode-tokens", "2", "--block-size", "1",
            "--recompute-samples", "1", "--methods", "no_such_method"]
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, "unknown method(s) no_such_method")


@pytest.mark.parametrize("option", ["--block-size", "--recompute-samples"])
def test_an_eval_count_of_zero_is_refused(tmp_path, capsys, option):
    argv = ["eval", "--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out"), option, "0",
            "--methods", "no_such_method"]
    status, _, err = run_main(capsys, *argv)
    assert_one_line_error(status, err, f"{option} must be >= 1, got 0")


def test_a_sampled_recompute_run_first_is_reported_as_it_is_written(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """On a terminal each result is reported when it is written, also a sampled recompute that is the first run."""
    from test_eval_command import STREAM

    from streaming_llm import cli_common

    monkeypatch.setattr(cli_common, "show_progress", lambda args: True)
    argv = ["eval", "--model", str(tiny_checkpoint(tmp_path_factory)), *STREAM, "--methods", "recompute,dense",
            "--recompute-samples", "3", "--output-dir", str(tmp_path / "out")]
    status, out, err = run_main(capsys, *argv)
    runs = json.loads(out)["results"]
    assert status == 0 and [(run["method"], run["evaluator"]) for run in runs] == [("recompute", "sample3"),
                                                                                    ("dense", "block32")]
    reported = [line.split(" -> ")[1] for line in err.splitlines() if ": ppl " in line]
    assert reported == [run["json_path"] for run in runs]


def test_the_eval_table_has_as_many_columns_in_every_line():
    """The markdown table `eval` prints without --json: its separator has the header's seven columns, as each row."""
    from streaming_llm.eval.command import format_table

    record = {"method": "dense", "evaluator": "block32", "num_tokens": 120, "perplexity": 2.0, "tokens_per_s": 10.0,
              "wall_s": 1.0, "peak_memory_mib": None}
    lines = format_table([record, {**record, "method": "window", "peak_memory_mib": 12.0}]).splitlines()
    assert len(lines) == 4 and lines[1] == "|---|---|---|---|---|---|---|"
    assert {line.count("|") for line in lines} == {8}


def test_plot_called_without_a_json_option_prints_the_figure_path(tmp_path, capsys):
    """run_plot from a parser that has no --json (registered elsewhere than the CLI) prints the figure's path."""
    import argparse

    from streaming_llm.eval.command import register

    _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["plot", str(tmp_path), "--output", str(tmp_path / "f.png"), "--smooth", "1"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'f.png'}\n"


def test_the_committed_bos_results_are_the_eval_defaults():
    """docs/evaluation.md: results/bos is `streaming-llm eval --bos no --output-dir results/bos`, every other option on
    its default; its results hold the default methods, stream length, cache and block size."""
    from test_committed_results import RESULTS

    from streaming_llm import cli
    from streaming_llm.eval.methods import DEFAULT_METHODS
    from streaming_llm.eval.results import read_result

    args = cli.build_parser().parse_args(["eval", "--bos", "no", "--output-dir", "results/bos"])
    records = [read_result(path)[0] for path in sorted((RESULTS / "bos").glob("*.json"))]
    assert sorted(record["method"] for record in records) == sorted(DEFAULT_METHODS) == sorted(args.methods.split(","))
    for record in records:
        assert (record["num_tokens"], record["n_sink"], record["window_size"], record["evaluator"]) == (
            args.num_tokens, args.n_sink, args.window_size, f"block{args.block_size}"), record["method"]


def test_a_moving_average_over_one_token_is_the_values_themselves():
    """--smooth 1 draws the NLLs as they are: not through differences of a running sum, which round 0.2 to
    0.20000000000000004."""
    values = np.array([0.1, 0.2, 0.3, 0.7])
    assert moving_average(values, 1).tolist() == values.tolist()
    assert moving_average(values, 2).tolist() == pytest.approx([0.1, 0.15, 0.25, 0.5])


def test_eval_plot_smooths_as_plot_does_by_default(tmp_path, figures):
    """`eval --plot` draws with plot_nll_curves' default width, which is `plot --smooth`'s default."""
    from streaming_llm import cli

    nlls = [float(step % 7) for step in range(299)]
    plot_nll_curves([_result(tmp_path, "dense", nlls)], tmp_path / "f.png")
    smooth = cli.build_parser().parse_args(["plot"]).smooth
    (line,) = figures[0].axes[0].get_lines()
    assert line.get_ydata().tolist() == moving_average(np.array(nlls), smooth).tolist()
    assert f"moving average over {smooth} tokens" in figures[0].axes[0].get_ylabel()


def test_one_configuration_keeps_each_methods_line_style(tmp_path, figures):
    """Line styles tell configurations apart only where there are several; with one, each method keeps its own."""
    files = [_result(tmp_path, method, [1.0, 2.0, 3.0]) for method in ("streaming_rerotate", "mit", "dense")]
    plot_nll_curves(files, tmp_path / "f.png", window=1)
    styles = {line.get_label().split(" ")[0]: line.get_linestyle() for line in figures[0].axes[0].get_lines()}
    assert styles == {"dense": "-", "streaming_rerotate": "--", "mit": ":"}


def test_the_lower_panel_draws_each_configuration_in_its_line_style(tmp_path, figures):
    """Two configurations of one capacity (n_sink 1 + window 3, n_sink 2 + window 2) share a sampled recompute: their
    differences from it are drawn in the configurations' line styles, as their curves are."""
    files = [_result(tmp_path, "dense", [2.0] * 9), _result(tmp_path, "window", [1.0] * 9, n_sink=2, window_size=2),
             _sampled(tmp_path, [2, 5], [0.5, 0.5])]
    plot_nll_curves(files, tmp_path / "f.png", window=1)
    upper, lower = figures[0].axes
    drawn = [line for line in upper.get_lines() if not line.get_label().startswith("_")]
    compared = [line for line in lower.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_linestyle() for line in drawn] == ["-", "--"]
    assert [(line.get_label(), line.get_linestyle()) for line in compared] == [
        (drawn[0].get_label().split(" (ppl")[0], "-"), (drawn[1].get_label().split(" (ppl")[0], "--")]
