"""Figures from result files: NLL over the stream, every method on one figure (matplotlib, Agg, PNG)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from streaming_llm.eval.results import atomic_write, check_comparable_results, data_label, nlls_path_of, read_result

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
# Where results of several configurations (window sizes, models, texts) share a figure, the line style tells them
# apart; the colour still tells the methods apart.
CONFIGURATION_STYLES = ("-", "--", ":", "-.")


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


def _is_sampled(record: dict) -> bool:
    """A result scored at chosen steps only (`eval --recompute-samples`: extra.sampled_steps), NaN elsewhere. Not
    told by its NaNs: a full result with a non-finite NLL (a float16 overflow) is still a curve, not an oracle."""
    return "sampled_steps" in record.get("extra", {})


def _oracle_key(record: dict) -> tuple:
    """What a recompute result depends on: the model and its dtype, the token stream (check_comparable_results holds
    one model's results on one text to one stream) and the cache capacity, n_sink + window_size (it recomputes the
    last capacity tokens, sinks or not)."""
    return (record["model"], record.get("dtype", "float32"), data_label(record["data"]), record["n_sink"] + record["window_size"])


class _Settings:
    """What the results of one figure were run with besides the method, dtype and evaluator (which every label
    shows): the title states the settings they all share, each label those that tell it from the others, and the
    line style tells configurations apart where there are several (the colour tells methods apart). Results of two
    window sizes, or of two models, were drawn under identical labels and a title taken from the first."""

    def __init__(self, records: list[dict]):
        self.shared: dict[str, str] = {}
        self.differing: list[str] = []
        self.by_value: set[str] = set()
        values = [self._values(record) for record in records]
        for name in ("model", "data", "n_sink", "window"):
            found = {value[name] for value in values}
            if len(found) == 1:
                self.shared[name] = self._texts(records[0])[name]
                continue
            self.differing.append(name)
            if len({self._texts(record)[name] for record in records}) < len(found):
                self.by_value.add(name)  # two texts of one name (another text, a BOS or not): its data label
        self.configurations = sorted({self._key(record) for record in records})

    @staticmethod
    def _values(record: dict) -> dict:
        return {"model": record["model"], "data": data_label(record["data"]), "n_sink": record["n_sink"],
                "window": record["window_size"]}

    @staticmethod
    def _texts(record: dict) -> dict[str, str]:
        return {"model": str(record["model"]), "data": str(record["data"].get("name", "data")),
                "n_sink": f"n_sink={record['n_sink']}", "window": f"window={record['window_size']}"}

    def _key(self, record: dict) -> tuple:
        values = self._values(record)
        return tuple(values[name] for name in self.differing)

    def index(self, record: dict) -> int:
        return self.configurations.index(self._key(record))

    def label(self, record: dict) -> str:
        """The method and dtype, then the settings that differ among the results: "window [window=60]"."""
        texts, values = self._texts(record), self._values(record)
        parts = [str(values[name]) if name in self.by_value else texts[name] for name in self.differing]
        return f"{_method_text(record)} [{', '.join(parts)}]" if parts else _method_text(record)

    def line_style(self, record: dict) -> str | None:
        """The line style of the record's configuration where there are several, else None (its method's)."""
        if len(self.configurations) == 1:
            return None
        return CONFIGURATION_STYLES[self.index(record) % len(CONFIGURATION_STYLES)]

    def title(self) -> str:
        """The settings all results share: "model on data: n_sink=4, window=1020" (or those of it they share)."""
        head = " on ".join(self.shared[name] for name in ("model", "data") if name in self.shared)
        cache = ", ".join(self.shared[name] for name in ("n_sink", "window") if name in self.shared)
        return ": ".join(part for part in (head, cache) if part) or "NLL over the stream"


def plot_nll_curves(
    result_files: list[str | os.PathLike],
    output_path: str | os.PathLike,
    window: int = 256,
    title: str | None = None,
    capacity: int | None = None,
    context_length: int | None = None,
    left_out: list[Path] | None = None,
) -> Path:
    """One PNG with the moving-average NLL (log-scale y) of every result against the token index; when a
    sampled result (recompute at chosen steps) is among them, a lower panel shows the NLL of every result of its
    configuration (_oracle_key) minus it at those steps. Results of several configurations are told apart by their
    labels and line styles; the title states what they all share (_Settings).

    result_files: result JSONs (their .nlls.npy next to them); window: moving-average width in tokens;
    capacity / context_length: draw vertical lines at the cache capacity and the model's trained context.
    A result whose NLL file is missing has no curve: a line on stderr names it, and it is appended to `left_out`
    where one is given. Returns the PNG path. ValueError naming the file for a malformed result (read_result), and
    for results of one model and text scored on different token streams, or of two models of one name
    (check_comparable_results): their curves would be drawn as if they were comparable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [(path, *read_result(path)) for path in result_files]
    check_comparable_results([(path, record) for path, record, _ in results])
    curves = []  # (record, nlls); a sampled result (_is_sampled) holds NaN at the steps it did not score
    missing = []  # (result, its NLL file): no curve, as the table has no numbers of it (report.summary_rows)
    for path, record, nlls in results:
        if nlls is None:
            missing.append((path, nlls_path_of(path, record)))
        elif nlls.size:
            curves.append((record, nlls.astype(np.float64)))
    full = [(record, nlls) for record, nlls in curves if not _is_sampled(record)]
    sampled = [(record, nlls) for record, nlls in curves if _is_sampled(record)]
    if not any(np.isfinite(nlls).any() for _, nlls in curves):
        names = ", ".join(str(path) for path in result_files)
        raise ValueError(f"{names}: no per-token NLLs to plot (each NLL file is missing, empty or holds no finite value)")
    for path, nlls_path in missing:  # said, not left out without a word
        print(f"plot: leaving out {path}: its NLL file {nlls_path.name} is missing", file=sys.stderr, flush=True)
        if left_out is not None:
            left_out.append(Path(path))
    # Sampled results are too sparse for a moving average: each is the lower panel's oracle of the full results of
    # its configuration, and drawn as points where there are none (it was left out without a word).
    configurations = {_oracle_key(record) for record, _ in full}
    drawn = full + [(record, nlls) for record, nlls in sampled
                    if np.isfinite(nlls).any() and _oracle_key(record) not in configurations]
    settings = _Settings([record for record, _ in drawn])
    order = list(METHOD_STYLES)
    drawn.sort(key=lambda item: (order.index(item[0]["method"]) if item[0]["method"] in order else len(order),
                                 _method_text(item[0]), settings.index(item[0])))

    # A full result minus the sampled oracle of its own configuration, at the oracle's steps that it scored;
    # one of another model, dtype, text or cache capacity is no oracle of it (recompute depends on nothing else).
    oracles: dict[tuple, tuple[dict, np.ndarray]] = {}
    for record, nlls in sampled:
        if np.isfinite(nlls).any():
            oracles.setdefault(_oracle_key(record), (record, nlls))
    differences = []  # (record, steps, nlls - oracle at those steps, oracle's method, oracle's sampled steps)
    for record, nlls in full:
        if (found := oracles.get(_oracle_key(record))) is None:
            continue
        oracle_record, oracle = found
        scored = np.flatnonzero(np.isfinite(oracle))
        steps = scored[scored < nlls.size]
        if steps.size:
            differences.append((record, steps, nlls[steps] - oracle[steps], oracle_record["method"], scored.size))

    if differences:
        figure, (axis, lower) = plt.subplots(2, 1, figsize=(10, 7.5), dpi=110, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    else:
        figure, axis = plt.subplots(figsize=(10, 5.5), dpi=110)
        lower = None
    for record, nlls in drawn:
        color, style = METHOD_STYLES.get(record["method"], (None, "-"))
        style = settings.line_style(record) or style
        if not _is_sampled(record):
            steps = np.arange(1, nlls.size + 1)  # nlls[t] scores token t+1
            label = f"{settings.label(record)} (ppl {_perplexity_text(record)}, {record['evaluator']}, {record['num_tokens']} tok)"
            axis.plot(steps, moving_average(nlls, window), color=color, linestyle=style, linewidth=1.3, label=_shown(label))
        else:  # the scored steps as points (x = step + 1, the token scored)
            scored = np.flatnonzero(np.isfinite(nlls))
            label = (f"{settings.label(record)} (ppl {_perplexity_text(record)}, {record['evaluator']}, "
                     f"{scored.size} sampled of {record['num_tokens']} tok)")
            axis.plot(scored + 1, nlls[scored], color=color, linestyle=style, marker="o", markersize=4, linewidth=0.6,
                      label=_shown(label))
    if lower is not None:
        for record, steps, difference, _, _ in differences:
            color, _ = METHOD_STYLES.get(record["method"], (None, "-"))
            lower.plot(steps + 1, difference, color=color, linestyle=settings.line_style(record) or "-", marker="o",
                       markersize=3, linewidth=0.6, label=_shown(settings.label(record)))
        methods = " / ".join(sorted({method for *_, method, _ in differences}))
        counts = {count for *_, count in differences}
        at = f"at its {counts.pop()} sampled tokens" if len(counts) == 1 else "at its sampled tokens"
        lower.axhline(0.0, color="black", linewidth=0.8)
        lower.set_ylabel(_shown(f"NLL − {methods} of the same\nconfiguration ({at})"))
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
    axis.set_title(title or _shown(settings.title()))
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
