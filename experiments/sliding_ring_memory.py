"""KV memory and decode-step time of a hybrid model (sliding + full-attention layers) streamed at a capacity larger
than its sliding window: what the sliding layers' rings (cache.RingLayer.sliding) save.

The model is bench's "gemma3-1b-attention" shape with random weights: Gemma 3 1B's attention (26 layers, every sixth
one full attention and the rest sliding with a 512-token window, 4 query heads and 1 kv head of 256, hidden 1152),
its MLP (intermediate 1152 instead of 6912) and vocabulary (4,096 instead of 262,144) cut so that a CPU runs it in a
minute (they hold no cache).
fp32, one CPU thread. FastStreamingWrapper(n_sink=4, window_size=4092), eager static step: a prompt of
--prompt-tokens random ids fed as one call, then --steps decode steps timed one by one. The KV bytes are the
wrapper's buffers (keys, values, sink keys), counted per layer kind; the last logits are recorded so that two runs (two
commits) can be seen to compute the same thing.

    python experiments/sliding_ring_memory.py --output results/generation/sliding_ring_gemma3_1b.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streaming_llm  # noqa: E402
from streaming_llm import FastStreamingWrapper  # noqa: E402
from streaming_llm.bench.latency import shape_config  # noqa: E402
from streaming_llm.cli_common import finish_measurement, measurement_output  # noqa: E402
from streaming_llm.eval.results import git_commit  # noqa: E402

N_SINK, WINDOW_SIZE = 4, 4092


def gemma3_1b_attention():
    from transformers import Gemma3ForCausalLM

    config = shape_config("gemma3-1b-attention", bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval(), config.layer_types


def measure(prompt_tokens: int, steps: int) -> dict:
    torch.set_num_threads(1)
    model, layer_types = gemma3_1b_attention()
    wrapper = FastStreamingWrapper(model, N_SINK, WINDOW_SIZE, compile="never")
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 4096, (1, prompt_tokens), generator=generator)
    tokens = torch.randint(0, 4096, (steps, 1, 1), generator=generator)
    with torch.inference_mode():
        started = time.perf_counter()
        wrapper(prompt)
        prompt_s = time.perf_counter() - started
        step_ms = []
        for token in tokens:
            started = time.perf_counter()
            logits = wrapper.step(token)
            step_ms.append((time.perf_counter() - started) * 1e3)
    kv_bytes = {"sliding_attention": 0, "full_attention": 0}
    for kind, *tensors in zip(layer_types, wrapper.keys, wrapper.values, wrapper.sink_keys):
        kv_bytes[kind] += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return {"kind": "sliding_ring_memory", "model": "Gemma 3 1B attention (26 layers, 22 sliding of 512 tokens, 1 kv head "
            "of 256), MLP 1152, vocab 4096, random weights, fp32, 1 CPU thread", "n_sink": N_SINK, "window_size": WINDOW_SIZE,
            "prompt_tokens": prompt_tokens, "steps": steps, "step_kind": wrapper.step_kind,
            "kv_mib": {kind: round(count / 2**20, 2) for kind, count in kv_bytes.items()},
            "kv_mib_total": round(sum(kv_bytes.values()) / 2**20, 2),
            "step_ms_median": round(statistics.median(step_ms), 2), "prompt_s": round(prompt_s, 2),
            "last_logits_head": [round(value, 5) for value in logits[0, -1, :8].tolist()],
            "commit": git_commit(Path(streaming_llm.__file__).parent),
            "command": "python experiments/sliding_ring_memory.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4200, help="prompt length in tokens (default 4200)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed after it (default 32)")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    if args.prompt_tokens < N_SINK + 1:
        parser.error(f"--prompt-tokens must be >= {N_SINK + 1} (the decode steps follow the sinks), got {args.prompt_tokens}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    output = measurement_output(parser, args.output)
    record = measure(args.prompt_tokens, args.steps)
    finish_measurement(record, f"KV {record['kv_mib_total']:.1f} MiB ({record['kv_mib']}), decode step "
                               f"{record['step_ms_median']:.1f} ms (median of {args.steps}), prompt {record['prompt_s']:.1f} s, "
                               f"logits {record['last_logits_head'][:3]} (commit {record['commit']})", output)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
