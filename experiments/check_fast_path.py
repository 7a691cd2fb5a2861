"""How far the static (CUDA-graph) decode step is from the general path, in fp32 and in bf16.

One random-weight model of a named shape streams the same tokens (a short prompt block, then one token at a
time, past the cache capacity and through several frame moves) through:
  fast_<dtype>     FastStreamingWrapper (compiled with CUDA graphs on GPU, eager elsewhere unless --compile always)
  general_<dtype>  StreamingLLMWrapper (the general path the exactness tests check against the naive reference)
and compares the logits of every step: max |Δlogit|, that over the largest |logit| of the reference, and how often
the argmax agrees. The fp32 pair is the exactness statement of the fast path; the bf16 rows state its bf16
tolerance next to the general path's own bf16 error (both against general_float32).

    python experiments/check_fast_path.py --device cuda --output results/latency/fast_path_check_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streaming_llm.bench.latency import MODEL_SHAPES, build_model, environment  # noqa: E402
from streaming_llm.cli_common import measurement_output, require_cuda, validate_common_args  # noqa: E402
from streaming_llm.eval.results import write_json_atomically  # noqa: E402
from streaming_llm.fast import COMPILE_CHOICES, FastStreamingWrapper  # noqa: E402
from streaming_llm.wrapper import StreamingLLMWrapper  # noqa: E402


def stream(wrapper, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [T, vocab] (float32) for a prompt block, then one token at a time."""
    logits = [wrapper(ids[:, :prompt])[0]]
    for position in range(prompt, ids.shape[1]):
        logits.append(wrapper(ids[:, position : position + 1])[0])
    return torch.cat(logits).float()


def compare(candidate: torch.Tensor, reference: torch.Tensor) -> dict:
    difference = (candidate - reference).abs()
    return {
        "max_abs_diff": difference.max().item(),
        "mean_abs_diff": difference.mean().item(),
        "max_abs_diff_over_max_abs_logit": (difference.max() / reference.abs().max()).item(),
        "argmax_agreement": (candidate.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(MODEL_SHAPES),
                        help="model shape, random weights (default smollm2-135m)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the shape kept (compilation time; default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda where there is one, else cpu")
    parser.add_argument("--n-sink", type=int, default=4, help="attention sinks (default 4)")
    parser.add_argument("--window-size", type=int, default=60, help="recent tokens kept next to the sinks (default 60)")
    parser.add_argument("--tokens", type=int, default=400, help="stream length (default 400: six frame moves at 64)")
    parser.add_argument("--prompt", type=int, default=16, help="tokens fed as the first block (default 16)")
    parser.add_argument("--compile", default="auto", choices=COMPILE_CHOICES,
                        help="compile the fast step (default auto: on CUDA)")
    parser.add_argument("--freeze-weights", action="store_true",
                        help="compile it with inductor freezing (FastStreamingWrapper(freeze_weights=True))")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args()
    validate_common_args(args)  # --device, --n-sink, --window-size
    if args.layers < 1 or args.prompt < 1 or args.tokens < args.prompt:
        raise ValueError(f"--layers and --prompt must be >= 1 and --tokens at least --prompt; got --layers {args.layers}, "
                         f"--prompt {args.prompt}, --tokens {args.tokens}")
    args.device = require_cuda(args.device)  # auto: cuda where there is one
    output = measurement_output(parser, args.output)  # ~ expanded; checked before the run

    torch.manual_seed(0)
    model = build_model(args.shape, torch.float32, args.device, num_hidden_layers=args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=args.device)
    logits, seconds, step_kinds = {}, {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        name = str(dtype).removeprefix("torch.")
        for kind, make in (("general", StreamingLLMWrapper),
                           ("fast", lambda *a: FastStreamingWrapper(*a, compile=args.compile,
                                                                    freeze_weights=args.freeze_weights))):
            started = time.perf_counter()
            wrapper = make(model, args.n_sink, args.window_size)
            with torch.no_grad():
                logits[f"{kind}_{name}"] = stream(wrapper, ids, args.prompt)
            if kind == "fast":
                step_kinds[name] = wrapper.step_kind
            seconds[f"{kind}_{name}"] = round(time.perf_counter() - started, 2)
    reference = logits["general_float32"]
    report = {
        "kind": "fast_path_check", "shape": args.shape, "layers": args.layers, "n_sink": args.n_sink,
        "window_size": args.window_size, "tokens": args.tokens, "prompt": args.prompt, "compile": args.compile,
        "freeze_weights": args.freeze_weights,
        "step_kind": step_kinds,
        "environment": environment(args.device), "seconds": seconds,
        "fast_float32_vs_general_float32": compare(logits["fast_float32"], reference),
        "fast_bfloat16_vs_general_bfloat16": compare(logits["fast_bfloat16"], logits["general_bfloat16"]),
        "fast_bfloat16_vs_general_float32": compare(logits["fast_bfloat16"], reference),
        "general_bfloat16_vs_general_float32": compare(logits["general_bfloat16"], reference),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        write_json_atomically(output, report)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
