"""Figures from result files: NLL over the stream, every method on one figure (matplotlib, Agg, PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from streaming_llm.eval.results import atomic_write, check_comparable_results, read_result

# Stable colours and order, so figures from different runs read alike.
METHOD_STYLES = {
    "dense": ("tab:red", "-"),
    "window": ("tab:orange", "-"),
    "streaming_pos_shift": ("tab:blue", "-"),
    "streaming_rerotate": ("tab:cyan", "--"),
    "streaming_absolute": ("tab:purple", "-"),
    "mit": ("tab:green", ":"),
    "recompute": ("black", "-"),
    "kvpress_decode_shipped": ("tab:brown", "-"),
    "kvpress_decode_corrected": ("tab:pink", "--"),
}


def figure_format(path: str | os.PathLike) -> str:
    """The file format a figure path asks for: its extension if matplotlib writes it (png, pdf, svg, ...), png
    without one; ValueError otherwise."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise ValueError(f"{path}: matplotlib cannot write .{suffix} figures; use one of {', '.join(sorted(supported))}")
    return suffix or "png"


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), same length as `values`."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def _method_text(record: dict) -> str:
    """The method, with the dtype where it is not float32 ("dense bfloat16"): one folder may hold both."""
    dtype = record.get("dtype", "float32")
    return record["method"] if dtype == "float32" else f"{record['method']} {dtype}"


def _shown(text) -> str:
    """`text` read from a result file as matplotlib can draw it: lone surrogates (how Python carries a name that
    was not UTF-8, such as a data file's) as \\xNN escapes, since matplotlib refuses them, and '$' escaped, since
    matplotlib would read "$...$" as math and fail on most names."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no undecodable byte gives ("\\ud800" in JSON)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("$", r"\$")


def _perplexity_text(record: dict) -> str:
    perplexity = record["perplexity"]
    return "n/a" if perplexity is None else f"{perplexity:.2f}"


def plot_nll_curves(
    result_files: list[str | os.PathLike],
    output_path: str | os.PathLike,
    window: int = 256,
    title: str | None = None,
    capacity: int | None = None,
    context_length: int | None = None,
) -> Path:
    """One PNG with the moving-average NLL (log-scale y) of every result against the token index; when a
    sampled result (recompute at chosen steps) is among them, a lower panel shows every method's NLL minus it
    at those steps.

    result_files: result JSONs (their .nlls.npy next to them); window: moving-average width in tokens;
    capacity / context_length: draw vertical lines at the cache capacity and the model's trained context.
    Returns the PNG path. ValueError for results of one model and text scored on different token streams, or of
    two models of one name (check_comparable_results): their curves would be drawn as if they were comparable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [(path, *read_result(path)) for path in result_files]
    check_comparable_results([(path, record) for path, record, _ in results])
    curves = []  # (record, nlls); a sampled result holds NaN at the steps it did not score
    for _, record, nlls in results:
        if nlls is None or nlls.size == 0:
            continue
        curves.append((record, nlls.astype(np.float64)))
    order = list(METHOD_STYLES)
    curves.sort(key=lambda item: (order.index(item[0]["method"]) if item[0]["method"] in order else len(order), item[0]["method"]))

    full = [(record, nlls) for record, nlls in curves if np.isfinite(nlls).all()]
    sampled = [(record, nlls) for record, nlls in curves if not np.isfinite(nlls).all()]
    if not full and not any(np.isfinite(nlls).any() for _, nlls in sampled):
        names = ", ".join(str(path) for path in result_files)
        raise ValueError(f"{names}: no per-token NLLs to plot (each NLL file is missing, empty or holds no finite value)")
    if sampled and full:
        figure, (axis, lower) = plt.subplots(2, 1, figsize=(10, 7.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    else:
        figure, axis = plt.subplots(figsize=(10, 5.5), dpi=110)
        lower = None
    for record, nlls in full:
        color, style = METHOD_STYLES.get(record["method"], (None, "-"))
        steps = np.arange(1, nlls.size + 1)  # nlls[t] scores token t+1
        label = f"{_method_text(record)} (ppl {_perplexity_text(record)}, {record['evaluator']}, {record['num_tokens']} tok)"
        axis.plot(steps, moving_average(nlls, window), color=color, linestyle=style, linewidth=1.3, label=_shown(label))
    if not full:
        # Sampled results alone (recompute at chosen steps): too sparse for a moving average, so their scored
        # steps are drawn as points (x = step + 1, the token scored).
        for record, nlls in sampled:
            scored = np.flatnonzero(np.isfinite(nlls))
            if scored.size == 0:
                continue
            color, _ = METHOD_STYLES.get(record["method"], (None, "-"))
            label = (f"{_method_text(record)} (ppl {_perplexity_text(record)}, {record['evaluator']}, "
                     f"{scored.size} sampled of {record['num_tokens']} tok)")
            axis.plot(scored + 1, nlls[scored], color=color, marker="o", markersize=4, linewidth=0.6, label=_shown(label))
    if lower is not None:
        # A sampled oracle (recompute at chosen steps) is too sparse for a moving average: show each method's
        # NLL minus the oracle's at the sampled steps instead.
        oracle_record, oracle = sampled[0]
        scored = np.flatnonzero(np.isfinite(oracle))
        for record, nlls in full:
            steps = scored[scored < nlls.size]
            if steps.size == 0:
                continue
            color, _ = METHOD_STYLES.get(record["method"], (None, "-"))
            lower.plot(steps + 1, nlls[steps] - oracle[steps], color=color, marker="o", markersize=3, linewidth=0.6,
                       label=_shown(_method_text(record)))
        lower.axhline(0.0, color="black", linewidth=0.8)
        lower.set_ylabel(f"NLL − {_shown(oracle_record['method'])}\n(at its {scored.size} sampled tokens)")
        lower.set_xlabel("token index in the stream")
        lower.grid(True, alpha=0.3)
    longest = max(nlls.size for _, nlls in curves)
    for ax in (axis, lower):
        if ax is None:
            continue
        if capacity and capacity < longest:
            ax.axvline(capacity, color="gray", linewidth=0.8, linestyle="--")
        if context_length and context_length < longest:
            ax.axvline(context_length, color="gray", linewidth=0.8, linestyle="-.")
    if capacity and capacity < longest:
        axis.text(capacity, 1.0, " cache capacity", transform=axis.get_xaxis_transform(), va="top", fontsize=8, color="gray")
    if context_length and context_length < longest:
        axis.text(context_length, 1.0, " trained context", transform=axis.get_xaxis_transform(), va="top", fontsize=8, color="gray")
    axis.set_yscale("log")
    if lower is None:
        axis.set_xlabel("token index in the stream")
    if full:
        axis.set_ylabel(f"NLL (nats), moving average over {window} tokens, log scale")
    else:
        axis.set_ylabel("NLL (nats) at the sampled tokens, log scale")
    first = curves[0][0]
    data = first["data"].get("name", "data") if isinstance(first["data"], dict) else first["data"]
    axis.set_title(title or _shown(f"{first['model']} on {data}: n_sink={first['n_sink']}, window={first['window_size']}"))
    axis.grid(True, which="both", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8, loc="best", framealpha=0.85)
    figure.tight_layout()
    output_path = Path(output_path)
    file_format = figure_format(output_path)
    try:
        atomic_write(output_path, lambda handle: figure.savefig(handle, format=file_format))
    finally:
        plt.close(figure)
    return output_path
