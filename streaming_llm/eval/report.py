"""The comparison table of a run: perplexity of every method overall, over segments of the stream, and at the
recompute samples.

Segments are ranges of steps (step t scores token t + 1), e.g. [0, 1024) = tokens 1-1,024, scored before any
eviction. A run shorter than a segment gets no number there, so every number in one column covers the very same
predictions. "At recompute samples": the steps where the recompute oracle was run, so every method is compared
with it on the same predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from streaming_llm.eval.results import check_comparable_results, read_result


def _perplexity(values: np.ndarray) -> float | None:
    """exp(mean) of some NLLs, in float64; None for none, or when one is not finite."""
    values = values.astype(np.float64)
    if values.size == 0 or not np.isfinite(values).all():
        return None
    return float(math.exp(values.mean()))


def _segment_perplexity(nlls: np.ndarray | None, start: int, end: int) -> float | None:
    """exp(mean) of nlls[start:end] when the run scored all of them, else None (also without its NLL file)."""
    return None if nlls is None or end > nlls.size else _perplexity(nlls[start:end])


def _sample_perplexity(nlls: np.ndarray | None, steps: list[int] | None) -> float | None:
    """exp(mean) of the NLLs at the recompute sample steps when the run scored all of them, else None."""
    return None if nlls is None or not steps or max(steps) >= nlls.size else _perplexity(nlls[steps])


def segment_label(start: int, end: int) -> str:
    """Steps [start, end) as the tokens they score: 'tokens 1,025-8,191'."""
    return f"tokens {start + 1:,}–{end:,}"


def summary_rows(result_files: list[str | Path], boundaries: list[int], sample_steps: list[int] | None = None) -> list[dict]:
    """One row per result: method, evaluator, tokens, perplexity overall, per segment (consecutive `boundaries`,
    step indices) and at the recompute samples, speed and memory (None where the record has none). ValueError
    naming the file and the field for a malformed result (read_result), and naming two files for results of one
    model and text scored on different token streams, or of two models of one name (check_comparable_results)."""
    segments = list(zip(boundaries[:-1], boundaries[1:]))
    results = [(path, *read_result(path)) for path in result_files]
    check_comparable_results([(path, record) for path, record, _ in results])
    rows = []
    for path, record, nlls in results:
        rows.append({
            "method": record["method"],
            "evaluator": record["evaluator"],
            "num_tokens": record["num_tokens"],
            "perplexity": record["perplexity"],
            "segments": {segment_label(a, b): _segment_perplexity(nlls, a, b) for a, b in segments},
            "ppl_at_recompute_samples": _sample_perplexity(nlls, sample_steps),
            "tokens_per_s": record.get("tokens_per_s"),
            "cpu_s": record.get("extra", {}).get("cpu_s"),
            "wall_s": record.get("wall_s"),
            "peak_memory_mib": record.get("peak_memory_mib"),
            "file": Path(path).name,
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The rows as a README-ready markdown table."""

    def number(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    labels = list(rows[0]["segments"]) if rows else []
    lines = [
        "| method | evaluator | tokens | perplexity | " + " | ".join(labels) + " | at recompute samples | tokens/s | CPU s | peak MiB |",
        "|---|---|---:|---:|" + "---:|" * len(labels) + "---:|---:|---:|---:|",
    ]
    for row in rows:
        segments = " | ".join(number(row["segments"][label]) for label in labels)
        lines.append(
            f"| {row['method']} | {row['evaluator']} | {row['num_tokens']} | {number(row['perplexity'])} | {segments} | "
            f"{number(row['ppl_at_recompute_samples'])} | {number(row['tokens_per_s'], 1)} | {number(row['cpu_s'], 0)} | "
            f"{number(row['peak_memory_mib'], 0)} |"
        )
    return "\n".join(lines)
