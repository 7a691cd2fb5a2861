"""Where the time of one compiled decode step goes: transformers' compiled StaticCache step next to our compiled
streaming step (one per decode-attention formulation), at one shape and cache size.

For each step it reports the wall time of a synchronised step (what `streaming-llm bench` times), the device time
of back-to-back steps (CUDA events, no host synchronisation in between: the GPU's own cost), and torch.profiler's
device kernels of a few steps grouped by name (with the share of device time each takes).

    python experiments/gpu_step_breakdown.py --shape llama-2-7b --capacity 4096 --output breakdown.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm.bench.latency import (  # noqa: E402
    MODEL_SHAPES, build_model, make_decoder, prepare_attn, queued_step_ms, synchronize, synchronized_ms,
)
from streaming_llm.cli_common import measurement_output, require_cuda, validate_common_args  # noqa: E402
from streaming_llm.eval.results import write_json_atomically  # noqa: E402
from streaming_llm.fast import DECODE_ATTENTION  # noqa: E402


def wall_ms(decoder, device, steps: int) -> float:
    return statistics.median(synchronized_ms(decoder.step, device) for _ in range(steps))


def kernels(decoder, device, steps: int, top: int) -> dict:
    """Device kernels of `steps` steps, grouped by name: calls and microseconds per step, share of the total."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(steps):
            decoder.step()
        synchronize(device)
    rows = {}
    for event in profiler.events():
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if device.type != "cuda" and event.device_type != torch.autograd.DeviceType.CPU:
            continue
        row = rows.setdefault(event.name, {"calls": 0, "us": 0.0})
        row["calls"] += 1
        row["us"] += event.device_time if device.type == "cuda" else event.cpu_time
    total = sum(r["us"] for r in rows.values()) or 1.0
    ordered = sorted(rows.items(), key=lambda item: -item[1]["us"])
    return {
        "device_us_per_step": total / steps,
        "kernels_per_step": sum(r["calls"] for r in rows.values()) / steps,
        "top": [{"name": name[:160], "calls_per_step": r["calls"] / steps, "us_per_step": r["us"] / steps,
                 "share": r["us"] / total} for name, r in ordered[:top]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(MODEL_SHAPES),
                        help="model shape, random weights (default llama-2-7b)")
    parser.add_argument("--capacity", type=int, default=4096, help="cache size in tokens (default 4096)")
    parser.add_argument("--n-sink", type=int, default=4, help="attention sinks (default 4)")
    parser.add_argument("--device", default="cuda",
                        help="cuda (default); cpu profiles on the CPU (a small --shape: the CPU profile nests operators)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="default bfloat16")
    parser.add_argument("--decode-attention", default="grouped",
                        help=f"comma-separated formulations of our step, from: {', '.join(DECODE_ATTENTION)} (default grouped)")
    parser.add_argument("--freeze-weights", action="store_true",
                        help="also break down our step compiled with inductor freezing (streaming_compiled_frozen, "
                             "each formulation; CUDA only)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per method (default 15)")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    validate_common_args(args)  # --device, --n-sink
    if args.capacity <= args.n_sink:
        raise ValueError(f"--capacity must exceed --n-sink ({args.n_sink}); got {args.capacity}")
    if args.steps < 1 or args.top < 1:
        raise ValueError(f"--steps and --top must be >= 1; got --steps {args.steps}, --top {args.top}")
    args.device = require_cuda(args.device)  # auto: cuda where there is one
    output = measurement_output(parser, args.output)  # ~ expanded; checked before the run
    device = torch.device(args.device)
    if args.freeze_weights and device.type != "cuda":
        raise ValueError("--freeze-weights needs --device cuda: off CUDA this script runs the steps uncompiled")
    variants = [v for v in args.decode_attention.split(",") if v]
    unknown = [v for v in variants if v not in DECODE_ATTENTION]
    if unknown:
        parser.error(f"unknown decode attention {', '.join(unknown)}; choose from {', '.join(DECODE_ATTENTION)}")
    compile_mode = "always" if device.type == "cuda" else "never"
    model = build_model(args.shape, getattr(torch, args.dtype), args.device)
    decoders = [("dense_static_compiled" if device.type == "cuda" else "dense_static",
                 make_decoder("dense_static_compiled" if device.type == "cuda" else "dense_static", model,
                              args.n_sink, args.capacity))]
    for variant in variants:
        method = "streaming_compiled" if compile_mode == "always" else "streaming_static"
        decoders.append((f"{method}[{variant}]", make_decoder(method, model, args.n_sink, args.capacity, variant)))
        if args.freeze_weights:
            decoders.append((f"streaming_compiled_frozen[{variant}]",
                             make_decoder("streaming_compiled_frozen", model, args.n_sink, args.capacity, variant)))
    report = {"shape": args.shape, "capacity": args.capacity, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "methods": {}}
    for name, decoder in decoders:
        prepare_attn(decoder)
        started = time.perf_counter()
        decoder.prepare()
        for _ in range(3):
            decoder.step()
        synchronize(device)
        setup = time.perf_counter() - started
        entry = {"setup_s": round(setup, 2), "wall_ms": wall_ms(decoder, device, args.steps),
                 "device_ms": queued_step_ms(decoder, device, args.steps),
                 "kernels": kernels(decoder, device, 3, args.top)}
        entry["wall_ms_again"] = wall_ms(decoder, device, args.steps)
        report["methods"][name] = entry
        print(f"{name}: wall {entry['wall_ms']:.3f} ms, device {entry['device_ms']} ms, "
              f"kernels/step {entry['kernels']['kernels_per_step']:.0f}, setup {setup:.1f} s", file=sys.stderr)
        for row in entry["kernels"]["top"]:
            print(f"   {row['us_per_step']:9.1f} us  {row['calls_per_step']:6.1f}x  {row['share']:6.1%}  {row['name'][:90]}",
                  file=sys.stderr)
    text = json.dumps(report, indent=2)
    if output:
        write_json_atomically(output, report)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
