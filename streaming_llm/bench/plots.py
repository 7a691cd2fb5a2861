"""PNG figures for latency reports: step latency vs cache size, and latency/memory along a long stream."""

from __future__ import annotations

from pathlib import Path

from streaming_llm.eval.results import atomic_write


def plot_latency(report: dict, path: Path) -> None:
    """Left: median decode-step latency per method vs cache size (p10-p90 band). Right, if the report
    streamed: step latency and resident memory vs tokens streamed (memory left out where it was not measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_stream = bool(report.get("stream"))
    figure, axes = plt.subplots(1, 2 if has_stream else 1, figsize=(12 if has_stream else 7, 4.5), squeeze=False)
    left = axes[0][0]
    methods = sorted({row["method"] for row in report["rows"]}, key=[r["method"] for r in report["rows"]].index)
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["capacity"])
        capacities = [r["capacity"] for r in rows]
        left.plot(capacities, [r["median_ms"] for r in rows], marker="o", label=method)
        left.fill_between(capacities, [r["p10_ms"] for r in rows], [r["p90_ms"] for r in rows], alpha=0.15)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("cache size (tokens)")
    left.set_ylabel("decode step latency (ms, median)")
    env = report.get("environment", {})
    left.set_title(f"{report.get('shape')} {report.get('dtype')} on {env.get('gpu') or env.get('device')}")
    left.legend(fontsize=8)
    left.grid(alpha=0.3, which="both")
    if has_stream:
        right = axes[0][1]
        stream = report["stream"]
        tokens = [r["tokens_streamed"] for r in stream]
        right.plot(tokens, [r["median_ms"] for r in stream], marker="o", color="tab:blue", label="step latency")
        right.set_xscale("log")
        right.set_xlabel("tokens streamed")
        right.set_ylabel("decode step latency (ms)", color="tab:blue")
        # From zero, so that "flat" reads as flat rather than as noise blown up to fill the axis.
        right.set_ylim(0, 1.2 * max(r["median_ms"] for r in stream))
        if all(r["rss_bytes"] is not None for r in stream):
            memory = right.twinx()
            memory.plot(tokens, [r["rss_bytes"] / 2**20 for r in stream], marker="s", color="tab:red", label="RSS")
            memory.set_ylabel("resident memory (MiB)", color="tab:red")
            memory.set_ylim(0, 1.2 * max(r["rss_bytes"] for r in stream) / 2**20)
        right.set_title("our cache along the stream")
        right.grid(alpha=0.3)
    figure.tight_layout()
    try:
        atomic_write(Path(path), lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)
