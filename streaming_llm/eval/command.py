"""The `streaming-llm eval` and `streaming-llm plot` subcommands.

`register(subparsers, common_parent)` adds both; each sets `handler=fn` with fn(args) -> exit code, and
raises ValueError on bad input (the CLI prints it on one line and exits with status 2).
`streaming-llm eval` with no arguments scores the default methods on the embedded model and text.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

from streaming_llm.cli_common import without_options
from streaming_llm.eval.methods import DEFAULT_METHODS, METHODS, get_methods

DEFAULT_NUM_TOKENS = 4096
DEFAULT_BLOCK_SIZE = 256
BOS_CHOICES = {"auto": None, "yes": True, "no": False}  # --bos: load_tokens' add_bos
DEFAULT_OUTPUT_DIR = "results/comprehensive"


# The common options eval and plot do not use (refused when given, as they were ignored), and what they use instead.
EVAL_NOT_USED = {
    "--position-mode": "each method names its positions (streaming_pos_shift, streaming_rerotate, streaming_absolute)",
    "--streaming-mode": "each method names its cache (streaming_* for ours, mit for MIT's)",
}
PLOT_NOT_USED = {
    option: "the results it draws say what they were run with"
    for option in ("--model", "--n-sink", "--window-size", "--position-mode", "--streaming-mode", "--device", "--dtype",
                   "--threads")
}


def register(subparsers, common_parent: argparse.ArgumentParser) -> None:
    """Add `eval` and `plot` to the CLI's subparsers; `common_parent` carries --model, --n-sink, ... ."""
    evaluate = subparsers.add_parser(
        "eval",
        parents=[without_options(common_parent, "eval", EVAL_NOT_USED)],
        help="perplexity of several methods on one long stream; one result JSON per method",
        description=(
            "Score one token stream with several methods (same token ids, same code path) and write one JSON "
            "per method (+ per-token NLLs) under --output-dir. Methods that allow it run the exact parallel "
            "evaluator in blocks; kvpress_decode_* run the decode loop. Finished configurations are skipped "
            "unless --force. Each method names its position mode and cache: --position-mode and --streaming-mode "
            "are refused."
        ),
    )
    evaluate.add_argument("--num-tokens", type=int, default=DEFAULT_NUM_TOKENS, help=f"stream length in tokens (default {DEFAULT_NUM_TOKENS})")
    evaluate.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, or 'all'; NAME:N scores that method on the first N tokens only (default "
        f"{','.join(DEFAULT_METHODS)}; known: {', '.join(METHODS)})",
    )
    evaluate.add_argument(
        "--block-size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"tokens per step for methods with an exact block path; 1 = the decode loop (default {DEFAULT_BLOCK_SIZE})",
    )
    evaluate.add_argument("--data", default=None, help="text source: a .txt file, - for standard input (read once, as a pipe such as <(cmd)), or a datasets "
                          "spec name[:config[:split]] (default: embedded text)")
    evaluate.add_argument(
        "--bos",
        choices=BOS_CHOICES,
        default="auto",
        help="put the tokenizer's BOS token before the text: auto = when tokenizer(text) does (MIT's protocol), yes, or "
        "no; with yes or no the result names carry -bos or -nobos after the text's (default auto)",
    )
    evaluate.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, help=f"where result files go (default {DEFAULT_OUTPUT_DIR})")
    evaluate.add_argument("--force", action="store_true", help="re-run configurations whose results already exist")
    evaluate.add_argument(
        "--recompute-tokens", type=int, default=None, help="score `recompute` on this prefix of the stream only (it costs ~one forward of capacity+1 tokens per token; default: the whole stream)"
    )
    evaluate.add_argument(
        "--recompute-samples",
        type=int,
        default=None,
        metavar="N",
        help="score `recompute` at N steps spread over the stream past the capacity instead of on every token "
        "(with --recompute-tokens as well, both are run; default: every token)",
    )
    evaluate.add_argument(
        "--decode-tokens", type=int, default=None, help="score the decode-loop-only methods (kvpress_decode_*) on this prefix only (default: the whole stream)"
    )
    evaluate.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG", help="also draw the NLL curves (default path: <output-dir>/<run>.png)")
    evaluate.set_defaults(handler=run_eval)

    plot = subparsers.add_parser(
        "plot",
        parents=[without_options(common_parent, "plot", PLOT_NOT_USED, hidden=True)],
        help="figure of NLL over the stream from result files",
        description="Draw the moving-average NLL of result JSONs (files, or every JSON of a folder) on one log-scale figure.",
    )
    plot.add_argument("results", nargs="*", default=[DEFAULT_OUTPUT_DIR], help=f"result JSONs or folders (default {DEFAULT_OUTPUT_DIR})")
    plot.add_argument("--output", "-o", default=None, help="PNG path (default: nll_curves.png next to the first result)")
    plot.add_argument("--smooth", type=int, default=256, help="moving-average width in tokens (default 256)")
    plot.add_argument("--title", default=None, help="figure title (default: the model, the data, n_sink and window that all the results share)")
    plot.set_defaults(handler=run_plot)


def parse_methods(spec: str):
    """'a,b:N,...' -> (methods, {name: N}); a method given as NAME:N is scored on the first N tokens only.
    A method named twice, or 'all' with a count or beside other names, is refused (one would be dropped)."""
    names, prefixes = [], {}
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, colon, tokens = item.partition(":")
        name, tokens = name.strip(), tokens.strip()
        if name in names:
            raise ValueError(f"--methods names {name} twice")
        names.append(name)
        if colon:
            if name == "all":
                raise ValueError(f"--methods {item!r}: 'all' takes no token count; give NAME:N per method")
            if not tokens.isdigit() or int(tokens) < 2:
                raise ValueError(f"--methods {item!r}: the token count after ':' must be an integer >= 2")
            prefixes[name] = int(tokens)
    if "all" in names and len(names) > 1:
        raise ValueError("--methods: 'all' stands alone (it already names every method)")
    return get_methods(names), prefixes


def check_method_options(args: argparse.Namespace, methods, prefixes: dict[str, int]) -> None:
    """ValueError for options that would be silently ignored: a NAME:N, --recompute-tokens or --decode-tokens
    beyond --num-tokens, a recompute or decode-loop option with no such method chosen."""
    for name, tokens in prefixes.items():
        if tokens > args.num_tokens:
            raise ValueError(f"--methods {name}:{tokens} asks for more tokens than --num-tokens {args.num_tokens}")
    for option, tokens in (("--recompute-tokens", args.recompute_tokens), ("--decode-tokens", args.decode_tokens)):
        if tokens is not None and tokens > args.num_tokens:
            raise ValueError(f"{option} {tokens} asks for more tokens than --num-tokens {args.num_tokens}")
    chosen = {method.name for method in methods}
    if args.recompute_tokens is not None and "recompute" in prefixes:
        raise ValueError(f"--methods recompute:{prefixes['recompute']} and --recompute-tokens {args.recompute_tokens} "
                         "both cut recompute's tokens; give one")
    if (args.recompute_samples or args.recompute_tokens) and "recompute" not in chosen:
        option = "--recompute-samples" if args.recompute_samples else "--recompute-tokens"
        raise ValueError(f"{option} applies to the recompute method, which --methods does not include")
    if args.recompute_samples and "recompute" in chosen:
        from streaming_llm.eval.harness import sampled_step_range

        tokens = prefixes.get("recompute", args.num_tokens)
        end = f"recompute:{tokens}" if "recompute" in prefixes else f"--num-tokens {tokens}"
        steps = len(sampled_step_range(tokens, args.n_sink + args.window_size))
        if args.recompute_samples > steps:
            raise ValueError(f"--recompute-samples {args.recompute_samples}: the stream has {steps} step(s) to sample from "
                             f"the cache capacity {args.n_sink + args.window_size} to the end of {end}; "
                             f"ask for at most {steps}")
    if args.decode_tokens and not any(method.feed == "decode" for method in methods):
        raise ValueError("--decode-tokens applies to the decode-loop methods (kvpress_decode_*), which --methods "
                         "does not include")


def check_optional_packages(methods) -> None:
    """ValueError, before the model loads, for chosen methods whose optional package cannot be imported: the
    kvpress_decode_* methods need the `kvpress` extra."""
    needing = [method.name for method in methods if method.name.startswith("kvpress_")]
    if needing:
        try:
            import_module("streaming_llm.eval.kvpress_adapters")
        except ImportError as error:
            raise ValueError(f"--methods: {', '.join(needing)} cannot run: kvpress cannot be imported ({error}); "
                             "pip install 'streaming-llm[kvpress]'") from None


def _positive(name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def _model_name(model_arg) -> str:
    from streaming_llm.loading import EMBEDDED_MODEL

    if model_arg is None:
        return EMBEDDED_MODEL
    return Path(str(model_arg)).name.removesuffix(".gguf") or str(model_arg)


def run_eval(args: argparse.Namespace) -> int:
    """Handler of `streaming-llm eval`."""
    from streaming_llm.cli_common import show_progress

    _positive("num-tokens", args.num_tokens, 2)
    _positive("block-size", args.block_size)
    _positive("recompute-tokens", args.recompute_tokens, 2)
    _positive("decode-tokens", args.decode_tokens, 2)
    _positive("recompute-samples", args.recompute_samples)
    methods, prefixes = parse_methods(args.methods)
    check_method_options(args, methods, prefixes)
    check_optional_packages(methods)
    n_sink, window_size = args.n_sink, args.window_size
    quiet = not show_progress(args)  # progress bars and status lines only on a terminal
    device, dtype = args.device, args.dtype
    plot_path = check_figure_path(args.plot, "--plot") if args.plot else None
    # after the usage checks above, which answer at once: torch and transformers load here
    from streaming_llm.data import load_tokens, read_source
    from streaming_llm.eval.harness import run_method, run_recompute_sample
    from streaming_llm.eval.results import prepare_output_dir
    from streaming_llm.loading import load_model
    from streaming_llm.models import UnsupportedModelError, check_capacity

    output_dir = prepare_output_dir(args.output_dir)
    text, data = read_source(args.data, args.num_tokens)
    add_bos = BOS_CHOICES[args.bos]
    if add_bos is not None:  # a stream other than the default one: its own result names (results.data_label)
        data = {**data, "bos": add_bos}
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    if add_bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError(f"--bos yes: the tokenizer of {_model_name(args.model)} has no BOS token")
    if any(method.name != "dense" for method in methods):  # every other method holds n_sink + window_size tokens
        check_capacity(model.config, n_sink + window_size)
    device = str(next(model.parameters()).device)
    input_ids = load_tokens(tokenizer, args.data, args.num_tokens, add_bos=add_bos, text=text, option="--num-tokens").to(device)
    model_name = _model_name(args.model)

    common = dict(
        model_name=model_name,
        data=data,
        n_sink=n_sink,
        window_size=window_size,
        output_dir=output_dir,
        force=args.force,
        progress=not quiet,
        device=device,
        dtype=dtype,
    )
    runs = []
    for method in methods:
        prefix = min(args.num_tokens, prefixes.get(method.name, args.num_tokens))
        if method.name == "recompute" and args.recompute_samples:  # spread over recompute:N's tokens, if given
            runs.append(run_recompute_sample(model, input_ids[:, :prefix], num_samples=args.recompute_samples, **common))
            _report(runs[-1], quiet)
            if not args.recompute_tokens:
                continue
        if method.name == "recompute" and args.recompute_tokens:
            prefix = min(prefix, args.recompute_tokens)
        if method.feed == "decode" and args.decode_tokens:
            prefix = min(prefix, args.decode_tokens)
        try:
            runs.append(run_method(method, model, input_ids[:, :prefix], block_size=args.block_size, **common))
        except UnsupportedModelError as error:  # a reference implementation that cannot run this model
            print(f"eval: skipping {method.name}: {error}", file=sys.stderr, flush=True)
            continue
        _report(runs[-1], quiet)
    if not runs:
        raise ValueError("none of the chosen methods can run this model")

    if args.plot is not None:
        from streaming_llm.eval.plots import plot_nll_curves
        from streaming_llm.eval.results import dtype_suffix, result_sources, summary_source

        png = plot_path
        if png is None:  # named as summaries are: by model and text where the folder holds several, and dtype
            record = runs[0].record
            source = summary_source(result_sources(output_dir), record["model"], record["data"])
            name = f"nll_curves{source}_T{args.num_tokens}_s{n_sink}_w{window_size}{dtype_suffix(record['dtype'])}"
            png = output_dir / f"{name}.png"

        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        plot_nll_curves([run.json_path for run in runs], png, capacity=n_sink + window_size, context_length=context)
        if not quiet:
            print(f"plot: {png}", file=sys.stderr)

    if args.json:
        results = [dict(run.record, json_path=str(run.json_path), skipped=run.skipped) for run in runs]
        print(json.dumps({"results": results}), flush=True)
    else:
        print(format_table([run.record for run in runs]))
    return 0


def _report(run, quiet: bool) -> None:
    if not quiet:
        status = "skipped (exists)" if run.skipped else f"{run.record['wall_s']:.1f} s"
        print(f"{run.method}: ppl {run.record['perplexity']:.3f} [{status}] -> {run.json_path}", file=sys.stderr, flush=True)


def format_table(records: list[dict]) -> str:
    """A markdown table of result records (one row each)."""
    header = "| method | evaluator | tokens | perplexity | tokens/s | wall s | peak MiB |"
    lines = [header, "|" + "---|" * 7]
    for record in records:
        peak = record.get("peak_memory_mib")
        lines.append(
            f"| {record['method']} | {record['evaluator']} | {record['num_tokens']} | {record['perplexity']:.3f} | "
            f"{record['tokens_per_s']:.1f} | {record['wall_s']:.1f} | {'' if peak is None else f'{peak:.0f}'} |"
        )
    return "\n".join(lines)


def _collect(paths: list[str]) -> list[Path]:
    from streaming_llm.eval.results import list_results

    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            files.extend(list_results(path))
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"no result file or folder at {str(path)!r}")
    if not files:
        raise ValueError(f"no result JSON found in {', '.join(paths)}")
    return files


def run_plot(args: argparse.Namespace) -> int:
    """Handler of `streaming-llm plot`."""
    from streaming_llm.cli import require_utf8
    from streaming_llm.eval.plots import plot_nll_curves

    _positive("smooth", args.smooth)
    title = require_utf8(args.title, "--title") if args.title is not None else None
    output = check_figure_path(args.output, "--output") if args.output is not None else None
    files = _collect(args.results)
    output = output or files[0].parent / "nll_curves.png"
    files = list(dict.fromkeys(path.resolve() for path in files))  # a file named twice (or by its folder too) once
    left_out: list[Path] = []  # results without their NLL file, named on stderr
    png = plot_nll_curves(files, output, window=args.smooth, title=title, left_out=left_out)
    if getattr(args, "json", False):
        drawn = [str(path) for path in files if path not in left_out]
        print(json.dumps({"figure": str(png), "results": drawn}), flush=True)
    else:
        print(png)
    return 0


def check_figure_path(path: str, option: str) -> Path:
    """The figure file `path` names (check_output_file); ValueError unless the CLI can write it in a format
    matplotlib writes (by its extension, PNG without one)."""
    from streaming_llm.cli_common import check_output_file
    from streaming_llm.eval.plots import figure_format

    figure = check_output_file(path, option)
    figure_format(figure)
    return figure


def main(argv: list[str] | None = None) -> int:
    """`python -m streaming_llm.eval.command ...` = `streaming-llm ...` (the CLI registers this module)."""
    from streaming_llm.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
