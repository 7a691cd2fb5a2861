"""Table (markdown) and figure of one comprehensive run: every result of a stream length in one place.

    python experiments/summarize_results.py --num-tokens 20480

Reads the results of <output-dir> for n_sink/window, of one model, text and dtype (per method its longest run of at
most --num-tokens tokens), prints the markdown table, writes it to <output-dir>/summary/table__T<n>__s<s>_w<w>.md (and
.json; __<dtype> ends the names of a dtype other than float32) and the figure to <output-dir>/nll_curves__T<n>__s<s>_w<w>.png;
with no NLL file to draw, the table without the figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _is_data(data: dict, wanted: str) -> bool:
    """Whether `wanted` names the text a result records (describe_source): by its data label, its name (a file's
    with or without its suffix) or the path given to eval's --data."""
    from streaming_llm.eval.results import data_label

    name = str(data.get("name", ""))
    if wanted in (data_label(data), name) or data.get("kind") == "file" and wanted == Path(name).stem:
        return True
    return "path" in data and Path(wanted).expanduser().resolve() == Path(data["path"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--num-tokens", type=int, default=20480, help="longest run taken, in tokens (default 20480)")
    parser.add_argument("--n-sink", type=int, default=4, help="attention sinks of the results taken (default 4)")
    parser.add_argument("--window-size", type=int, default=1020, help="window of the results taken (default 1020)")
    parser.add_argument("--context-length", type=int, default=8192,
                        help="the model's trained context (default 8192, SmolLM2's)")
    parser.add_argument("--output-dir", default="results/comprehensive",
                        help="folder of the results; the table and figure are written there (default results/comprehensive)")
    parser.add_argument("--dtype", default=None,
                        help="only results of this dtype (e.g. float32, bfloat16), where the folder holds several "
                             "(default: the one dtype its results have)")
    parser.add_argument("--model", default=None,
                        help="only this model's results (its result name, e.g. SmolLM2-135M-Instruct, or the --model "
                             "given to eval), where the folder holds several models' results (default: every model's)")
    parser.add_argument("--data", default=None,
                        help="only the results on this text (its data label, e.g. shakespeare-c8d9c271, its name, or the "
                             "--data given to eval), where the folder holds several texts' results (default: every text's)")
    args = parser.parse_args(argv)
    if args.context_length < 1:
        raise ValueError(f"--context-length must be >= 1 (the model's trained context, in tokens), got {args.context_length}")

    import numpy as np

    from streaming_llm.eval.command import _model_name
    from streaming_llm.eval.plots import plot_nll_curves
    from streaming_llm.eval.report import markdown_table, summary_rows
    from streaming_llm.eval.results import (atomic_write, data_label, dtype_suffix, list_results, read_result,
                                             summary_source, write_json_atomically)

    if not args.output_dir:  # Path("") is the working directory
        raise ValueError("--output-dir is empty: give a folder")
    output_dir = Path(args.output_dir).expanduser()  # no shell expands the ~ of --output-dir=~/runs
    if not output_dir.is_dir():  # else a mistyped folder would read as "no results" in it
        raise ValueError(f"--output-dir {args.output_dir} is not a folder (of results of streaming-llm eval)")
    tag = f"s{args.n_sink}_w{args.window_size}"
    # Per method, its longest run of at most --num-tokens tokens (blocks preferred over the decode loop at equal
    # length): the stream is scored causally, so a run on the first N tokens has the NLLs of those N tokens.
    best: dict[str, tuple] = {}
    sources, dtypes = set(), set()
    in_folder = set()  # every result's (model, data label): its summaries are named by them where there are several
    for path in list_results(output_dir):
        record, _ = read_result(path)
        in_folder.add((str(record["model"]), data_label(record["data"])))
        if record["n_sink"] != args.n_sink or record["window_size"] != args.window_size or record["num_tokens"] > args.num_tokens:
            continue
        dtype = str(record.get("dtype", "float32"))
        if (args.model is not None and record["model"] not in (args.model, _model_name(args.model))
                or args.data is not None and not _is_data(record["data"], args.data) or args.dtype not in (None, dtype)):
            continue
        sources.add((record["model"], data_label(record["data"])))
        dtypes.add(dtype)
        key = (record["num_tokens"], record["evaluator"] != "decode" or record["method"].startswith("kvpress"))
        if record["method"] not in best or key > best[record["method"]][0]:
            best[record["method"]] = (key, path, record)
    if not best:
        what = "results" if args.dtype is None else f"{args.dtype} results"
        raise ValueError(f"no {what} ({tag}, at most {args.num_tokens} tokens) in {args.output_dir}")
    if len(sources) > 1:  # one table compares methods on one stream of one model
        listed = ", ".join(f"{model} on {data}" for model, data in sorted(sources))
        models, texts = sorted({model for model, _ in sources}), sorted({data for _, data in sources})
        options = []  # what tells them apart
        if len(models) > 1:
            options.append(f"--model ({' or '.join(models)})")
        if len(texts) > 1:
            options.append(f"--data ({' or '.join(texts)})")
        raise ValueError(f"{args.output_dir} holds results of several models or texts ({listed}): pass "
                         f"{' and '.join(options)}, or keep each stream's results in its own folder")
    if len(dtypes) > 1:  # a bfloat16 run on more tokens would have been taken for a method's float32 row
        raise ValueError(f"{args.output_dir} holds results in several dtypes ({', '.join(sorted(dtypes))}): pass --dtype")
    dtype = dtypes.pop()
    model, data = next((record["model"], record["data"]) for _, _, record in best.values())
    # its own table and figure, named as its results are: by model and text where the folder holds several
    name = f"{summary_source(in_folder, model, data)}__T{args.num_tokens}__{tag}{dtype_suffix(dtype)}"
    order = ["dense", "window", "streaming_pos_shift", "streaming_rerotate", "streaming_absolute", "mit", "recompute",
             "kvpress_decode_shipped", "kvpress_decode_corrected"]
    chosen = sorted(best.values(), key=lambda item: order.index(item[2]["method"]) if item[2]["method"] in order else len(order))
    files = [path for _, path, _ in chosen]
    samples = next((r["extra"]["sampled_steps"] for _, _, r in chosen if "sampled_steps" in r.get("extra", {})), None)
    capacity, context = args.n_sink + args.window_size, args.context_length
    # Step ranges: before any eviction | then up to 2,048, 4,096 tokens (the prefixes the decode-loop-only and the
    # 4,096-token runs cover) | the rest of the trained context | its first 2,048 tokens past it | the rest; only
    # those within the steps of the longest run chosen (a range no run covers would be a column of "–").
    covered = max(record["num_tokens"] for _, _, record in chosen) - 1
    boundaries = sorted({0, covered} | {b for b in (capacity, 2047, 4095, context - 1, context + 2047) if 0 < b < covered})
    rows = summary_rows(files, boundaries, samples)
    table = markdown_table(rows)
    print(table)
    summary_dir = output_dir / "summary"  # created by the first write
    # Next to its folder's other files, written whole or not at all (a failed or interrupted write keeps the old one).
    header = f"{model} on {data_label(data)}, {dtype}\n\n"  # whose numbers: the file name may not say
    atomic_write(summary_dir / f"table{name}.md", lambda handle: handle.write((header + table + "\n").encode("utf-8")))
    # Cross-checks over the common prefix of two runs (NLL files are float32: resolution ~1e-6).
    pairs = [("mit", "streaming_pos_shift"), ("streaming_rerotate", "streaming_pos_shift"),
             ("kvpress_decode_corrected", "streaming_absolute"), ("kvpress_decode_shipped", "streaming_absolute"),
             ("kvpress_decode_shipped", "kvpress_decode_corrected"), ("window", "streaming_pos_shift")]
    nlls = {record["method"]: read_result(path)[1] for _, path, record in chosen}
    checks = []
    for a, b in pairs:
        if nlls.get(a) is not None and nlls.get(b) is not None:  # (None: the result's NLL file is missing)
            common = min(nlls[a].size, nlls[b].size)
            delta = abs(nlls[a][:common].astype("float64") - nlls[b][:common].astype("float64"))
            checks.append({"a": a, "b": b, "predictions": common, "max_abs_delta_nll": float(delta.max()),
                           "first_step_above_1e-3": int((delta > 1e-3).argmax()) if (delta > 1e-3).any() else None})
            print(f"max |dNLL| {a} vs {b} over the first {common} predictions: {delta.max():.3g}"
                  f" (first step > 1e-3: {checks[-1]['first_step_above_1e-3']})")
    write_json_atomically(summary_dir / f"table{name}.json", {
        "model": model, "data": data_label(data), "n_sink": args.n_sink, "window_size": args.window_size, "dtype": dtype,
        "rows": rows, "recompute_samples": samples, "cross_checks": checks})
    png = output_dir / f"nll_curves{name}.png"
    if not any(values is not None and np.isfinite(values).any() for values in nlls.values()):  # plot would refuse
        print(f"no figure: no result has per-token NLLs to draw (each NLL file is missing or empty); {png} not written",
              file=sys.stderr)
        return 0
    plot_nll_curves(files, png, capacity=args.n_sink + args.window_size, context_length=args.context_length)
    print(f"figure: {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
