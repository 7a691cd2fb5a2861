"""Soak test: stream a very long input through a StreamingLLMWrapper and watch for drift, leaks and overflow.

    python -m streaming_llm.bench.soak --model tiny --tokens 1000000 --every 20000 --block 256 \
        --out results/soak/tiny_1M.json
    python -m streaming_llm.bench.soak --model embedded --tokens 50000 --every 1000 --block 256 \
        --n-sink 4 --window-size 1020 --out results/soak/embedded_50k.json

The stream is fed in blocks of `--block` tokens (exactly equal to feeding it one token at a time, see
SEMANTICS.md §5). Every `--every` tokens one record is taken:

    tokens_seen     cache.get_seq_length()
    cache_length    cache.get_cache_length() (tokens held, by the layer that holds the most)
    cache_bytes     bytes of every tensor the cache holds, all layers
    rss_mib         resident memory of this process (VmRSS of /proc/self/status; without /proc, as on macOS, the
                    process's peak RSS: the payload's rss_kind says which; null where there is neither, as on
                    Windows), MiB, read after gc.collect()
                    (of the objects made since the stream began: those before it are frozen, gc.freeze)
                    and glibc malloc_trim(0): live memory, without the free pages the allocator keeps
    rss_raw_mib     the same, read just before (allocator noise included: a few MiB up and down)
    max_abs_logit   max |logit| over the tokens fed since the previous record
    nonfinite       NaN/inf logits over the same tokens
    mean_nll        mean -log p(next token) over the same tokens (nats); flat for a healthy stream

At the end three checks are evaluated (and the exit status is 1 if one fails):
    cache_length    == min(tokens_seen, capacity) at every record (so == capacity once full)
    rss_growth      (max RSS after warm-up - max RSS during warm-up) / max RSS during warm-up < 1%
                    (not measured, "passed": null, where there is no RSS reading: it does not fail the soak)
    finite          no NaN/inf logit in the whole stream

The JSON is written to a temporary file next to `--out` and moved in place (os.replace), so an interrupted
soak leaves no partial result.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streaming_llm.bench.memory import cache_bytes, release_free_memory, resident_memory_kind, resident_memory_mib
from streaming_llm.cli_common import measurement_output, mib_text
from streaming_llm.eval.results import write_json_atomically

RSS_GROWTH_LIMIT = 0.01
TINY_VOCAB_SIZE = 128


# -- models and token streams --------------------------------------------------------------------------------


def build_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random Llama (hidden 64, 4 query / 2 kv heads, vocab 128), weights drawn with std 0.2 so that
    logits are O(1). Built from a config: nothing is downloaded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    from streaming_llm.bench.latency import TINY_LLAMA

    config = LlamaConfig(vocab_size=TINY_VOCAB_SIZE, bos_token_id=None, eos_token_id=None, pad_token_id=None, **TINY_LLAMA)
    return LlamaForCausalLM(config).to(dtype).eval()


def save_tiny_chat_llama(folder, seed: int = 0):
    """Save a 2-layer random Llama whose vocabulary is the embedded SmolLM2 tokenizer's, with that tokenizer and
    its chat template, to `folder`: a model folder any command takes (`--model FOLDER`), ~25x faster than the
    embedded model on the same code paths. Returns the folder as a Path. Quiet: transformers' "Writing model
    shards" bar is not shown."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from streaming_llm.bench.latency import TINY_LLAMA
    from streaming_llm.loading import _quiet_transformers, embedded_tokenizer

    tokenizer = embedded_tokenizer()
    torch.manual_seed(seed)
    end_of_message = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=end_of_message, pad_token_id=end_of_message, **TINY_LLAMA)
    folder = Path(folder)
    with _quiet_transformers():
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def random_token_source(vocab_size: int, seed: int) -> Callable[[int, int], torch.Tensor]:
    """Token ids drawn uniformly, block by block, from one seeded generator: never the whole stream in memory."""
    generator = torch.Generator().manual_seed(seed)

    def next_ids(start: int, count: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (1, count), generator=generator)

    return next_ids


def slice_token_source(input_ids: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    """Consecutive slices of a tokenized text [1, T]."""

    def next_ids(start: int, count: int) -> torch.Tensor:
        return input_ids[:, start : start + count]

    return next_ids


# -- the soak loop -------------------------------------------------------------------------------------------


def run_soak(
    wrapper,
    next_ids: Callable[[int, int], torch.Tensor],
    num_tokens: int,
    every: int,
    block_size: int,
    warmup_tokens: int,
    progress: bool = False,
) -> dict:
    """Stream `num_tokens` tokens (next_ids(start, count) -> [1, count]) through `wrapper`, recording every
    `every` tokens; returns {"records": [...], "checks": {...}, "passed": bool, "wall_s": ...}."""
    if min(num_tokens, every, block_size) < 1:
        raise ValueError(f"tokens, every and block must be >= 1; got {num_tokens}, {every}, {block_size}")
    capacity = wrapper.cache_capacity
    wrapper.reset()
    # What exists before the stream is no leak of it: frozen (gc.freeze), so that each record's collection scans only
    # the objects made since (a full collection in a large process takes ~0.5 s); unfrozen at the end.
    gc.collect()
    gc.freeze()
    try:
        return _soak_loop(wrapper, next_ids, num_tokens, every, block_size, warmup_tokens, progress, capacity)
    finally:
        gc.unfreeze()


def _soak_loop(wrapper, next_ids, num_tokens: int, every: int, block_size: int, warmup_tokens: int, progress: bool,
               capacity: int) -> dict:
    records: list[dict] = []
    interval = {"max_abs_logit": 0.0, "nonfinite": 0, "nll_sum": 0.0, "nll_count": 0}
    previous_last_logits = None  # [vocab] logits of the previous block's last token: it predicts this block's first
    seen, total_nonfinite = 0, 0
    started = time.perf_counter()
    next_record = every
    while seen < num_tokens:
        count = min(block_size, next_record - seen, num_tokens - seen)
        ids = next_ids(seen, count)
        logits = wrapper(ids)[0]  # [count, vocab]
        finite = torch.isfinite(logits)
        interval["nonfinite"] += int((~finite).sum())
        interval["max_abs_logit"] = max(interval["max_abs_logit"], float(logits.abs().max()))
        if previous_last_logits is None:  # the stream's first token has no prediction
            predicting, targets = logits[:-1], ids[0, 1:]
        else:
            predicting, targets = torch.cat([previous_last_logits[None], logits[:-1]]), ids[0]
        if targets.numel():
            nlls = F.cross_entropy(predicting.double(), targets, reduction="none")
            interval["nll_sum"] += float(nlls.sum())
            interval["nll_count"] += targets.numel()
        previous_last_logits = logits[-1]
        seen += count
        if seen == next_record or seen == num_tokens:
            cache = wrapper.cache
            rss_raw = resident_memory_mib()
            release_free_memory()
            records.append(
                {
                    "tokens_seen": cache.get_seq_length(),
                    "cache_length": cache.get_cache_length(),
                    "cache_bytes": cache_bytes(cache),
                    "rss_mib": _rounded(resident_memory_mib()),
                    "rss_raw_mib": _rounded(rss_raw),
                    "max_abs_logit": interval["max_abs_logit"],
                    "nonfinite": interval["nonfinite"],
                    "mean_nll": interval["nll_sum"] / max(1, interval["nll_count"]),
                    "elapsed_s": round(time.perf_counter() - started, 3),
                }
            )
            total_nonfinite += interval["nonfinite"]
            interval = {"max_abs_logit": 0.0, "nonfinite": 0, "nll_sum": 0.0, "nll_count": 0}
            next_record += every
            if progress:
                last = records[-1]
                print(
                    f"{last['tokens_seen']:>10} tokens  held {last['cache_length']}  rss {mib_text(last['rss_mib'], 1)}  "
                    f"max|logit| {last['max_abs_logit']:.2f}  nll {last['mean_nll']:.3f}  {last['elapsed_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    wall_s = time.perf_counter() - started
    checks = evaluate_checks(records, capacity, warmup_tokens, total_nonfinite)
    return {
        "records": records,
        "checks": checks,
        "passed": all(check["passed"] is not False for check in checks.values()),  # None: not measured
        "wall_s": wall_s,
        "tokens_per_s": num_tokens / wall_s if wall_s > 0 else None,
    }


def _rounded(mib: float | None) -> float | None:
    return None if mib is None else round(mib, 3)


def evaluate_checks(records: list[dict], capacity: int, warmup_tokens: int, total_nonfinite: int) -> dict:
    """The three soak checks over the records (see the module docstring)."""
    wrong_lengths = [
        (r["tokens_seen"], r["cache_length"]) for r in records if r["cache_length"] != min(r["tokens_seen"], capacity)
    ]
    full = [r for r in records if r["tokens_seen"] >= capacity]
    cache_bytes_values = sorted({r["cache_bytes"] for r in full})
    during_warmup = [r for r in records if r["tokens_seen"] <= warmup_tokens]
    after_warmup = [r for r in records if r["tokens_seen"] > warmup_tokens]
    if any(r["rss_mib"] is None for r in records):
        rss = {"passed": None, "reason": "no resident-memory reading on this platform (rss_kind unavailable)"}
    elif during_warmup and len(after_warmup) >= 2:
        # Baseline: the warm-up's high-water mark. The allocator returns and re-takes pages, so single
        # readings move by a few tenths of a percent; a leak shows as a climb past the warm-up peak and a slope.
        baseline = max(r["rss_mib"] for r in during_warmup)
        peak = max(r["rss_mib"] for r in after_warmup)
        growth = (peak - baseline) / baseline
        tokens = torch.tensor([r["tokens_seen"] for r in after_warmup], dtype=torch.float64)
        rss_values = torch.tensor([r["rss_mib"] for r in after_warmup], dtype=torch.float64)
        centred = tokens - tokens.mean()
        slope = float((centred * (rss_values - rss_values.mean())).sum() / (centred**2).sum())
        rss = {
            "passed": growth < RSS_GROWTH_LIMIT,
            "limit": RSS_GROWTH_LIMIT,
            "warmup_tokens": warmup_tokens,
            "baseline_mib": baseline,
            "baseline": "max RSS over the records taken during the warm-up",
            "max_after_warmup_mib": peak,
            "max_raw_after_warmup_mib": max(r["rss_raw_mib"] for r in after_warmup),
            "final_mib": after_warmup[-1]["rss_mib"],
            "growth": growth,
            "slope_mib_per_million_tokens": slope * 1e6,
        }
    else:
        rss = {"passed": False, "reason": f"need records during and >= 2 after the warm-up of {warmup_tokens} tokens"}
    return {
        "cache_length": {
            "passed": not wrong_lengths,
            "capacity": capacity,
            "wrong_at": wrong_lengths[:10],
            "cache_bytes_once_full": cache_bytes_values,
        },
        "rss_growth": rss,
        "finite": {
            "passed": total_nonfinite == 0,
            "nonfinite_logits": total_nonfinite,
            "max_abs_logit": max((r["max_abs_logit"] for r in records), default=None),
        },
    }


# -- command line --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.soak", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny",
                        help="tiny: 2-layer random Llama built in memory; embedded: SmolLM2-135M-Instruct (GGUF)")
    parser.add_argument("--tokens", type=int, default=20_000, help="stream length")
    parser.add_argument("--every", type=int, default=1_000, help="take a record every N tokens")
    parser.add_argument("--block", type=int, default=256, help="tokens fed per wrapper call")
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--window-size", type=int, default=None, help="default: 60 (tiny), 1020 (embedded)")
    parser.add_argument("--position-mode", default="pos_shift", choices=("pos_shift", "rerotate", "absolute"))
    parser.add_argument("--streaming-mode", default="ours", choices=("ours", "mit"))
    parser.add_argument("--warmup", type=int, default=None,
                        help="tokens before the RSS baseline is taken "
                        "(default: max(10%% of the stream, 4 x capacity, --every))")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model's weights and of its random tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", default=None, help="JSON result path")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    # Checked before the model loads and the stream runs: each is a one-line error (status 2), not a traceback
    least = {"--tokens": 1, "--every": 1, "--block": 1, "--n-sink": 0, "--window-size": 1, "--warmup": 0,
             "--threads": 1}
    for option, minimum in least.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None and value < minimum:
            parser.error(f"{option} must be at least {minimum}; got {value}")
    if args.model == "embedded":  # the corpus's bytes bound its tokens; load_tokens gives the exact count later
        from streaming_llm.data import check_text_holds, load_text

        try:
            check_text_holds(load_text(None), args.tokens, option="--tokens")
        except ValueError as error:
            parser.error(str(error))
    args.out = measurement_output(parser, args.out, option="--out")  # checked before the stream, not after it
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from streaming_llm.eval.results import device_description, git_commit, versions
    from streaming_llm.wrapper import StreamingLLMWrapper

    window_size = args.window_size if args.window_size is not None else (60 if args.model == "tiny" else 1020)
    capacity = args.n_sink + window_size
    warmup = args.warmup if args.warmup is not None else max(args.tokens // 10, 4 * capacity, args.every)
    if args.model == "tiny":
        model = build_tiny_llama(args.seed)
        next_ids, model_name, data = random_token_source(TINY_VOCAB_SIZE, args.seed + 1), "tiny-llama-random", {
            "kind": "uniform random ids", "vocab_size": TINY_VOCAB_SIZE, "seed": args.seed + 1}
    else:
        from streaming_llm.data import load_tokens
        from streaming_llm.loading import EMBEDDED_MODEL, load_model

        model, tokenizer = load_model(None)
        input_ids = load_tokens(tokenizer, None, args.tokens, option="--tokens")
        next_ids, model_name, data = slice_token_source(input_ids), EMBEDDED_MODEL, {
            "kind": "embedded Shakespeare corpus (streaming_llm.data.load_tokens)", "num_tokens": args.tokens}
    wrapper = StreamingLLMWrapper(model, args.n_sink, window_size, args.position_mode, args.streaming_mode)
    outcome = run_soak(wrapper, next_ids, args.tokens, args.every, args.block, warmup, progress=not args.quiet)
    payload = {
        "benchmark": "soak",
        "model": model_name,
        "data": data,
        "num_tokens": args.tokens,
        "record_every": args.every,
        "block_size": args.block,
        "n_sink": args.n_sink,
        "window_size": window_size,
        "cache_capacity": capacity,
        "position_mode": args.position_mode,
        "streaming_mode": args.streaming_mode,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": device_description("cpu"),
        "rss_kind": resident_memory_kind(),  # vmrss (Linux) or peak_rss_process (bench.memory.resident_memory)
        "versions": versions(),
        "git_commit": git_commit(),
        "command": " ".join(["python -m streaming_llm.bench.soak", *(argv if argv is not None else sys.argv[1:])]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **outcome,
    }
    verdicts = {True: "ok", False: "FAILED", None: "not measured"}
    summary = ", ".join(f"{name} {verdicts[check['passed']]}" for name, check in outcome["checks"].items())
    print(f"soak {model_name}: {args.tokens} tokens in {outcome['wall_s']:.1f} s; {summary}", file=sys.stderr)
    if args.out is not None:
        print(f"-> {write_json_atomically(args.out, payload)}", file=sys.stderr)
    return 0 if outcome["passed"] else 1


if __name__ == "__main__":
    from streaming_llm.cli_common import run_script

    sys.exit(run_script(main, prog="python -m streaming_llm.bench.soak"))
