"""Chunked evaluation (the seed's protocol) and a strided sliding window, against the decode loop.

The stream is fed in chunks through a sink + window cache that is cut only between chunks
(streaming_llm.eval.chunked); the decode loop (= our exact parallel evaluator) cuts after every token.
For each chunk size this measures how far the chunked NLLs are from the decode loop's on the same ids,
and does the same for the strided sliding-window baseline against the recompute oracle's definition.
Writes <output-dir>/chunked__T<n>__s<s>_w<w>.json (a file of another model or text there is refused unless --force)
and prints a table. Example (the committed numbers):

    python experiments/eval_streaming_llm.py --num-tokens 2048 --chunk-sizes 64,256,1020 --strides 256
"""

from __future__ import annotations

import argparse
import json
import sys

from streaming_llm.cli_common import add_stream_options, validate_common_args


def int_list(option: str, spec: str, low: int, high: int | None = None, bound: str = "") -> list[int]:
    """The comma-separated integers of `spec` (empty items skipped: "" asks for none); ValueError naming `option`
    and the bad item unless each is an integer from `low` to `high` (`bound` says what `high` stands for), given once."""
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}{bound}"
    values = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if not (item.isascii() and item.isdigit()) or int(item) < low or (high is not None and int(item) > high):
            raise ValueError(f"{option} {spec}: {item!r} is not {allowed}")
        if int(item) in values:  # the same row measured twice, minutes each
            raise ValueError(f"{option} {spec}: {int(item)} is given more than once")
        values.append(int(item))
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--num-tokens", type=int, default=4096, help="stream length in tokens (default 4096)")
    parser.add_argument("--chunk-sizes", default="64,256,1020",
                        help="chunk sizes of the chunked evaluation, comma-separated (default 64,256,1020)")
    parser.add_argument("--strides", default="256,512",
                        help="strides of the sliding-window baseline (window = capacity), comma-separated (default 256,512)")
    add_stream_options(parser)  # --n-sink, --window-size, --data, --model
    parser.add_argument("--output-dir", default="results/comprehensive/chunked",
                        help="folder of the result JSON (default results/comprehensive/chunked)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars (they only appear on a terminal)")
    parser.add_argument("--force", action="store_true", help="replace a result of another model or text")
    args = parser.parse_args(argv)
    validate_common_args(args)  # --n-sink, --window-size
    if args.num_tokens < 2:
        raise ValueError(f"--num-tokens must be >= 2 (one prediction), got {args.num_tokens}")
    capacity = args.n_sink + args.window_size
    chunk_sizes = int_list("--chunk-sizes", args.chunk_sizes, 1)
    strides = int_list("--strides", args.strides, 1, capacity, " (the window's capacity, n-sink + window-size)")

    import torch

    from streaming_llm.data import load_tokens, read_source
    from streaming_llm.eval.chunked import chunked_streaming_perplexity, deviation, strided_window_perplexity
    from streaming_llm.eval.command import _model_name
    from streaming_llm.eval.methods import METHODS
    from streaming_llm.eval.perplexity import compute_perplexity
    from streaming_llm.eval.results import (device_description, git_commit, prepare_output_dir, tokens_fingerprint, versions,
                                            write_json_atomically)
    from streaming_llm.loading import load_model

    output_dir = prepare_output_dir(args.output_dir)  # ~ expanded; checked before any work
    text, data = read_source(args.data, args.num_tokens)  # read once, checked before the model is loaded
    path = output_dir / f"chunked__T{args.num_tokens}__s{args.n_sink}_w{args.window_size}.json"
    if path.is_file() and not args.force:  # the name carries no model or text: never replace another's silently
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # not UTF-8 or not JSON
            previous = None
        if not (isinstance(previous, dict) and isinstance(previous.get("data"), dict)):
            raise ValueError(f"{path} is not a result of this script; use another --output-dir, or --force to replace it")
        if (previous.get("model"), previous["data"].get("sha256")) != (_model_name(args.model), data.get("sha256")):
            raise ValueError(f"{path} holds the result of {previous.get('model')} on another text or model; "
                             "use another --output-dir, or --force to replace it")
    model, tokenizer = load_model(args.model)
    ids = load_tokens(tokenizer, args.data, args.num_tokens, text=text, option="--num-tokens")
    progress = not args.quiet and sys.stderr.isatty()

    # The decode loop's NLLs, computed with the exact parallel evaluator (equal to it, tests/test_eval_parallel.py).
    reference = compute_perplexity(METHODS["streaming_pos_shift"].build(model, args.n_sink, args.window_size), ids, block_size=256)
    window = compute_perplexity(METHODS["window"].build(model, args.n_sink, args.window_size), ids, block_size=256)
    rows = [{"protocol": "decode loop (exact, blocks of 256)", "perplexity": reference.perplexity, "wall_s": reference.wall_s,
             **deviation(reference.nlls, reference.nlls)}]
    for chunk_size in chunk_sizes:
        result = chunked_streaming_perplexity(model, ids, args.n_sink, args.window_size, chunk_size, progress=progress)
        rows.append({"protocol": f"chunked, chunk {chunk_size}", "chunk_size": chunk_size, "perplexity": result.perplexity,
                     "wall_s": result.wall_s, **deviation(result.nlls, reference.nlls)})
    for stride in strides:
        result = strided_window_perplexity(model, ids, capacity, stride, progress=progress)
        rows.append({"protocol": f"sliding window {capacity}, stride {stride}", "stride": stride, "perplexity": result.perplexity,
                     "wall_s": result.wall_s, **deviation(result.nlls, reference.nlls),
                     "vs_window_attention": deviation(result.nlls, window.nlls)})
    write_json_atomically(path, {
        "model": _model_name(args.model), "data": data, "num_tokens": args.num_tokens,
        "tokens_fingerprint": tokens_fingerprint(ids), "n_sink": args.n_sink,
        "window_size": args.window_size, "reference": "streaming_pos_shift decode loop", "rows": rows,
        "window_attention_perplexity": window.perplexity, "device": device_description("cpu"),
        "torch_threads": torch.get_num_threads(), "versions": versions(), "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    })
    print("| protocol | perplexity | max abs dNLL vs decode loop | mean abs dNLL | ppl ratio | wall s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['protocol']} | {row['perplexity']:.4f} | {row['max_abs_delta_nll']:.3g} | {row['mean_abs_delta_nll']:.3g} | "
              f"{row['perplexity_ratio']:.4f} | {row['wall_s']:.1f} |")
    print(f"written: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
