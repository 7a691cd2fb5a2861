"""Resident memory a compiled FastStreamingWrapper leaves behind once dropped, frozen (--freeze-weights) or not.

In one process: the model is loaded, then --wrappers times a FastStreamingWrapper(compile="always") is made over it,
streams --tokens random ids (past its capacity, so that both the filling and the full step are built) and is dropped.
Resident memory (VmRSS, read after gc.collect() and malloc_trim: bench.memory) is recorded over the model alone with
each wrapper alive and after it is gone. torch keeps compiled code for the life of the process; with freezing that code
holds the step's weights as constants (docs/performance.md, "Frozen weights"). Linux only (VmRSS).

    python experiments/compiled_wrapper_memory.py --freeze-weights --output results/memory/compiled_wrapper_frozen.json
    python experiments/compiled_wrapper_memory.py --output results/memory/compiled_wrapper.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streaming_llm  # noqa: E402
from streaming_llm.bench.memory import release_free_memory, resident_memory  # noqa: E402
from streaming_llm.cli_common import finish_measurement, measurement_output  # noqa: E402
from streaming_llm.eval.results import git_commit  # noqa: E402

N_SINK, WINDOW_SIZE = 4, 60


def load(model: str):
    """The embedded model in float32 (real weights), or "tiny": the 2-layer random Llama of the soak (tests)."""
    if model == "tiny":
        from streaming_llm.bench.soak import build_tiny_llama

        return build_tiny_llama(), "tiny-llama-random"
    from streaming_llm import load_model

    return load_model(None)[0], "SmolLM2-135M-Instruct (embedded), float32"


def resident_mib() -> float:
    release_free_memory()
    return resident_memory()[0]


def measure(model_name: str, freeze_weights: bool, wrappers: int, tokens: int) -> dict:
    from streaming_llm.fast import FastStreamingWrapper

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, described = load(model_name)
    parameter_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    base = resident_mib()
    records = []
    for index in range(wrappers):
        started = time.perf_counter()
        fast = FastStreamingWrapper(model, N_SINK, WINDOW_SIZE, compile="always", freeze_weights=freeze_weights)
        with torch.no_grad():
            fast(ids[:, :8])
            for t in range(8, tokens):
                fast.step(ids[:, t : t + 1])
        alive = resident_mib() - base
        del fast
        dropped = resident_mib() - base
        records.append({"wrapper": index + 1, "with_it_mib": round(alive, 1), "after_drop_mib": round(dropped, 1),
                        "seconds": round(time.perf_counter() - started, 1)})
    left = [record["after_drop_mib"] for record in records]
    return {"kind": "compiled_wrapper_memory", "model": described, "parameter_mib": round(parameter_mib, 1),
            "freeze_weights": freeze_weights, "n_sink": N_SINK, "window_size": WINDOW_SIZE, "tokens": tokens,
            "over_the_model_alone": records,
            "left_per_wrapper_after_the_first_mib": (round((left[-1] - left[0]) / (len(left) - 1), 1)
                                                     if len(left) > 1 else None),
            "torch": torch.__version__, "commit": git_commit(Path(streaming_llm.__file__).parent),
            "command": "python experiments/compiled_wrapper_memory.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("embedded", "tiny"), default="embedded",
                        help="embedded: SmolLM2-135M-Instruct in float32 (default); tiny: a 2-layer random Llama")
    parser.add_argument("--freeze-weights", action="store_true", help="FastStreamingWrapper(freeze_weights=True)")
    parser.add_argument("--wrappers", type=int, default=2, help="wrappers made and dropped, one after another (default 2)")
    parser.add_argument("--tokens", type=int, default=80,
                        help=f"tokens each streams (default 80; more than its capacity, {N_SINK + WINDOW_SIZE})")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    if args.wrappers < 1:
        parser.error(f"--wrappers must be >= 1, got {args.wrappers}")
    if args.tokens <= N_SINK + WINDOW_SIZE:
        parser.error(f"--tokens must be more than the capacity, {N_SINK + WINDOW_SIZE}, got {args.tokens}")
    if resident_memory()[1] != "vmrss":
        parser.error("this measurement reads the resident memory of now (VmRSS of /proc/self/status), which only "
                     "Linux reports; run it on Linux")
    output = measurement_output(parser, args.output)
    record = measure(args.model, args.freeze_weights, args.wrappers, args.tokens)
    steps = ", ".join(f"{r['with_it_mib']:.0f} -> {r['after_drop_mib']:.0f}" for r in record["over_the_model_alone"])
    finish_measurement(record, f"{record['model']} ({record['parameter_mib']:.0f} MiB of parameters), freeze_weights="
                               f"{record['freeze_weights']}: MiB over the model, with each wrapper -> after it is "
                               f"dropped: {steps} (commit {record['commit']})", output)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
