"""`streaming-llm bench`: decode latency and memory of every method side by side; JSON + PNG under results/latency/."""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from streaming_llm.bench import COMPILED_METHODS, METHODS
from streaming_llm.choices import DECODE_ATTENTION
from streaming_llm.cli_common import without_options

DEFAULT_CACHE_SIZES = "256,512,1024,2048,4096"
# The common options bench does not use (refused when given), and what it uses in their place.
NOT_USED = {
    "--window-size": "it times each cache size of --cache-sizes (sinks included)",
    "--position-mode": "each position mode is a method of --methods (streaming_pos_shift, streaming_rerotate, "
                       "streaming_absolute)",
    "--streaming-mode": "each cache is a method of --methods (streaming_* for ours, mit for MIT's)",
}
LONGEST_TAG = 200  # bytes: a file name may have 255, and the tag is followed by up to 35 characters


def _int_list(text: str) -> list[int]:
    """Comma-separated positive integers, each once; a trailing comma is allowed, an empty entry between two is not."""
    parts = text.split(",")
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, repeated))} given more than once in {text!r}")
    return values


def select_methods(text: str, device: str) -> list[str]:
    """The --methods list: names, or 'all', or 'default' (compiled methods on CUDA only)."""
    if text == "all":
        return list(METHODS)
    if text == "default":
        on_cuda = device.startswith("cuda")
        return [m for m in METHODS if on_cuda or m not in COMPILED_METHODS]
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        named = ", ".join(map(repr, unknown)) or repr(text)
        raise ValueError(f"unknown method(s) {named}; choose from {', '.join(METHODS)} (or all, or default, alone)")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise ValueError(f"--methods names {', '.join(repeated)} more than once")
    return methods


def register(subparsers, common_parent: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "bench",
        parents=[without_options(common_parent, "bench", NOT_USED)],
        help="per-token decode latency and memory of every KV-cache strategy, side by side",
        description=(
            "Times one decode step of each method at each cache size, round-robin in one process so the ratios are "
            "fair; optionally streams up to --stream-tokens tokens through our cache, recording latency and memory "
            "along the way. Writes JSON and a PNG under --output-dir."
        ),
    )
    parser.add_argument("--shape", default="embedded",
                        help="model to time: embedded (--model, real weights) or a random-weight shape: "
                             "smollm2-135m, pythia-70m, llama-2-7b, gemma3-1b-attention (timing does not depend on "
                             "weights; default embedded)")
    parser.add_argument("--cache-sizes", type=_int_list, default=_int_list(DEFAULT_CACHE_SIZES),
                        help=f"comma-separated cache capacities, n-sink included; a size the model cannot hold is "
                             f"skipped, named with the reason (default {DEFAULT_CACHE_SIZES})")
    parser.add_argument("--methods", default="default",
                        help="comma-separated methods from: " + ", ".join(METHODS) + "; 'all' for every one, "
                             "'default' for every one except the compiled ones off CUDA (" + ", ".join(COMPILED_METHODS)
                             + ": a compilation per cache size; *_frozen: compiled with inductor freezing, the "
                             "weights folded into the graph)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds per cache size (default 5)")
    parser.add_argument("--steps", type=int, default=6, help="timed decode steps per method per round (default 6)")
    parser.add_argument("--stream-tokens", type=int, default=0,
                        help="also stream this many tokens through our cache (capacity = the largest of "
                             "--cache-sizes that is <= 1024 among those the model holds) and record latency and "
                             "memory along the way (default 0 = skip)")
    parser.add_argument("--decode-attention", default="auto",
                        choices=("auto", *DECODE_ATTENTION),
                        help="attention kernel formulation of the static decode step (streaming_static, "
                             "streaming_compiled[_frozen]; "
                             "see streaming_llm.fast.decode_attention; default auto: gqa on CUDA, grouped elsewhere)")
    parser.add_argument("--profile", action="store_true",
                        help="profile 10 decode steps of our cache (pos_shift and rerotate) at the cache size nearest "
                             "1024 among those the model holds: prints the top operators and the time of each cache stage (token writes, rotations, "
                             "frame moves); Chrome traces go next to the JSON (*.trace.json)")
    parser.add_argument("--output-dir", default="results/latency", help="where JSON and PNG go (default results/latency)")
    parser.add_argument("--tag", default=None,
                        help="name of this run's files: a plain file name, none of < > : \" / \\ | ? * (default: "
                             "shape, device and date)")
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    # The options that need neither torch nor a device are checked first: a usage error answers at once.
    if args.rounds < 1 or args.steps < 1:
        raise ValueError("--rounds and --steps must be >= 1")
    if min(args.cache_sizes) <= args.n_sink:
        raise ValueError(f"every cache size must exceed --n-sink ({args.n_sink}); got {min(args.cache_sizes)}")
    # The stream's capacity is the largest size <= 1024 that the model holds, known once it is loaded (checked
    # then): a count below the smallest size (a negative one among them) is refused at once.
    if args.stream_tokens and args.stream_tokens < min(args.cache_sizes):
        _refuse_stream_tokens(args.stream_tokens, _stream_capacity(args.cache_sizes))
    if args.model is not None and args.shape != "embedded":
        raise ValueError(f"--model applies to --shape embedded only; --shape {args.shape} times random weights")
    if args.tag is not None:  # (not UTF-8, it raised UnicodeEncodeError as its length was counted)
        from streaming_llm.cli import require_utf8

        args.tag = require_utf8(args.tag, "--tag")
    if args.tag is not None and (not args.tag.strip() or Path(args.tag).name != args.tag or args.tag.startswith(".")
                                 or re.search(r'[<>:"/\\|?*\x00-\x1f]', args.tag)):
        raise ValueError(f"--tag {args.tag!r} must be a plain file name (no folder, not hidden, none of the characters "
                         "< > : \" / \\ | ? * that Windows refuses in one)")
    if args.tag is not None and len(args.tag.encode()) > LONGEST_TAG:  # (the run's files were written after it ran)
        raise ValueError(f"--tag is {len(args.tag.encode())} bytes long, at most {LONGEST_TAG}: its files' names add "
                         "up to 35 characters (.pos_shift.trace.json, and a temporary suffix while written), and a file "
                         "name may have 255 bytes")
    methods = select_methods(args.methods, "cpu")  # the names; "default" depends on the device, resolved below

    import torch

    from streaming_llm.bench import latency
    from streaming_llm.cli_common import show_progress
    from streaming_llm.eval.results import partial_path, prepare_output_dir, write_json_atomically
    from streaming_llm.loading import resolve_device, resolve_dtype
    from streaming_llm.fast import resolve_decode_attention

    if args.shape != "embedded":  # the shape's config is known without building its weights (7B of them)
        try:
            config = latency.shape_config(args.shape)
        except ValueError as error:
            raise ValueError(f"--shape: {error}") from None
        held_sizes(config, args.cache_sizes, f"--shape {args.shape}")
    device = resolve_device(args.device)
    if args.methods == "default":
        methods = select_methods(args.methods, device)
    output_dir = prepare_output_dir(args.output_dir)
    dtype = resolve_dtype(args.dtype, device)
    if args.shape == "embedded" and args.model is not None:
        from streaming_llm.loading import load_model

        model, _ = load_model(args.model, dtype=dtype, device=device)
    else:
        model = latency.build_model(args.shape, dtype, device)
    # Every capacity the run uses is one the model holds, known before any timing (the stream's and the profile's
    # failed after the timing, and nothing was written)
    model_name = args.model or ("the embedded model" if args.shape == "embedded" else f"--shape {args.shape}")
    held = held_sizes(model.config, args.cache_sizes, model_name)
    stream_capacity, profile_capacity = _stream_capacity(held), _profile_capacity(held)
    if args.stream_tokens and args.stream_tokens < stream_capacity:
        _refuse_stream_tokens(args.stream_tokens, stream_capacity)
    for doing, asked, capacity, wanted in (
            ("streaming", args.stream_tokens, stream_capacity, _stream_capacity(args.cache_sizes)),
            ("profiling", args.profile, profile_capacity, _profile_capacity(args.cache_sizes))):
        if asked and capacity != wanted:  # on stderr whatever the terminal, as a method skipped at a size is
            print(f"bench: {doing} at cache size {capacity}: the model does not hold {wanted}", file=sys.stderr)

    progress_bars = show_progress(args)  # status lines and progress bars only on a terminal
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress_bars else (lambda *a: None)
    say(f"bench: shape={args.shape} device={device} dtype={args.dtype} threads={torch.get_num_threads()}")
    tag = args.tag or f"{args.shape}_{device.split(':')[0]}_{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    header = {
        "kind": "decode_latency", "shape": args.shape,
        "model": (args.model or "embedded") if args.shape == "embedded" else "random weights", "dtype": args.dtype,
        "n_sink": args.n_sink, "decode_attention": resolve_decode_attention(args.decode_attention, device), "rounds": args.rounds, "steps_per_round": args.steps,
    }
    rows, skipped, stream_rows = [], [], []
    # What is measured is kept as it comes, in <tag>.partial.json (whole, like every JSON here): a run stopped part
    # way (Ctrl-C, a machine's time limit, a crash in a later size) keeps the sizes it finished. The full report
    # replaces it at the end.
    json_path = output_dir / f"{tag}.json"

    def keep_partial() -> None:
        if rows or stream_rows:
            write_json_atomically(partial_path(json_path), {**header, "environment": latency.environment(device), "partial": True,
                                                 "rows": rows, "skipped": skipped, "stream": stream_rows,
                                                 "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})

    for capacity in args.cache_sizes:
        progress = None
        if progress_bars:
            from tqdm.auto import tqdm

            progress = tqdm(total=args.rounds * len(methods), desc=f"capacity {capacity}", leave=False, file=sys.stderr)
        for row in latency.measure_latency(model, methods, capacity, args.n_sink, args.rounds, args.steps,
                                           progress=progress, decode_attention=args.decode_attention,
                                           skipped=skipped):
            rows.append(row.summary())
        if progress is not None:
            progress.close()
        keep_partial()

    if args.stream_tokens:
        checkpoints = sorted({stream_capacity, *(n for n in (1_000, 10_000, 50_000, 100_000) if n < args.stream_tokens),
                              args.stream_tokens})
        progress = None
        if progress_bars:
            from tqdm.auto import tqdm

            progress = tqdm(total=args.stream_tokens, desc="streaming", unit="tok", leave=False, file=sys.stderr)
        stream_rows = latency.measure_stream(model, stream_capacity, args.n_sink, checkpoints, progress=progress)
        if progress is not None:
            progress.close()
        keep_partial()

    if not rows and not stream_rows:
        raise ValueError("no method could be timed on this model (each was skipped, see above); nothing written")
    profiles = []
    # The profile's tables are output the user asked for: on stdout with the latency table (not with --json).
    show = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))
    if args.profile:
        from streaming_llm.bench.profile import profile_decode

        output_dir.mkdir(parents=True, exist_ok=True)  # the traces are written there first (prepare_output_dir left none)
        for position_mode in ("pos_shift", "rerotate"):
            trace = output_dir / f"{tag}.{position_mode}.trace.json"
            profiled = profile_decode(model, profile_capacity, args.n_sink, position_mode=position_mode, trace_path=str(trace))
            if position_mode == "pos_shift":
                show(profiled.top_operators)
            show(profiled.text())
            profiles.append({"position_mode": position_mode, "capacity": profile_capacity, "trace": trace.name,
                             "stages": profiled.stages, "top_operators": profiled.top_operators})

    report = {
        **header, "environment": latency.environment(device), "rows": rows, "skipped": skipped, "stream": stream_rows,
        "ratios_vs_dense_static": _ratios(rows, "dense_static"),
        "ratios_vs_dense_static_compiled": _ratios(rows, "dense_static_compiled"),
        "bandwidth_floor": _bandwidth_floor(model, device, args.cache_sizes), "compile_counters": _compile_counters(),
        "profile": profiles,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomically(json_path, report)
    partial_path(json_path).unlink(missing_ok=True)
    png_path = output_dir / f"{tag}.png"
    from streaming_llm.bench.plots import plot_latency

    plot_latency(report, png_path)

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_table(rows))
        print(format_skipped(skipped), end="")
        if report["bandwidth_floor"]:
            floor = report["bandwidth_floor"]
            print(f"bandwidth floor (weights + KV) / {floor['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s: "
                  + ", ".join(f"{f['floor_ms']:.2f} ms at {f['capacity']}" for f in floor["per_capacity"]))
        if stream_rows:
            print(format_stream(stream_rows))
        print(f"wrote {json_path} and {png_path}")
    return 0


def _refuse_stream_tokens(tokens: int, capacity: int):
    raise ValueError(f"--stream-tokens must be 0 (skip) or at least the stream's capacity ({capacity}), got {tokens}")


def _stream_capacity(cache_sizes: list[int]) -> int:
    """The cache size --stream-tokens streams at: the largest up to 1024, or the smallest where every one is larger."""
    return max([c for c in cache_sizes if c <= 1024] or [min(cache_sizes)])


def _profile_capacity(cache_sizes: list[int]) -> int:
    """The cache size --profile profiles: the one nearest 1024."""
    return min(cache_sizes, key=lambda c: abs(c - 1024))


def held_sizes(config, cache_sizes: list[int], model_name: str) -> list[int]:
    """The cache sizes the model holds (check_capacity): a larger one skips each method there, with the reason
    (measure_latency), and the stream and the profile take the size they would among those held; ValueError naming
    `model_name` where none is held (nothing could be timed)."""
    from streaming_llm.models import check_capacity

    held, refusal = [], None
    for capacity in sorted(cache_sizes):
        try:
            check_capacity(config, capacity)
            held.append(capacity)
        except ValueError as error:
            refusal = refusal or str(error)  # the smallest size's
    if not held:
        raise ValueError(f"--cache-sizes: every size is too large for {model_name}: {refusal}")
    return held


def format_skipped(skipped: list[dict]) -> str:
    """A line per method and reason for the methods asked for but not timed (in the JSON as "skipped"): the cache
    sizes they were skipped at, then why."""
    sizes: dict[tuple[str, str], list[int]] = {}
    for skip in skipped:
        sizes.setdefault((skip["method"], skip["reason"]), []).append(skip["capacity"])
    return "".join(f"not timed: {method} at {', '.join(map(str, capacities))}: {reason}\n"
                   for (method, reason), capacities in sizes.items())


def _compile_counters() -> dict:
    """torch.compile's own counts: graphs compiled, and any CUDA-graph capture it skipped (and why)."""
    from torch._dynamo.utils import counters

    return {"unique_graphs": counters["stats"].get("unique_graphs", 0),
            **{key: value for key, value in counters["inductor"].items() if "cudagraph" in key}}


def _bandwidth_floor(model, device: str, capacities: list[int]) -> dict | None:
    """The least time a decode step can take on this GPU: (weight bytes + dense KV bytes) / copy bandwidth."""
    from streaming_llm.bench import latency

    bandwidth = latency.measure_copy_bandwidth(device)
    if bandwidth is None:
        return None
    weights = latency.weight_bytes(model)
    floors = []
    for capacity in capacities:
        kv = latency.dense_kv_bytes(model, capacity)
        floors.append({"capacity": capacity, "kv_bytes": kv, "floor_ms": 1000 * (weights + kv) / bandwidth})
    return {"copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes": weights, "per_capacity": floors}


def _ratios(rows: list[dict], baseline_method: str) -> list[dict]:
    """Each method's median step latency divided by the baseline method's at the same capacity."""
    baseline = {r["capacity"]: r["median_ms"] for r in rows if r["method"] == baseline_method}
    return [
        {"method": r["method"], "capacity": r["capacity"], "ratio": r["median_ms"] / baseline[r["capacity"]]}
        for r in rows if r["capacity"] in baseline
    ]


def format_table(rows: list[dict]) -> str:
    """One line per method and cache size; ratios to the static dense step, eager and compiled (where timed)."""
    baselines = {name: {r["capacity"]: r["median_ms"] for r in rows if r["method"] == name}
                 for name in ("dense_static", "dense_static_compiled")}
    baselines = {name: values for name, values in baselines.items() if values}
    labels = {"dense_static": "vs static", "dense_static_compiled": "vs compiled"}
    width = max([22, *(len(r["method"]) + 2 for r in rows)])
    header = f"{'method':<{width}}{'capacity':>9}{'median ms':>11}{'p10':>9}{'p90':>9}"
    with_peak = any(r.get("step_peak_bytes") is not None for r in rows)
    with_device = any(r.get("device_ms") is not None for r in rows)
    lines = [header + "".join(f"{labels[name]:>13}" for name in baselines) + f"{'cache MiB':>11}"
             + (f"{'step MiB':>10}" if with_peak else "") + (f"{'queued ms':>11}" if with_device else "")]
    for r in rows:
        ratios = "".join(
            f"{r['median_ms'] / values[r['capacity']]:>12.2f}x" if r["capacity"] in values else f"{'':>13}"
            for values in baselines.values()
        )
        lines.append(f"{r['method']:<{width}}{r['capacity']:>9}{r['median_ms']:>11.2f}{r['p10_ms']:>9.2f}{r['p90_ms']:>9.2f}"
                     f"{ratios}{r['cache_bytes'] / 2**20:>11.1f}"
                     + (f"{(r.get('step_peak_bytes') or 0) / 2**20:>10.1f}" if with_peak else "")
                     + (f"{r.get('device_ms') or float('nan'):>11.2f}" if with_device else ""))
    return "\n".join(lines)


def format_stream(rows: list[dict]) -> str:
    lines = [f"{'tokens streamed':>16}{'median ms':>11}{'RSS MiB':>10}{'cache len':>11}"]
    for r in rows:
        rss = f"{r['rss_bytes'] / 2**20:>10.1f}" if r["rss_bytes"] is not None else f"{'n/a':>10}"
        lines.append(f"{r['tokens_streamed']:>16}{r['median_ms']:>11.2f}{rss}{r['cache_length']:>11}")
    return "\n".join(lines)
