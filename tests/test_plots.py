"""What the figures draw (eval's NLL curves, bench's latency/memory plot), read back from the matplotlib figure."""

from __future__ import annotations

import json
import warnings

import matplotlib
import numpy as np
import pytest
import torch

from streaming_llm import cli
from streaming_llm.bench.plots import plot_latency
from streaming_llm.eval.plots import METHOD_STYLES, moving_average, plot_nll_curves
from streaming_llm.eval.results import write_result

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions close, kept open for inspection."""
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for figure in kept:
        close(figure)


def _result(folder, method, nlls, evaluator="decode", **fields):
    record = {"model": "m", "data": {"name": "d.txt"}, "num_tokens": len(nlls) + 1, "n_sink": 1, "window_size": 3,
              "method": method, "evaluator": evaluator, "perplexity": 2.0, **fields}
    return write_result(folder, f"{method}_{evaluator}", record, torch.tensor(nlls, dtype=torch.float64))


def test_nll_curves_in_a_stable_order_with_the_sampled_oracle_below(tmp_path, figures):
    """Known methods in METHOD_STYLES order, others after them by name; a sampled result (NaN where unscored) is not
    a curve but the reference of a lower panel: each full result's NLL minus it at the sampled steps that the
    result has (x = step + 1, the token scored); a step past a result's end is left out."""
    nlls = {"window": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "zeta": [2.0] * 6, "alpha": [3.0] * 6, "dense": [0.5, 1.0, 1.5, 2.0],
            "recompute": [np.nan, 1.0, np.nan, np.nan, 2.0, np.nan]}
    files = [_result(tmp_path, method, values, **({"extra": {"sampled_steps": [1, 4]}} if method == "recompute" else {}))
             for method, values in nlls.items()]
    empty = _result(tmp_path, "empty", [])
    (tmp_path / "no_nlls.json").write_text(files[1].read_text().replace('"zeta_decode.nlls.npy"', '"missing.npy"'))
    out = plot_nll_curves([*files, empty, tmp_path / "no_nlls.json"], tmp_path / "curves", window=2, capacity=4)
    assert out.read_bytes()[:8] == PNG  # no extension: PNG
    (figure,) = figures
    upper, lower = figure.axes
    assert upper.get_shared_x_axes().joined(upper, lower)
    labels = [line.get_label().split(" ")[0] for line in upper.get_lines() if not line.get_label().startswith("_")]
    assert labels == ["dense", "window", "alpha", "zeta"]
    window_line = upper.get_lines()[1]
    assert window_line.get_label() == "window (ppl 2.00, decode, 7 tok)"
    assert window_line.get_xdata().tolist() == [1, 2, 3, 4, 5, 6]
    assert window_line.get_ydata().tolist() == [1.0, 1.5, 2.5, 3.5, 4.5, 5.5]
    differences = {line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist()) for line in lower.get_lines()
                   if not line.get_label().startswith("_")}
    assert differences == {"dense": ([2], [0.0]), "window": ([2, 5], [1.0, 3.0]), "alpha": ([2, 5], [2.0, 1.0]),
                           "zeta": ([2, 5], [1.0, 0.0])}
    assert upper.get_xlabel() == ""
    assert "2 sampled tokens" in lower.get_ylabel()
    assert _vertical_lines(upper) == _vertical_lines(lower) == [4]  # the longest result (6 steps) passes the capacity


def _vertical_lines(axis) -> list[float]:
    return [line.get_xdata()[0] for line in axis.get_lines() if line.get_label().startswith("_")
            and len(set(line.get_xdata())) == 1 and list(line.get_ydata()) == [0, 1]]


def test_nll_curves_without_a_sampled_result_have_one_panel(tmp_path, figures):
    """Dashed lines where the cache fills up and where the model's trained context ends, if the stream gets there;
    the title names the model, data and cache unless one is given."""
    files = [_result(tmp_path, method, [1.0, 2.0, 3.0, 4.0]) for method in ("dense", "window")]
    plot_nll_curves(files, tmp_path / "curves.png", window=1, capacity=2, context_length=3)
    (axis,) = figures[0].axes
    assert [list(line.get_ydata()) for line in axis.get_lines()][:2] == [[1.0, 2.0, 3.0, 4.0]] * 2
    assert _vertical_lines(axis) == [2, 3] and axis.get_title() == "m on d.txt: n_sink=1, window=3"
    assert [text.get_text() for text in axis.texts] == [" cache capacity", " trained context"]
    assert axis.get_xlabel() == "token index in the stream"
    plot_nll_curves(files, tmp_path / "curves.png", window=1, capacity=4, context_length=4, title="T")
    (axis,) = figures[1].axes
    assert _vertical_lines(axis) == [] and len(axis.texts) == 0 and axis.get_title() == "T"


def _sampled(folder, steps, values, num_tokens=10, **fields):
    """A sampled recompute result as run_recompute_sample writes it: NaN except at the sampled steps."""
    nlls = [float("nan")] * (num_tokens - 1)
    for step, value in zip(steps, values):
        nlls[step] = value
    record = {"model": "m", "data": {"name": "d.txt"}, "num_tokens": num_tokens, "num_predictions": num_tokens - 1,
              "n_sink": 1, "window_size": 3, "method": "recompute", "evaluator": f"sample{len(steps)}", "perplexity": 2.0,
              "extra": {"sampled_steps": steps}, **fields}
    return write_result(folder, f"recompute_sample{len(steps)}", record, torch.tensor(nlls, dtype=torch.float64))


def _plot(capsys, *argv) -> tuple[int, str]:
    status = cli.main(["plot", *map(str, argv)])
    return status, capsys.readouterr().err


def test_sampled_results_alone_are_drawn_as_points(tmp_path, figures):
    """Without a full result beside it, a sampled result (recompute at chosen steps, as `eval --recompute-samples`
    writes it) is drawn on its own: its scored steps as points (x = step + 1), in a figure with a legend. It was an
    empty figure (axes, no curve, matplotlib's "No artists with labels" warning) written with exit status 0."""
    # a perplexity of null is allowed too; an infinite NLL (step 2) is not drawn
    sampled = _sampled(tmp_path, [2, 4, 6, 8], [float("inf"), 1.0, 2.0, 4.0], perplexity=None)
    unscored = _sampled(tmp_path, [], [])  # beside it, a sampled result with no scored step draws nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # not the figure's: matplotlib up to 3.10 calls pyparsing's parseString, which pyparsing 3.3 deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        plot_nll_curves([sampled, unscored], tmp_path / "f.png", window=4, capacity=4)
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG
    (axis,) = figures[0].axes
    (points,) = [line for line in axis.get_lines() if not line.get_label().startswith("_")]
    assert points.get_xdata().tolist() == [5, 7, 9] and points.get_ydata().tolist() == [1.0, 2.0, 4.0]
    assert points.get_marker() == "o" and points.get_color() == METHOD_STYLES["recompute"][0]
    assert points.get_label() == "recompute (ppl n/a, sample4, 3 sampled of 10 tok)"
    assert axis.get_legend() is not None and "sampled" in axis.get_ylabel()
    assert _vertical_lines(axis) == [4]


def test_a_plot_without_data_is_refused_naming_the_files_and_writes_nothing(tmp_path, capsys):
    """Results that give no point to draw (no NLL file, an empty one, a sampled one with no scored step) are refused
    with one line naming them, exit status 2 and no figure: an all-NaN sampled result made an empty figure."""
    nothing = _sampled(tmp_path, [], [])
    empty = _result(tmp_path, "dense", [])
    missing = _result(tmp_path, "window", [1.0, 2.0])
    (tmp_path / "window_decode.nlls.npy").unlink()
    for files in ([nothing], [nothing, empty, missing]):
        status, err = _plot(capsys, *files, "-o", tmp_path / "f.png")
        assert status == 2 and err.count("\n") == 1 and err.startswith("streaming-llm: error: ")
        assert all(str(path) in err for path in files) and "no per-token NLLs to plot" in err
        assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"method": ["a"]}, '(method is ["a"], not a method name)'),  # TypeError: unhashable type: 'list'
    ({"perplexity": "abc"}, '(perplexity is "abc", not a number)'),  # an error naming no file or field
    ({"perplexity": True}, "(perplexity is true, not a number)"),
    ({"num_tokens": "7"}, '(num_tokens is "7", not a token count)'),
    ({"nlls": np.array(["a", "b", "c"])}, "(NLLs in dense_decode.nlls.npy are of type <U1, not floats)"),  # TypeError: isfinite
    ({"nlls": np.ones((3, 2), dtype=np.float32)}, "(NLLs in dense_decode.nlls.npy have shape (3, 2), not one value per token)"),
    ({"nlls": np.ones(5, dtype=np.float32)}, "(NLLs in dense_decode.nlls.npy: 5 values, the record's 4 tokens make 3 predictions)"),
    ({"nlls": np.ones(2, dtype=np.float32)}, "(NLLs in dense_decode.nlls.npy: 2 values, the record's 4 tokens make 3 predictions)"),
    ({"nlls": np.ones(3, dtype=np.int64)}, "(NLLs in dense_decode.nlls.npy are of type int64, not floats)"),
])
def test_a_malformed_result_is_refused_naming_the_file_and_field(tmp_path, capsys, change, message):
    """What the figure reads is checked (method, perplexity, token count, NLL array); a malformed file is refused
    with one line naming it and the field, and no figure. These were tracebacks, an error naming neither, or a
    figure of a 2-D / wrong-length array."""
    good = _result(tmp_path, "window", [1.0, 2.0, 3.0])
    path = _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    if "nlls" in change:
        np.save(tmp_path / "dense_decode.nlls.npy", change.pop("nlls"), allow_pickle=False)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    status, err = _plot(capsys, good, path, "-o", tmp_path / "f.png")
    assert status == 2 and err == f"streaming-llm: error: {path}: not a result file {message}\n"
    assert not (tmp_path / "f.png").exists()


def test_moving_average_of_nothing_and_of_one():
    assert moving_average(np.array([]), 4).tolist() == []
    assert moving_average(np.array([2.0, 4.0]), 5).tolist() == [2.0, 3.0]


def test_latency_plot_draws_every_method_and_the_stream_from_zero(tmp_path, figures):
    rows = [{"method": method, "capacity": capacity, "median_ms": scale * capacity, "p10_ms": 1.0, "p90_ms": 9.0}
            for method, scale in (("streaming", 1.0), ("recompute", 5.0)) for capacity in (64, 32)]
    stream = [{"tokens_streamed": n, "median_ms": 2.0 + n / 1000, "rss_bytes": (100 + n) * 2**20} for n in (10, 1000)]
    plot_latency({"rows": rows, "stream": stream, "shape": "tiny", "dtype": "float32",
                  "environment": {"device": "cpu"}}, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:8] == PNG
    (figure,) = figures
    left, right, memory = figure.axes
    assert [(line.get_label(), line.get_xdata().tolist(), line.get_ydata().tolist()) for line in left.get_lines()] == [
        ("streaming", [32, 64], [32.0, 64.0]), ("recompute", [32, 64], [160.0, 320.0])]
    assert "tiny float32 on cpu" == left.get_title()
    assert right.get_ylim() == pytest.approx((0.0, 1.2 * 3.0))
    assert memory.get_ylim() == pytest.approx((0.0, 1.2 * 1100))
    assert memory.get_lines()[0].get_ydata().tolist() == [110.0, 1100.0]


def test_a_figure_path_that_is_a_symlink_is_written_through_the_link(tmp_path, capsys):
    """`plot -o LINK` writes the figure into the file the link points to, as `>` and cp do; the link stays. The link
    itself was replaced by a new file (and, run as root with stdout in a file, `-o /dev/stdout` replaced the system's
    /dev/stdout link by a PNG)."""
    result = _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    (tmp_path / "figures").mkdir()
    target, link = tmp_path / "figures" / "curves.png", tmp_path / "latest.png"
    target.write_bytes(b"old")
    link.symlink_to(target)
    status, err = _plot(capsys, result, "-o", link)
    assert (status, err) == (0, "")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert target.read_bytes()[:8] == PNG
    assert [path.name for path in (tmp_path / "figures").iterdir()] == ["curves.png"]  # no temporary file left


def test_a_title_that_is_not_utf8_is_refused_and_one_the_locale_could_not_read_is_kept(tmp_path, capsys, figures):
    """--title went to matplotlib as it came from argv: bytes that are not UTF-8 (surrogate escapes) ended in a
    matplotlib TypeError traceback, exit status 1. It is read as --prompt is (cli.require_utf8): not UTF-8 is one line,
    exit status 2, no figure; UTF-8 that a C locale decoded as escapes is the text it is."""
    result = _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    status, err = _plot(capsys, result, "-o", tmp_path / "f.png", "--title", b"\xff\xfe".decode("utf-8", "surrogateescape"))
    assert status == 2 and err == "streaming-llm: error: --title is not UTF-8 text (byte offset 0)\n"
    assert not (tmp_path / "f.png").exists()
    status, err = _plot(capsys, result, "-o", tmp_path / "f.png", "--title", "Café".encode().decode("utf-8", "surrogateescape"))
    assert (status, err) == (0, "") and figures[0].axes[0].get_title() == "Café"


@pytest.mark.parametrize(("name", "shown"), [("d\udcff.txt", "d\\xff.txt"), ("d\ud800.txt", "d\\ud800.txt"),
                                             ("$\\foo$.txt", "\\$\\foo\\$.txt")])
def test_names_from_result_files_are_drawn_whatever_they_hold(tmp_path, figures, name, shown):
    """A data file whose name is not UTF-8 is recorded with lone surrogates ("d\\udcff.txt"), which matplotlib refuses
    (a TypeError traceback from the default title); a name with two '$' was read as math, and "$\\foo$" failed. Names
    from result files are drawn with the bytes as \\xNN escapes and '$' as a '$'."""
    path = _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "data": {"name": name}, "method": f"dense{name}"}))
    plot_nll_curves([path], tmp_path / "f.png", window=1)
    (axis,) = figures[0].axes
    assert axis.get_title() == f"m on {shown}: n_sink=1, window=3"
    assert axis.get_lines()[0].get_label().startswith(f"dense{shown} (ppl")


@pytest.mark.parametrize(("change", "title", "parts", "own_oracle"), [
    ({"window_size": 5}, "m on d.txt: n_sink=1", ("window=3", "window=5"), False),
    ({"n_sink": 2}, "m on d.txt: window=3", ("n_sink=1", "n_sink=2"), False),
    ({"n_sink": 2, "window_size": 2}, "m on d.txt", ("n_sink=1, window=3", "n_sink=2, window=2"), True),  # capacity 4
    ({"model": "m2"}, "d.txt: n_sink=1, window=3", ("m", "m2"), False),
    ({"data": {"name": "e.txt"}}, "m: n_sink=1, window=3", ("d.txt", "e.txt"), False),
    ({"data": {"name": "d.txt", "sha256": "ab" * 32}}, "m: n_sink=1, window=3", ("d", "d-abababab"), False),
    ({"dtype": "bfloat16"}, "m on d.txt: n_sink=1, window=3", (), False),
])
def test_results_of_several_configurations_are_told_apart(tmp_path, figures, change, title, parts, own_oracle):
    """Results of two configurations in one figure (two `eval --output-dir out` runs at two window sizes, or of two
    models) were drawn under identical labels, with a title taken from the first result, and every curve minus the
    first sampled recompute result, whatever its model, text or cache. Each label now carries the settings that differ
    among the results (the dtype already did), the line style tells the configurations apart, the title states only
    what they all share, and a curve is compared with a sampled recompute of its own model, dtype, text and cache
    capacity (n_sink + window_size, all that recompute depends on) or with none."""
    def result(method, **fields):
        record = {"model": "m", "data": {"name": "d.txt"}, "num_tokens": 10, "n_sink": 1, "window_size": 3,
                  "method": method, "evaluator": "decode", "perplexity": 2.0, **fields}
        stem = f"{method}_{len(list(tmp_path.glob('*.json')))}"
        return write_result(tmp_path, stem, record, torch.tensor([1.0] * 9 if method == "window" else [2.0] * 9))

    files = [result("window", **change), result("dense"), result("window"), result("dense", **change),
             _sampled(tmp_path, [2, 5], [0.5, 0.5])]
    plot_nll_curves(files, tmp_path / "f.png", window=1)
    upper, lower = figures[0].axes
    lines = [line for line in upper.get_lines() if not line.get_label().startswith("_")]
    labels = [line.get_label().split(" (ppl")[0] for line in lines]
    if parts:
        assert labels == [f"{method} [{part}]" for method in ("dense", "window") for part in parts]
        assert [line.get_linestyle() for line in lines] == ["-", "--"] * 2
    else:
        assert labels == ["dense", "dense bfloat16", "window", "window bfloat16"]
    assert upper.get_title() == title
    compared = {line.get_label() for line in lower.get_lines() if not line.get_label().startswith("_")}
    assert compared == ({*labels} if own_oracle else {labels[0], labels[2]})
    assert all(line.get_ydata().tolist() == ([1.5, 1.5] if line.get_label().startswith("dense") else [0.5, 0.5])
               for line in lower.get_lines() if not line.get_label().startswith("_"))


def test_a_sampled_result_no_curve_shares_a_configuration_with_is_drawn_as_points(tmp_path, figures):
    """A sampled recompute of another configuration than every full result (window 5 beside results of window 3)
    was the oracle of none and was drawn nowhere, while `plot --json` listed it among the results drawn. It is drawn
    as its points, as where there are no full results, and there is no lower panel."""
    full = _result(tmp_path, "dense", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    sampled = _sampled(tmp_path, [2, 5], [0.5, 0.25], window_size=5)
    plot_nll_curves([full, sampled], tmp_path / "f.png", window=1)
    (axis,) = figures[0].axes
    lines = [line for line in axis.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label().split(" (")[0] for line in lines] == ["dense [window=3]", "recompute [window=5]"]
    assert lines[1].get_xdata().tolist() == [3, 6] and lines[1].get_ydata().tolist() == [0.5, 0.25]


def test_a_result_whose_nll_file_is_missing_is_named_and_left_out_of_the_json(tmp_path, capsys, figures):
    """A result JSON without its .nlls.npy was left out of the figure without a word, while `plot --json` listed it
    among the results drawn. It still has no curve (as it has no numbers in the table), but a line on stderr names it
    and --json lists only the results drawn, each once (a file given twice, or with its folder, was listed twice)."""
    good = _result(tmp_path, "dense", [1.0, 2.0, 3.0])
    missing = _result(tmp_path, "window", [1.0, 2.0, 3.0])
    (tmp_path / "window_decode.nlls.npy").unlink()
    status = cli.main(["plot", str(good), str(tmp_path), "-o", str(tmp_path / "f.png"), "--json"])
    out, err = capsys.readouterr()
    assert status == 0 and err == f"plot: leaving out {missing}: its NLL file window_decode.nlls.npy is missing\n"
    assert json.loads(out) == {"figure": str(tmp_path / "f.png"), "results": [str(good)]}
    assert [line.get_label().split(" ")[0] for line in figures[0].axes[0].get_lines()] == ["dense"]


def test_a_full_result_with_a_non_finite_nll_is_a_curve_not_an_oracle(tmp_path, figures):
    """A result is sampled when it says so (extra.sampled_steps), not when an NLL is not finite: a dense result with
    one infinite NLL (a float16 overflow) was taken for a sampled recompute, drawn as points and made the oracle of
    the lower panel, every other curve drawn as its difference from it."""
    overflowed = _result(tmp_path, "dense", [1.0, float("inf"), 3.0, 4.0])
    window = _result(tmp_path, "window", [1.0, 2.0, 3.0, 4.0])
    plot_nll_curves([overflowed, window], tmp_path / "f.png", window=1)
    (axis,) = figures[0].axes  # no lower panel
    lines = [line for line in axis.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["dense (ppl 2.00, decode, 5 tok)", "window (ppl 2.00, decode, 5 tok)"]
    assert lines[0].get_xdata().tolist() == [1, 2, 3, 4] and lines[0].get_marker() == "None"


def test_a_latency_plot_without_a_stream_is_one_panel_over_powers_of_two(tmp_path, figures):
    """bench without --stream-tokens: the latency panel alone (no empty second one), its cache-size axis in base 2,
    where the sizes bench measures (256, 512, ...) fall on the ticks."""
    rows = [{"method": "streaming", "capacity": capacity, "median_ms": 1.0, "p10_ms": 0.5, "p90_ms": 2.0}
            for capacity in (256, 1024)]
    plot_latency({"rows": rows, "stream": [], "shape": "tiny", "dtype": "float32", "environment": {"device": "cpu"}},
                 tmp_path / "latency.png")
    (figure,) = figures
    (left,) = figure.axes
    assert left.get_xscale() == "log" and left.xaxis.get_transform().base == 2
