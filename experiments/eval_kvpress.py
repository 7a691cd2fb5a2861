"""kvpress's intended protocol ("kvpress_official") next to ours, and how the two key rerotations differ.

A context is prefilled densely and compressed by KeyRerotationPress(StreamingLLMPress) to n_sink + window_size
tokens, then a continuation is scored (streaming_llm.eval.kvpress_compare). Writes one JSON per configuration
under results/kvpress/ and prints the summary. Example (the committed numbers):

    python experiments/eval_kvpress.py --context-length 2048 --continuation-length 256
"""

from __future__ import annotations

import argparse
import sys

from streaming_llm.cli_common import add_stream_options, validate_common_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--context-length", type=int, default=4096,
                        help="tokens prefilled and compressed (default 4096)")
    parser.add_argument("--continuation-length", type=int, default=512,
                        help="tokens scored after the context (default 512)")
    add_stream_options(parser)  # --n-sink, --window-size, --data, --model
    parser.add_argument("--timing-repeats", type=int, default=20, help="repeats of the rerotation timing (default 20)")
    parser.add_argument("--output-dir", default="results/kvpress",
                        help="folder of the result JSON (default results/kvpress)")
    parser.add_argument("--demo-tokens", type=int, default=None,
                        help="tokens of the decode-loop demo of the kept positions, at most the stream's (default 400, "
                             "or the whole stream where shorter; 0 = skip)")
    parser.add_argument("--demo-window", type=int, default=60,
                        help="window of the kept-positions demo (default 60; n_sink = --n-sink)")
    parser.add_argument("--force", action="store_true", help="replace an existing result (default: keep it and stop)")
    args = parser.parse_args(argv)
    validate_common_args(args)  # --n-sink, --window-size
    if args.context_length <= args.n_sink + args.window_size:
        raise ValueError(f"--context-length {args.context_length} must exceed the kept n_sink + window_size "
                         f"({args.n_sink + args.window_size}): the press compresses the context down to it")
    stream = args.context_length + args.continuation_length
    if args.demo_tokens is None:
        args.demo_tokens = min(400, stream)
    if args.continuation_length < 1 or args.timing_repeats < 1 or args.demo_window < 1 or args.demo_tokens < 0:
        raise ValueError("--continuation-length, --timing-repeats and --demo-window must be >= 1, --demo-tokens >= 0")
    if args.demo_tokens > stream:  # (it ran on the stream's tokens, and said nothing)
        raise ValueError(f"--demo-tokens {args.demo_tokens}: the stream has --context-length + --continuation-length "
                         f"{stream} tokens")

    from streaming_llm.data import load_tokens, read_source
    from streaming_llm.eval.command import _model_name
    from streaming_llm.eval.kvpress_compare import compare_prefill_protocol
    from streaming_llm.eval.results import (data_label, device_description, git_commit, prepare_output_dir,
                                            tokens_fingerprint, versions, write_json_atomically)
    from streaming_llm.loading import load_model

    output_dir = prepare_output_dir(args.output_dir)  # ~ expanded; checked before any work
    text, data = read_source(args.data, args.context_length + args.continuation_length,
                             "--context-length + --continuation-length")  # read once, checked before the model is loaded
    model_name = _model_name(args.model)
    path = output_dir / (
        f"{model_name}__{data_label(data)}__L{args.context_length}_m{args.continuation_length}"
        f"__s{args.n_sink}_w{args.window_size}__kvpress_official.json"
    )
    if path.exists() and not args.force:
        print(f"{path} exists: it is left as it is and nothing is run (its numbers are neither checked nor printed); "
              "--force runs the comparison and replaces it", file=sys.stderr)
        return 0
    model, tokenizer = load_model(args.model)
    ids = load_tokens(tokenizer, args.data, args.context_length + args.continuation_length, text=text,
                      option="--context-length + --continuation-length")
    report = compare_prefill_protocol(
        model, ids, args.context_length, args.continuation_length, args.n_sink, args.window_size, args.timing_repeats
    )
    if args.demo_tokens:
        report["decode_kept_positions_demo"] = kept_positions_demo(model, ids[:, : args.demo_tokens], args.n_sink, args.demo_window)
    report = {"model": model_name, "data": data, "tokens_fingerprint": tokens_fingerprint(ids), **report,
              "device": device_description("cpu"),
              "versions": versions(), "git_commit": git_commit(), "command": " ".join(sys.argv)}
    write_json_atomically(path, report)

    print(f"context {args.context_length} -> kept {args.n_sink}+{args.window_size}, continuation {args.continuation_length} tokens")
    print("| variant | continuation perplexity |\n|---|---|")
    for name, value in report["perplexity"].items():
        print(f"| {name} | {value:.4f} |")
    for name, value in report["max_abs_delta_nll"].items():
        print(f"max |dNLL| {name}: {value:.3e}")
    keys = report["keys"]
    print(f"max |dkey| kvpress vs ours (all layers): {keys['max_abs_delta_all_layers']:.3e} (max |key| {keys['max_abs_key']:.1f})")
    for mode, layer0 in keys["layer0_streaming_cache_compress"].items():
        print(f"layer 0, StreamingKVCache.compress ({mode}): kept set equal {layer0['kept_positions_equal']}, "
              f"max |dkey| {layer0['max_abs_delta_keys_vs_kvpress']:.3e}")
    timing = report["rerotation_timing"]
    print(f"rerotation of one layer's kept keys {timing['keys_shape']}: ours {timing['ours_rerotate_keys_s'] * 1e6:.0f} us, "
          f"kvpress {timing['kvpress_rerotate_keys_s'] * 1e6:.0f} us (median of {timing['repeats']})")
    for variant, demo in report.get("decode_kept_positions_demo", {}).items():
        print(f"decode loop, {variant}: after {demo['steps']} steps layer 0 head 0 holds true sinks {demo['true_sinks_kept']}/"
              f"{args.n_sink}, {demo['in_true_window']}/{args.demo_window} of the last window; first slots {demo['slots'][:8]}")
    print(f"written: {path}", file=sys.stderr)
    return 0


def kept_positions_demo(model, ids, n_sink: int, window_size: int) -> dict:
    """kvpress's decode loop (shipped and corrected) over ids [1, n]: which stream positions layer 0 holds at the
    end, in cache-slot order (head 0), how many of them are the true sinks and the true last window."""
    from streaming_llm.eval.kvpress_adapters import KvpressDecodeStepper

    steps = ids.shape[1]
    true_window = set(range(max(n_sink, steps - window_size), steps))
    demo = {}
    for variant in ("shipped", "corrected"):
        stepper = KvpressDecodeStepper(model, n_sink, window_size, variant=variant)
        stepper.step(ids)
        slots = [int(p) for p in stepper.kept_positions(0)[0].tolist()]
        demo[variant] = {
            "steps": steps,
            "n_sink": n_sink,
            "window_size": window_size,
            "slots": slots,
            "true_sinks_kept": sum(p < n_sink for p in slots),
            "in_true_window": sum(p in true_window for p in slots),
            "same_in_every_layer_and_head": all(
                torch_equal(stepper.kept_positions(layer), stepper.kept_positions(0)) for layer in range(model.config.num_hidden_layers)
            ),
        }
    return demo


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
