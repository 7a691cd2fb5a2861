"""Peak memory and time of model.generate() with a long prompt through a StreamingKVCache.

generate() hands the model the whole prompt as one block. This measures what that block costs the cache: a 2-layer
random Llama (hidden 64, 4 query / 2 kv heads, fp32, one CPU thread), StreamingKVCache(4, 60), a prompt of
--prompt-tokens random ids, 2 greedy new tokens. Peak RSS growth is the process's maximum resident set during the
call minus before it (getrusage's ru_maxrss, read as cli_common.peak_memory_mb does: KiB on Linux, bytes on macOS;
Windows, which has no getrusage, is refused), so the model and the ids are not counted. The next tokens are recorded so
that two runs (two commits) can be seen to compute the same thing.

    python experiments/long_prompt_memory.py --prompt-tokens 8192 --output results/generation/long_prompt_8192.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import streaming_llm  # noqa: E402
from streaming_llm import StreamingKVCache, prepare_model  # noqa: E402
from streaming_llm.cli_common import finish_measurement, measurement_output, peak_memory_mb  # noqa: E402
from streaming_llm.eval.results import git_commit  # noqa: E402

N_SINK, WINDOW_SIZE = 4, 60


def measure(prompt_tokens: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(prompt_tokens + 2, 2048))
    model = prepare_model(LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 128, (1, prompt_tokens), generator=torch.Generator().manual_seed(1))
    before, started = peak_memory_mb(), time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=StreamingKVCache(N_SINK, WINDOW_SIZE),
                             max_new_tokens=2, do_sample=False)
    seconds = time.perf_counter() - started
    growth_mib = peak_memory_mb() - before
    return {"kind": "long_prompt_memory", "prompt_tokens": prompt_tokens, "n_sink": N_SINK, "window_size": WINDOW_SIZE,
            "model": "2-layer random Llama (hidden 64, 4/2 heads), fp32, 1 thread",
            "peak_rss_growth_mib": round(growth_mib, 1), "seconds": round(seconds, 3),
            "next_tokens": out[0, prompt_tokens:].tolist(), "commit": git_commit(Path(streaming_llm.__file__).parent),
            "command": "python experiments/long_prompt_memory.py " + " ".join(sys.argv[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=8192, help="prompt length in tokens (default 8192)")
    parser.add_argument("--output", default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    if args.prompt_tokens < 1:
        parser.error(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    if peak_memory_mb() is None:
        parser.error("this measurement reads the process's peak RSS (getrusage), which this platform does not report "
                     "(Windows); run it on Linux or macOS")
    output = measurement_output(parser, args.output)
    record = measure(args.prompt_tokens)
    finish_measurement(record, f"prompt {record['prompt_tokens']} tokens: peak RSS growth "
                               f"{record['peak_rss_growth_mib']:.0f} MiB, {record['seconds']:.2f} s, next tokens "
                               f"{record['next_tokens']} (commit {record['commit']})", output)
    return 0


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main))
