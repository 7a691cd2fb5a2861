"""Decode loop vs the exact parallel evaluator on the same prefix: same per-token NLLs, and how much faster.

Runs each method twice through `streaming_llm.eval.harness.run_method` (block_size=1, then --block-size),
writes both results under --output-dir (skipped when they exist, unless --force) and a summary JSON under
<output-dir>/summary/, and prints a table. Example (the committed numbers):

    python experiments/run_decode_perplexity.py --num-tokens 4096 --methods streaming_pos_shift
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from streaming_llm.cli_common import DTYPE_NAMES, add_stream_options, apply_threads, validate_common_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--num-tokens", type=int, default=4096, help="stream length in tokens (default 4096)")
    parser.add_argument("--methods", default="streaming_pos_shift",
                        help="methods with an exact block path, comma-separated (default streaming_pos_shift)")
    parser.add_argument("--block-size", type=int, default=256,
                        help="block size of the parallel evaluator (default 256)")
    add_stream_options(parser)  # --n-sink, --window-size, --data, --model
    # The model options of `streaming-llm eval` (run_comprehensive_comparisons.sh passes its EXTRA_ARGS to both).
    parser.add_argument("--device", default="auto", metavar="{cpu,cuda,cuda:N,mps,auto}",
                        help="where the model runs (default auto: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="weights and compute dtype (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--output-dir", default="results/comprehensive",
                        help="folder of the results and of summary/ (default results/comprehensive)")
    parser.add_argument("--force", action="store_true", help="run again what is already written (default: reuse it)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (they only appear on a terminal)")
    args = parser.parse_args(argv)
    if args.block_size < 2:  # block_size 1 is the decode loop itself: it would be compared with itself
        raise ValueError(f"--block-size must be >= 2, got {args.block_size}: the parallel evaluator needs blocks of at "
                         "least 2 tokens to be compared with the one-token decode loop")
    if args.num_tokens < 2:
        raise ValueError(f"--num-tokens must be >= 2 (one prediction), got {args.num_tokens}")

    from streaming_llm.data import load_tokens, read_source
    from streaming_llm.eval.command import _model_name
    from streaming_llm.eval.harness import run_method
    from streaming_llm.eval.methods import METHODS, get_methods
    from streaming_llm.eval.results import (data_label, dtype_suffix, prepare_output_dir, read_result, result_sources,
                                             summary_source, write_json_atomically)
    from streaming_llm.loading import load_model

    validate_common_args(args)  # --n-sink, --window-size, --threads, --device
    apply_threads(args)
    methods = get_methods(args.methods)
    inexact = [method.name for method in methods if method.feed != "exact"]
    if inexact:
        raise ValueError(f"--methods: no parallel evaluator to compare for {', '.join(inexact)} (no exact block path); "
                         "choose from " + ", ".join(name for name, method in METHODS.items() if method.feed == "exact"))
    args.output_dir = prepare_output_dir(args.output_dir)  # ~ expanded; checked before any work (as `streaming-llm eval` does), the summary's too
    prepare_output_dir(Path(args.output_dir) / "summary", "--output-dir")
    text, data = read_source(args.data, args.num_tokens)  # read once, checked before the model is loaded
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    device = str(next(model.parameters()).device)
    ids = load_tokens(tokenizer, args.data, args.num_tokens, text=text, option="--num-tokens").to(device)
    common = dict(model_name=_model_name(args.model), data=data, n_sink=args.n_sink, window_size=args.window_size,
                  output_dir=args.output_dir, force=args.force, progress=not args.quiet and sys.stderr.isatty(),
                  device=device, dtype=args.dtype)
    rows = []
    for method in methods:
        runs = {size: run_method(method, model, ids, block_size=size, **common) for size in (args.block_size, 1)}
        (parallel, parallel_nlls), (decode, decode_nlls) = (read_result(runs[s].json_path) for s in (args.block_size, 1))
        delta = np.abs(parallel_nlls.astype(np.float64) - decode_nlls.astype(np.float64))
        rows.append({
            "method": method.name,
            "num_tokens": args.num_tokens,
            "block_size": args.block_size,
            "perplexity_decode": decode["perplexity"],
            "perplexity_parallel": parallel["perplexity"],
            "max_abs_delta_nll": float(delta.max()),  # float32 files: resolution ~1e-6
            "decode_tokens_per_s": decode["tokens_per_s"],
            "parallel_tokens_per_s": parallel["tokens_per_s"],
            "speedup_wall": parallel["tokens_per_s"] / decode["tokens_per_s"],
            "decode_cpu_s": decode["extra"].get("cpu_s"),
            "parallel_cpu_s": parallel["extra"].get("cpu_s"),
            "speedup_cpu": (decode["extra"]["cpu_s"] / parallel["extra"]["cpu_s"])
            if decode["extra"].get("cpu_s") and parallel["extra"].get("cpu_s") else None,
            "decode_result": runs[1].json_path.name,
            "parallel_result": runs[args.block_size].json_path.name,
        })
    # named as its results are (next to the float32 ones; by model and text where the folder holds several)
    name = (f"decode_vs_parallel{summary_source(result_sources(args.output_dir), common['model_name'], data)}__T{args.num_tokens}"
            f"__s{args.n_sink}_w{args.window_size}{dtype_suffix(args.dtype)}.json")
    summary = Path(args.output_dir) / "summary" / name
    source = {"model": common["model_name"], "data": data_label(data), "n_sink": args.n_sink,
              "window_size": args.window_size, "dtype": args.dtype}
    if summary.is_file():  # a run of other methods on the same stream adds its rows, rather than replacing the others'
        previous = json.loads(summary.read_text(encoding="utf-8"))
        if {key: previous.get(key) for key in source} == source:
            methods = {row["method"] for row in rows}
            rows = [row for row in previous["rows"] if row["method"] not in methods] + rows
    write_json_atomically(summary, {**source, "rows": rows, "note": "speedup_wall depends on the machine's load during "
                                    "each run; speedup_cpu divides the process CPU seconds"})
    print("| method | tokens | ppl decode | ppl parallel | max abs dNLL | decode tok/s | parallel tok/s | speedup (wall) | speedup (CPU s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cpu = "" if row["speedup_cpu"] is None else f"{row['speedup_cpu']:.1f}x"
        print(f"| {row['method']} | {row['num_tokens']} | {row['perplexity_decode']:.4f} | {row['perplexity_parallel']:.4f} | "
              f"{row['max_abs_delta_nll']:.2e} | {row['decode_tokens_per_s']:.1f} | {row['parallel_tokens_per_s']:.1f} | "
              f"{row['speedup_wall']:.1f}x | {cpu} |")
    print(f"summary: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
